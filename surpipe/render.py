"""Rendering with a STOCK diffusers StableDiffusionPipeline and a SURAdapter, and captioned grids.

The adapter never needs a custom pipeline: CLIP encodes the prompt and the negative prompt, the
adapter conditions each one separately (conditional and unconditional rows are never mixed), and
the pipeline takes them as ``prompt_embeds`` / ``negative_prompt_embeds``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

from surpipe.errors import SurpipeError

SCHEDULERS = ("default", "ddim", "dpm++", "euler", "euler-a", "pndm", "ddpm")


def load_pipeline(model: str, *, revision: str | None = None, unet=None, device="cpu", dtype=None,
                  scheduler: str = "default"):
    """Load a stock StableDiffusionPipeline by hub id or folder (no safety checker), optionally
    reusing an already loaded UNet."""
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = dtype or torch.float32
    kwargs = {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None,
              "torch_dtype": dtype, "revision": revision}
    if unet is not None:
        kwargs["unet"] = unet
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SurpipeError(f"cannot load a Stable Diffusion pipeline from {model}: {first}") from None
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def make_scheduler(name: str, config):
    """A diffusers scheduler by short name, built from the checkpoint's scheduler config."""
    import diffusers as d

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


def check_width(pipe, adapter) -> None:
    """Refuse an adapter whose width differs from the pipeline's text embeddings."""
    width = pipe.text_encoder.config.hidden_size
    if adapter.config.width != width:
        raise SurpipeError(f"the adapter is {adapter.config.width} wide but the pipeline's text encoder gives "
                           f"{width}-wide embeddings; use the adapter trained for this Stable Diffusion model")


def encode(pipe, prompts: Sequence[str], adapter=None, negative_prompt: str = ""):
    """(prompt_embeds, negative_prompt_embeds) for the pipeline, conditioned by ``adapter`` if given."""
    import torch

    pe, ne = pipe.encode_prompt(list(prompts), pipe.device, 1, True,
                                negative_prompt=[negative_prompt] * len(prompts))
    if adapter is not None:
        check_width(pipe, adapter)
        p = next(adapter.parameters())
        with torch.no_grad():
            pe = adapter(pe.to(p.device, p.dtype)).to(pe.dtype)
            ne = adapter(ne.to(p.device, p.dtype)).to(ne.dtype)
    return pe, ne


def render(pipe, prompts: Sequence[str], *, adapter=None, seeds: Sequence[int], steps: int = 30,
           guidance: float = 7.5, size: int | None = None, negative_prompt: str = "", batch_size: int = 4,
           desc: str | None = None):
    """Images for ``prompts`` (one per prompt, seed ``seeds[i]``), with or without the adapter.

    ``desc`` shows a progress bar (images/s and ETA) under that name.
    """
    import torch
    from surpipe.progress import progress_bar

    if len(seeds) != len(prompts):
        raise ValueError("one seed per prompt")
    images = []
    bar = progress_bar(total=len(prompts), unit="img", desc=desc, disable=desc is None)
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        pe, ne = encode(pipe, chunk, adapter, negative_prompt)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps,
                   guidance_scale=guidance, generator=gens, height=size, width=size)
        images += out.images
        bar.update(len(chunk))
    bar.close()
    return images


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def caption_grid(rows: Sequence[tuple[str, Sequence]], headers: Sequence[str], cell: int | None = None):
    """A grid with one row per caption and one column per header; captions wrap under each row."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("no rows")
    cell = cell or max(rows[0][1][0].size)
    cell = max(cell, 96)
    pad, head_h = 6, 22
    font, small = _font(14), _font(12)
    wrap = max(20, (cell * len(headers)) // 7)
    cap_lines = [textwrap.wrap(c, wrap)[:4] or [""] for c, _ in rows]
    row_h = [cell + 8 + 15 * len(lines) for lines in cap_lines]
    W = pad + len(headers) * (cell + pad)
    H = head_h + sum(h + pad for h in row_h) + pad
    grid = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(grid)
    for j, h in enumerate(headers):
        draw.text((pad + j * (cell + pad), 4), h, fill="black", font=font)
    y = head_h
    for (caption, imgs), lines, rh in zip(rows, cap_lines, row_h):
        for j, im in enumerate(imgs):
            grid.paste(im.convert("RGB").resize((cell, cell)), (pad + j * (cell + pad), y))
        for k, line in enumerate(lines):
            draw.text((pad, y + cell + 4 + 15 * k), line, fill="black", font=small)
        y += rh + pad
    return grid


def compare_grid(model: str, adapter, prompts: Sequence[str], path: str | Path, *, unet=None, pipe=None,
                 steps: int = 30, guidance: float = 7.5, seed: int = 0, size: int | None = None,
                 revision: str | None = None, device="cpu", dtype=None, scheduler: str = "default",
                 negative_prompt: str = "", progress: bool = True):
    """Render ``prompts`` without and with ``adapter`` at the same seeds; save a captioned grid PNG.

    Returns (grid path, images without, images with).
    """
    if pipe is None:
        pipe = load_pipeline(model, revision=revision, unet=unet, device=device, dtype=dtype, scheduler=scheduler)
    seeds = [seed + i for i in range(len(prompts))]
    base = render(pipe, prompts, adapter=None, seeds=seeds, steps=steps, guidance=guidance, size=size,
                  negative_prompt=negative_prompt)
    with_ad = render(pipe, prompts, adapter=adapter, seeds=seeds, steps=steps, guidance=guidance, size=size,
                     negative_prompt=negative_prompt)
    grid = caption_grid([(f"{p}  (seed {s})", [a, b]) for p, s, a, b in zip(prompts, seeds, base, with_ad)],
                        headers=["Stable Diffusion", "+ SUR-adapter"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path, base, with_ad
