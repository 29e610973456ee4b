"""``surpipe generate``: images from a STOCK diffusers StableDiffusionPipeline conditioned by a SUR-adapter.

    surpipe generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter runs/sur-13b-l39 \
        --prompt "a dog jumping over a fence" --out out/gen --compare

CLIP encodes the prompt and the negative prompt, the adapter conditions each one separately
(``surpipe.render.encode``), and the pipeline takes them as ``prompt_embeds`` /
``negative_prompt_embeds``. No LLM is loaded. ``--adapter`` is a training run folder (its
``adapter/`` is used) or an adapter folder (``config.json`` + ``model.safetensors``).

Image ``k`` (counting over prompts, then ``--images-per-prompt``) uses seed ``--seed + k``, so
the same command gives the same images, and ``--compare`` renders each (prompt, seed) without and
with the adapter and writes ``compare_grid.png``. Every setting goes to ``OUT/generate.json``; the
config to repeat the run goes to ``OUT/config.json`` (``surpipe generate --config OUT/config.json``).

``--out`` must be a new or empty folder, so old and new images never mix: a folder holding an
earlier generate's files is refused unless ``--overwrite`` (which deletes only those files), and
the same command run again with the same adapter has nothing to do. An adapter with NaN/Inf
weights, or one whose output is not finite, is refused before any image is written.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from surpipe.config import opt
from surpipe.errors import SurpipeError
from surpipe.render import SCHEDULERS

SchedulerName = Literal[SCHEDULERS]  # the choices of surpipe.render, never a copy
DtypeName = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass
class GenerateConfig:
    """Settings of ``surpipe generate``. Give ``prompt`` or ``prompts_file`` (or both)."""

    model: str = opt(help="Stable Diffusion model: a diffusers folder or hub id (the one the adapter was "
                          "trained for).", group="model")
    adapter: str = opt(help="Training run folder (uses RUN/adapter) or adapter folder (config.json + "
                            "model.safetensors).", group="model")
    out: str = opt(help="Output folder for the images, generate.json and config.json; must be new or empty "
                        "(see --overwrite).", group="output")
    prompt: Optional[str] = opt(None, help="One prompt to render.", group="inference")
    prompts_file: Optional[str] = opt(None, help="Prompts file: one prompt a line (# comments), or JSONL with a "
                                                 "\"prompt\" field.", group="inference")
    negative_prompt: str = opt("", help="Negative prompt (also passed through the adapter).", group="inference")
    steps: int = opt(30, help="Denoising steps per image.", group="inference", ge=1, le=1000)
    guidance: float = opt(7.5, help="Classifier-free guidance scale (1 = no guidance).", group="inference",
                          ge=0.0, le=100.0)
    seed: int = opt(0, help="Seed of the first image; image k uses seed + k.", group="inference", ge=0)
    size: Optional[int] = opt(None, help="Image side in pixels, a multiple of 8 (default: the model's, 512 for "
                                         "SD 1.5).", group="inference", ge=8, le=4096)
    batch_size: int = opt(4, help="Images rendered together (lower it if memory runs out).", group="running",
                          ge=1, le=1024)
    images_per_prompt: int = opt(1, help="Images per prompt, each with its own seed.", group="inference",
                                 ge=1, le=10000)
    dtype: DtypeName = opt("auto", help="Pipeline dtype; auto: float16 on CUDA, float32 otherwise.", group="running")
    device: str = opt("auto", help="Device: auto | cpu | cuda | cuda:I | mps.", group="running")
    scheduler: SchedulerName = opt("default", help="Sampler; default: the model's own scheduler.", group="inference")
    compare: bool = opt(False, help="Also render without the adapter at the same seeds; writes compare_grid.png.",
                        group="output")
    adapter_weight: Optional[float] = opt(None, help="Override the adapter's mixing weight in [0, 1] "
                                                     "(0 = no adapter effect).", group="model", ge=0.0, le=1.0)
    revision: Optional[str] = opt(None, help="Hub revision (branch, tag or commit) of --model.", group="model")
    overwrite: bool = opt(False, help="Replace the images of an earlier generate in --out (nothing else is "
                                      "deleted).", group="output")


# ----------------------------------------------------------------------------------- shared helpers


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:max_len].rstrip("-") or "prompt")


def grid_cell(image, minimum: int = 160) -> int:
    """Grid cell side for ``image``: its own size, but wide enough for the column headers
    (small images are scaled up)."""
    return max(max(image.size), minimum)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one a line; blank lines and ``#`` comments skipped) or a JSONL file
    (one object a line with a ``"prompt"`` string)."""
    p = Path(path)
    if not p.is_file():
        raise SurpipeError(f"prompts file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SurpipeError(f"prompts file {p} is not UTF-8 text: {e}") from None
    content = [(i, ln.strip()) for i, ln in enumerate(lines, 1) if ln.strip()]
    jsonl = p.suffix.lower() == ".jsonl" or (content and content[0][1].startswith("{"))
    prompts, problems = [], []
    for i, ln in content:
        if jsonl:
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                problems.append(f"line {i}: not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                problems.append(f"line {i}: needs a non-empty string \"prompt\"")
                continue
            prompts.append(obj["prompt"].strip())
        elif not ln.startswith("#"):
            prompts.append(ln)
    if problems:
        raise SurpipeError(f"prompts file {p} has bad lines:", problems[:20])
    if not prompts:
        raise SurpipeError(f"prompts file {p} holds no prompts")
    return prompts


def load_adapter(path: str, device, adapter_weight: Optional[float] = None):
    """(adapter in float32 on ``device``, its folder, its config.json as a dict)."""
    import dataclasses

    from surpipe.adapter import CONFIG_NAME, SURAdapter, resolve_adapter_dir

    folder = resolve_adapter_dir(path)
    adapter = SURAdapter.from_pretrained(folder, device=device)
    if adapter_weight is not None:
        if not 0.0 <= adapter_weight <= 1.0:
            raise SurpipeError(f"adapter_weight must be within [0, 1] (got {adapter_weight})")
        adapter.config = dataclasses.replace(adapter.config, adapter_weight=float(adapter_weight))
    check_adapter_finite(adapter, folder)
    saved = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    return adapter, folder, saved


def check_sd_model(model: str, revision: Optional[str] = None) -> Optional[int]:
    """Refuse early a local folder that is not a diffusers Stable Diffusion model; return the text
    encoder's width when it can be read without loading weights."""
    from surpipe.hub import check_model_source, read_model_config
    from surpipe.sd import check_pipeline_class

    check_model_source(model)
    local = Path(model).expanduser()
    if local.exists() or model.startswith((".", "/", "~")):
        if not local.is_dir():
            raise SurpipeError(f"model folder not found: {model}")
        index = local / "model_index.json"
        if not index.is_file():
            raise SurpipeError(f"{model} is not a diffusers Stable Diffusion folder (no model_index.json)")
        try:
            info = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SurpipeError(f"{index} is not valid JSON: {e}") from None
        missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if c not in info]
        if missing:
            raise SurpipeError(f"{model} is not a Stable Diffusion folder: model_index.json has no "
                               f"{', '.join(missing)} (a {info.get('_class_name', 'different')} pipeline?)")
    check_pipeline_class(model, revision)
    try:
        return int(read_model_config(model, "text_encoder", revision).get("hidden_size"))
    except (SurpipeError, TypeError, ValueError):
        return None  # the pipeline load will say what is wrong


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SurpipeError(f"--device {device}: CUDA is not available on this machine")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def versions() -> dict:
    import importlib.metadata as md
    import platform

    from surpipe import __version__

    out = {"surpipe": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "safetensors", "Pillow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def open_pipeline_and_adapter(model: str, adapter: str, *, revision, device: str, dtype: str, scheduler: str,
                              adapter_weight: Optional[float] = None):
    """Load and check everything before rendering: (pipe, adapter, adapter folder, adapter config,
    resolved device, torch dtype). Errors are SurpipeError with one clear message."""
    from surpipe import render

    dev = pick_device(device)
    tdtype = pick_dtype(dtype, dev)
    ad, folder, saved = load_adapter(adapter, dev, adapter_weight)  # cheap: fail before the big load
    width = check_sd_model(model, revision)
    if width is not None and width != ad.config.width:
        raise SurpipeError(f"the adapter is {ad.config.width} wide but {model}'s text encoder gives {width}-wide "
                           f"embeddings; use the adapter trained for this Stable Diffusion model")
    pipe = render.load_pipeline(model, revision=revision, device=dev, dtype=tdtype, scheduler=scheduler)
    render.check_width(pipe, ad)
    return pipe, ad, folder, saved, dev, tdtype


# ----------------------------------------------------------------------------------- the stage


def declared_problems(cfg) -> list[str]:
    """Every type, finiteness and range problem of a config built in Python (the checks ``from_dict``
    makes for the command line and config files)."""
    from surpipe import config as cfgmod

    try:
        cfgmod.from_dict(type(cfg), cfgmod.to_dict(cfg))
    except SurpipeError as e:
        return e.problems or [str(e)]
    return []


def _validate(cfg: GenerateConfig) -> list[str]:
    p = declared_problems(cfg)
    if not cfg.prompt and not cfg.prompts_file:
        p.append("give --prompt TEXT or --prompts-file FILE")
    if cfg.size is not None and cfg.size % 8:
        p.append(f"size must be a multiple of 8 (got {cfg.size})")
    return p


# Files a generate run writes at the top of --out; --overwrite deletes these and nothing else.
OWN_FILES = ("generate.json", "config.json", "compare_grid.png")


def _listing(items: list[Path], limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in items)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def prepare_out(out: Path, overwrite: bool) -> None:
    """Make sure ``out`` will hold only this run's images: a new or empty folder, or (with
    ``overwrite``) one holding only an earlier generate's files, which are deleted first.

    Never mixes old and new images; never deletes anything a generate did not write."""
    if out.exists() and not out.is_dir():
        raise SurpipeError(f"--out {out} is a file, not a folder: give a new or empty folder for the images")
    if not out.is_dir():
        return
    items = list(out.iterdir())
    if not items:
        return
    ours = [p for p in items if p.is_file() and (p.name in OWN_FILES or p.suffix.lower() == ".png")]
    foreign = [p for p in items if p not in ours]
    if not overwrite:
        raise SurpipeError(
            f"--out {out} is not empty (it holds {_listing(items)}); new images would mix with the old ones. "
            f"Give another --out folder, or --overwrite to replace an earlier generate's images there")
    if foreign:
        raise SurpipeError(
            f"--out {out} holds files that surpipe generate did not write ({_listing(foreign)}); --overwrite "
            f"only replaces an earlier generate's images. Give another --out folder")
    for p in ours:
        p.unlink()


def finished_run(out: Path, cfg) -> Optional[dict]:
    """The record of an earlier run into ``out`` with the same settings, the same adapter weights
    (sha256) and every image still present; None otherwise (a rerun of it has nothing to do)."""
    from surpipe import config as cfgmod
    from surpipe.safeload import file_sha256

    try:
        rec = json.loads((out / "generate.json").read_text(encoding="utf-8"))
        old = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not isinstance(old, dict) or not isinstance(rec.get("images"), list):
        return None
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_") and k != "overwrite"}  # noqa: E731
    if strip(old) != strip(cfgmod.to_dict(cfg)):
        return None
    try:
        from surpipe.adapter import WEIGHTS_NAME, resolve_adapter_dir

        if rec.get("adapter_sha256") != file_sha256(resolve_adapter_dir(cfg.adapter) / WEIGHTS_NAME):
            return None
        files = [r["file"] for r in rec["images"]] + ([rec["grid"]] if rec.get("grid") else [])
    except (SurpipeError, OSError, KeyError, TypeError):
        return None
    return rec if all(isinstance(f, str) and (out / f).is_file() for f in files) else None


def check_adapter_finite(adapter, folder: Path) -> None:
    """Refuse an adapter with NaN/Inf weights, naming the file and the first bad tensors."""
    import torch

    from surpipe.adapter import WEIGHTS_NAME

    bad = [n for n, t in adapter.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SurpipeError(f"the adapter {folder / WEIGHTS_NAME} has non-finite (NaN or Inf) weights in "
                           f"{len(bad)} tensor(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; it would "
                           f"render blank images. Use an earlier checkpoint (RUN/checkpoints) or retrain")


def run(cfg: GenerateConfig) -> dict:
    """Render the prompts (and, with ``compare``, the same without the adapter); return the record
    written to ``OUT/generate.json``."""
    from surpipe import config as cfgmod
    from surpipe import render
    from surpipe.adapter import WEIGHTS_NAME
    from surpipe.safeload import file_sha256

    problems = _validate(cfg)
    if problems:
        raise SurpipeError("invalid generate settings:", problems)
    prompts = ([cfg.prompt] if cfg.prompt else []) + (read_prompts(cfg.prompts_file) if cfg.prompts_file else [])
    items = [(p, cfg.seed + i * cfg.images_per_prompt + j)
             for i, p in enumerate(prompts) for j in range(cfg.images_per_prompt)]
    t0 = time.perf_counter()
    out = Path(cfg.out)
    if not cfg.overwrite and out.is_dir():
        done = finished_run(out, cfg)
        if done is not None:
            print(f"surpipe: {out} already holds this generate's {len(done['images'])} image(s) (same settings "
                  f"and adapter): nothing to do (--overwrite renders them again)", file=sys.stderr)
            return done
    prepare_out(out, cfg.overwrite)  # before loading anything: a wrong --out fails at once
    pipe, adapter, folder, saved, dev, tdtype = open_pipeline_and_adapter(
        cfg.model, cfg.adapter, revision=cfg.revision, device=cfg.device, dtype=cfg.dtype,
        scheduler=cfg.scheduler, adapter_weight=cfg.adapter_weight)
    note = render.tiny_model_note(cfg.model)
    if note:
        print(f"surpipe: note: {note}", file=sys.stderr, flush=True)
    texts, seeds = [p for p, _ in items], [s for _, s in items]
    kw = dict(seeds=seeds, steps=cfg.steps, guidance=cfg.guidance, size=cfg.size,
              negative_prompt=cfg.negative_prompt, batch_size=cfg.batch_size)
    print(f"surpipe: generating {len(items)} image(s){' x 2 (compare)' if cfg.compare else ''} on {dev}",
          file=sys.stderr, flush=True)
    arms = [("without", None), ("with", adapter)] if cfg.compare else [("", adapter)]
    images, records = {}, []
    for arm, ad in arms:  # render everything first: a failure leaves no partial set of images
        images[arm] = render.render(pipe, texts, adapter=ad, desc=f"generate{': ' + arm + ' adapter' if arm else ''}",
                                    **kw)
    out.mkdir(parents=True, exist_ok=True)
    prepare_out(out, cfg.overwrite)  # again: another job may have written there meanwhile
    for arm, _ in arms:
        for k, ((prompt, seed), im) in enumerate(zip(items, images[arm])):
            name = f"{k:04d}_{slug(prompt)}_s{seed}{'_' + arm if arm else ''}.png"
            im.save(out / name)
            records.append({"index": k, "prompt": prompt, "seed": seed, "adapter": arm != "without",
                            "file": name})
    grid = None
    if cfg.compare:
        rows = [(f"{p}  (seed {s})", [a, b]) for (p, s), a, b in zip(items, images["without"], images["with"])]
        g = render.caption_grid(rows, headers=["Stable Diffusion", "+ SUR-adapter"],
                                cell=grid_cell(images["with"][0]), note=note)
        grid = "compare_grid.png"
        g.save(out / grid)
    first = next(iter(images.values()))[0]
    record = {
        "model": cfg.model,
        "revision": cfg.revision,
        "adapter": str(folder.resolve()),
        "adapter_config": saved,
        "adapter_sha256": file_sha256(folder / WEIGHTS_NAME),
        "adapter_weight": adapter.adapter_weight,
        "prompts": prompts,
        "negative_prompt": cfg.negative_prompt,
        "seeds": seeds,
        "images_per_prompt": cfg.images_per_prompt,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "scheduler": cfg.scheduler,
        "scheduler_class": type(pipe.scheduler).__name__,
        "size": [first.width, first.height],
        "batch_size": cfg.batch_size,
        "dtype": str(tdtype).removeprefix("torch."),
        "adapter_dtype": str(adapter.dtype).removeprefix("torch."),
        "device": dev,
        "generator": "torch.Generator('cpu').manual_seed(seed), one per image",
        "compare": cfg.compare,
        "grid": grid,
        "tiny_models": note,
        "images": records,
        "seconds": round(time.perf_counter() - t0, 2),
        "versions": versions(),
    }
    (out / "generate.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    cfgmod.save(cfg, out / "config.json")
    print(f"surpipe: wrote {len(records)} image(s){' and ' + grid if grid else ''} to {out}", file=sys.stderr)
    return record
