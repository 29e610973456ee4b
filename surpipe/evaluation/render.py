"""Rendering with a STOCK diffusers StableDiffusionPipeline and a SURAdapter, and captioned grids.

The adapter never needs a custom pipeline: CLIP encodes the prompt and the negative prompt, the
adapter conditions each one separately (conditional and unconditional rows are never mixed), and
the pipeline takes them as ``prompt_embeds`` / ``negative_prompt_embeds``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from surpipe.errors import SurpipeError, first_line
from surpipe.progress import progress_bar
from surpipe.sd import check_pipeline_class
from surpipe.tiny import TINY_MARKER

SCHEDULERS = ("default", "ddim", "dpm++", "euler", "euler-a", "pndm", "ddpm")


def load_pipeline(model: str, *, revision: str | None = None, unet=None, device="cpu", dtype=None,
                  scheduler: str = "default"):
    """Load the stock pipeline of a checkpoint by hub id or folder: StableDiffusionPipeline (no
    safety checker) or, when model_index.json names it, StableDiffusionXLPipeline; optionally
    reusing an already loaded UNet."""
    import torch  # heavy: keeps --help torch-free
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = dtype or torch.float32
    xl = check_pipeline_class(model, revision, accept=("sd", "sdxl")) == "sdxl"
    kwargs = {"dtype": dtype, "revision": revision}
    if not xl:
        kwargs.update(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
    if unet is not None:
        kwargs["unet"] = unet
    try:
        pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(model, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise SurpipeError(f"cannot load a Stable Diffusion pipeline from {model}: {first_line(e)}") from None
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def make_scheduler(name: str, config):
    """A diffusers scheduler by short name, built from the checkpoint's scheduler config."""
    import diffusers as d  # heavy: keeps --help torch-free

    table = {
        "ddim": d.DDIMScheduler, "dpm++": d.DPMSolverMultistepScheduler, "euler": d.EulerDiscreteScheduler,
        "euler-a": d.EulerAncestralDiscreteScheduler, "pndm": d.PNDMScheduler, "ddpm": d.DDPMScheduler,
    }
    if name == "default":
        cls_name = config.get("_class_name", "PNDMScheduler") if hasattr(config, "get") else "PNDMScheduler"
        cls = getattr(d, cls_name, d.PNDMScheduler)
        return cls.from_config(config)
    if name not in table:
        raise SurpipeError(f"unknown scheduler {name!r}; valid choices: {', '.join(SCHEDULERS)}")
    return table[name].from_config(config)


def is_xl(pipe) -> bool:
    """True for an SDXL pipeline (two text encoders, pooled embeddings, micro-conditioning)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def check_width(pipe, adapter) -> None:
    """Refuse an adapter whose width differs from the pipeline's text embeddings (SDXL: both
    encoders' widths together)."""
    width = pipe.text_encoder.config.hidden_size if pipe.text_encoder is not None else 0
    if is_xl(pipe):
        width += pipe.text_encoder_2.config.hidden_size
    if adapter.config.width != width:
        raise SurpipeError(f"the adapter is {adapter.config.width} wide but the pipeline's text encoder gives "
                           f"{width}-wide embeddings; use the adapter trained for this Stable Diffusion model")


def encode(pipe, prompts: Sequence[str], adapter=None, negative_prompt: str = ""):
    """(prompt_embeds, negative_prompt_embeds) for the pipeline, conditioned by ``adapter`` if given
    (see :func:`encode_args`, which also gives SDXL's pooled embeddings)."""
    args = encode_args(pipe, prompts, adapter, negative_prompt)
    return args["prompt_embeds"], args["negative_prompt_embeds"]


def encode_args(pipe, prompts: Sequence[str], adapter=None, negative_prompt: str = ""):
    """The pipeline's embedding arguments as a dict (``prompt_embeds``, ``negative_prompt_embeds``;
    SDXL adds ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds``), the token sequences
    conditioned by ``adapter`` if given (SDXL's pooled embeddings pass through unchanged unless the
    adapter has a pooled head: docs/method-decisions.md).

    Raises SurpipeError when the adapter's output is not finite (a NaN adapter would otherwise
    render blank images)."""
    import torch  # heavy: keeps --help torch-free

    neg = [negative_prompt] * len(prompts)
    extra = {}
    if is_xl(pipe):
        # an empty negative prompt is None for SDXL: its config may force zero embeddings for it
        # (force_zeros_for_empty_prompt), exactly as a plain pipeline call without one does
        pe, ne, pp, npp = pipe.encode_prompt(list(prompts), device=pipe.device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=True,
                                             negative_prompt=neg if negative_prompt else None)
        if adapter is not None and adapter.config.pooled_width is not None:  # trained with --pooled aligned
            q = next(adapter.parameters())
            with torch.no_grad():
                pp = adapter.pool(pp.to(q.device, q.dtype)).to(pp.dtype)
                npp = adapter.pool(npp.to(q.device, q.dtype)).to(npp.dtype)
        extra = {"pooled_prompt_embeds": pp, "negative_pooled_prompt_embeds": npp}
    else:
        pe, ne = pipe.encode_prompt(list(prompts), pipe.device, 1, True, negative_prompt=neg)
    if adapter is not None:
        check_width(pipe, adapter)
        p = next(adapter.parameters())
        with torch.no_grad():
            pe = adapter(pe.to(p.device, p.dtype)).to(pe.dtype)
            ne = adapter(ne.to(p.device, p.dtype)).to(ne.dtype)
        bad = [what for what, t in (("prompt", pe), ("negative prompt", ne)) if not torch.isfinite(t).all()]
        if bad:
            raise SurpipeError(f"the adapter's output for the {' and '.join(bad)} embeddings is not finite "
                               f"(NaN or Inf); its weights or the pipeline's dtype overflow: nothing was rendered "
                               f"from it (try --dtype float32, or a good adapter checkpoint)")
    return {"prompt_embeds": pe, "negative_prompt_embeds": ne, **extra}


def render(pipe, prompts: Sequence[str], *, adapter=None, seeds: Sequence[int], steps: int = 30,
           guidance: float = 7.5, size: int | None = None, negative_prompt: str = "", batch_size: int = 4,
           desc: str | None = None):
    """Images for ``prompts`` (one per prompt, seed ``seeds[i]``), with or without the adapter.

    Each distinct prompt goes through CLIP and the adapter once, however many images (seeds) it
    has: its embeddings are kept until its last image is rendered. Raises SurpipeError instead of
    returning an image whose pixels are not finite. ``desc`` shows a progress bar (images/s and
    ETA) under that name.
    """
    import torch  # heavy: keeps --help torch-free

    if len(seeds) != len(prompts):
        raise ValueError("one seed per prompt")
    prompts = list(prompts)
    last = {p: i for i, p in enumerate(prompts)}
    cache: dict[str, dict] = {}  # prompt -> the pipeline's embedding arguments, [1, ...] each
    images = []
    bar = progress_bar(total=len(prompts), unit="img", desc=desc, disable=desc is None)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        new = list(dict.fromkeys(p for p in chunk if p not in cache))
        if new:
            emb = encode_args(pipe, new, adapter, negative_prompt)
            cache.update({p: {k: v[j:j + 1] for k, v in emb.items()} for j, p in enumerate(new)})
        args = {k: torch.cat([cache[p][k] for p in chunk]) for k in cache[chunk[0]]}
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        out = pipe(**args, num_inference_steps=steps,
                   guidance_scale=guidance, generator=gens, height=size, width=size, output_type="np")
        arr = np.asarray(out.images)
        if not np.isfinite(arr).all():
            bad = sorted({chunk[k] for k in range(len(chunk)) if not np.isfinite(arr[k]).all()})
            raise SurpipeError(f"the pipeline produced non-finite pixels (NaN/Inf) for {len(bad)} prompt(s), "
                               f"e.g. {bad[0]!r}; no blank image was written (a float16 overflow? try "
                               f"--dtype float32)")
        images += pipe.numpy_to_pil(arr)
        for p in set(chunk):  # free embeddings no later image needs
            if last[p] < i + batch_size:
                cache.pop(p, None)
        bar.update(len(chunk))
    bar.close()
    return images


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        return ImageFont.load_default()


def _text_w(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else font.getsize(text)[0]


def _line_h(font) -> int:
    box = font.getbbox("Ayg|")
    return int(box[3] - min(box[1], 0)) + 3


def wrap_px(text: str, font, width: float, max_lines: int | None = None) -> list[str]:
    """``text`` wrapped into lines no wider than ``width`` pixels in ``font`` (a word wider than
    ``width`` is cut into pieces); at most ``max_lines``, the last one ending with an ellipsis."""
    words: list[str] = []
    for word in text.split():
        while len(word) > 1 and _text_w(font, word) > width:  # cut an over-long word
            k = len(word) - 1
            while k > 1 and _text_w(font, word[:k]) > width:
                k -= 1
            words.append(word[:k])
            word = word[k:]
        words.append(word)
    lines: list[str] = []
    for word in words:
        if lines and _text_w(font, lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    lines = [ln for ln in lines if ln] or [""]
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_w(font, last + "...") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return lines


def _fitting_font(texts: Sequence[str], width: float, size: int, smallest: int = 8, whole: int = 11):
    """The largest font (from ``size`` down) in which every text fits ``width`` on one line, if one
    of at least ``whole`` does; else the largest (down to ``smallest``) in which every word fits."""
    for s in range(size, whole - 1, -1):
        font = _font(s)
        if all(_text_w(font, t) <= width for t in texts):
            return font
    font = _font(size)
    while size > smallest and any(_text_w(font, w) > width for t in texts for w in t.split()):
        size -= 1
        font = _font(size)
    return font


def tiny_model_note(*models) -> str | None:
    """A warning line when any of ``models`` is a folder written by ``surpipe make-tiny-models``
    (or the tiny CLIP): they hold a ``surpipe_tiny.json`` marker; their pictures and scores are noise."""
    tiny = [str(m) for m in models if m and Path(str(m)).expanduser().is_dir()
            and (Path(str(m)).expanduser() / TINY_MARKER).is_file()]
    if not tiny:
        return None
    return ("random tiny test models (" + ", ".join(Path(t).name for t in tiny) + "): the pictures and scores "
            "only show that the pipeline runs; they mean nothing about the method")


def caption_grid(rows: Sequence[tuple[str, Sequence]], headers: Sequence[str], cell: int | None = None,
                 note: str | None = None):
    """A grid with one row per caption and one column per header; captions wrap under each row.

    Text is measured in pixels: column headers wrap (and shrink) to their column, captions wrap to
    the grid's width, and the header band grows with them, so nothing overlaps even for tiny
    images. ``note`` (e.g. :func:`tiny_model_note`) is printed in red above the headers.
    """
    if not rows:
        raise ValueError("no rows")
    cell = cell or max(rows[0][1][0].size)
    cell = max(cell, 96)
    pad = 6
    ncol = max(len(headers), max(len(imgs) for _, imgs in rows))
    W = pad + ncol * (cell + pad)
    text_w = W - 2 * pad
    head_font = _fitting_font(headers, cell - 2, 14)
    small = _font(12)
    note_lines = wrap_px(note, small, text_w) if note else []
    head_lines = [wrap_px(h, head_font, cell - 2) for h in headers]
    nh, lh_head, lh = max((len(x) for x in head_lines), default=0), _line_h(head_font), _line_h(small)
    head_h = 4 + lh * len(note_lines) + (4 if note_lines else 0) + lh_head * nh + 4
    cap_lines = [wrap_px(c, small, text_w, max_lines=4) for c, _ in rows]
    row_h = [cell + 6 + lh * len(lines) for lines in cap_lines]
    H = head_h + sum(h + pad for h in row_h) + pad
    grid = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(grid)
    y = 4
    for line in note_lines:
        draw.text((pad, y), line, fill=(190, 0, 0), font=small)
        y += lh
    y += 4 if note_lines else 0
    for j, lines in enumerate(head_lines):
        for k, line in enumerate(lines):
            draw.text((pad + j * (cell + pad), y + k * lh_head), line, fill="black", font=head_font)
    y = head_h
    for (caption, imgs), lines, rh in zip(rows, cap_lines, row_h):
        for j, im in enumerate(imgs):
            grid.paste(im.convert("RGB").resize((cell, cell)), (pad + j * (cell + pad), y))
        for k, line in enumerate(lines):
            draw.text((pad, y + cell + 4 + lh * k), line, fill="black", font=small)
        y += rh + pad
    return grid


ARM_HEADERS = ("Stable Diffusion", "+ SUR-adapter")


def grid_cell(image, minimum: int = 160) -> int:
    """Grid cell side for ``image``: its own size, but wide enough for the column headers
    (small images are scaled up)."""
    return max(max(image.size), minimum)


def arms_grid(captions: Sequence[str], without: Sequence, with_: Sequence, *, cell: int | None = None,
              note: str | None = None):
    """A two-column grid: each caption's image without the adapter, then with it."""
    return caption_grid([(c, [a, b]) for c, a, b in zip(captions, without, with_)], headers=ARM_HEADERS,
                        cell=cell, note=note)


def compare_grid(model: str, adapter, prompts: Sequence[str], path: str | Path, *, unet=None, pipe=None,
                 steps: int = 30, guidance: float = 7.5, seed: int = 0, size: int | None = None,
                 revision: str | None = None, device="cpu", dtype=None, scheduler: str = "default",
                 negative_prompt: str = "", progress: bool = True):
    """Render ``prompts`` without and with ``adapter`` at the same seeds; save a captioned grid PNG.

    Returns (grid path, images without, images with). The grid says so when ``model`` is a random
    tiny test model.
    """
    if pipe is None:
        pipe = load_pipeline(model, revision=revision, unet=unet, device=device, dtype=dtype, scheduler=scheduler)
    seeds = [seed + i for i in range(len(prompts))]
    base = render(pipe, prompts, adapter=None, seeds=seeds, steps=steps, guidance=guidance, size=size,
                  negative_prompt=negative_prompt)
    with_ad = render(pipe, prompts, adapter=adapter, seeds=seeds, steps=steps, guidance=guidance, size=size,
                     negative_prompt=negative_prompt)
    grid = arms_grid([f"{p}  (seed {s})" for p, s in zip(prompts, seeds)], base, with_ad,
                     note=tiny_model_note(model))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path, base, with_ad
