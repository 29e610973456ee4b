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
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from surpipe.errors import SurpipeError
from surpipe.render import SCHEDULERS

SchedulerName = Literal[SCHEDULERS]  # the choices of surpipe.render, never a copy
DtypeName = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass
class GenerateConfig:
    """Settings of ``surpipe generate``. Give ``prompt`` or ``prompts_file`` (or both)."""

    model: str
    adapter: str
    out: str
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None  # one prompt a line (# comments), or JSONL with "prompt"
    negative_prompt: str = ""
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0
    size: Optional[int] = None  # default: the model's (512 for SD 1.5)
    batch_size: int = 4
    images_per_prompt: int = 1
    dtype: DtypeName = "auto"  # auto: float16 on CUDA, float32 otherwise
    device: str = "auto"  # auto | cpu | cuda | cuda:I | mps
    scheduler: SchedulerName = "default"
    compare: bool = False  # also render without the adapter; side-by-side grid
    adapter_weight: Optional[float] = None  # override the adapter's mixing weight (0 = no adapter effect)
    revision: Optional[str] = None


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


def resolve_adapter_dir(path: str) -> Path:
    """A run folder (uses RUN/adapter) or an adapter folder -> the adapter folder."""
    from surpipe.adapter import CONFIG_NAME, WEIGHTS_NAME

    p = Path(path).expanduser()
    if not p.exists():
        raise SurpipeError(f"adapter folder not found: {p} (give a training run folder or an adapter folder)")
    if not p.is_dir():
        raise SurpipeError(f"--adapter {p} is not a folder: give a training run folder or an adapter folder "
                           f"({CONFIG_NAME} + {WEIGHTS_NAME}); for the authors' .pt run `surpipe import-official`")
    if (p / "adapter" / WEIGHTS_NAME).is_file():
        return p / "adapter"
    if (p / WEIGHTS_NAME).is_file():
        return p
    is_run = (p / "adapter").exists() or (p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file()
    hint = " (a training run without a finished adapter/: run or resume `surpipe train`)" if is_run else ""
    raise SurpipeError(f"{p} is neither a training run folder (with adapter/) nor an adapter folder "
                       f"(with {CONFIG_NAME} and {WEIGHTS_NAME}){hint}")


def load_adapter(path: str, device, adapter_weight: Optional[float] = None):
    """(adapter in float32 on ``device``, its folder, its config.json as a dict)."""
    import dataclasses

    from surpipe.adapter import CONFIG_NAME, SURAdapter

    folder = resolve_adapter_dir(path)
    adapter = SURAdapter.from_pretrained(folder, device=device)
    if adapter_weight is not None:
        if not 0.0 <= adapter_weight <= 1.0:
            raise SurpipeError(f"adapter_weight must be within [0, 1] (got {adapter_weight})")
        adapter.config = dataclasses.replace(adapter.config, adapter_weight=float(adapter_weight))
    saved = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    return adapter, folder, saved


def check_sd_model(model: str, revision: Optional[str] = None) -> Optional[int]:
    """Refuse early a local folder that is not a diffusers Stable Diffusion model; return the text
    encoder's width when it can be read without loading weights."""
    from surpipe.hub import read_model_config

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


def _validate(cfg: GenerateConfig) -> list[str]:
    p = []
    if not cfg.prompt and not cfg.prompts_file:
        p.append("give --prompt TEXT or --prompts-file FILE")
    for name in ("steps", "batch_size", "images_per_prompt"):
        if getattr(cfg, name) < 1:
            p.append(f"{name} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.size is not None and (cfg.size < 8 or cfg.size % 8):
        p.append(f"size must be a positive multiple of 8 (got {cfg.size})")
    if cfg.seed < 0:
        p.append(f"seed must be >= 0 (got {cfg.seed})")
    if cfg.adapter_weight is not None and not 0.0 <= cfg.adapter_weight <= 1.0:
        p.append(f"adapter_weight must be within [0, 1] (got {cfg.adapter_weight})")
    return p


def run(cfg: GenerateConfig) -> dict:
    """Render the prompts (and, with ``compare``, the same without the adapter); return the record
    written to ``OUT/generate.json``."""
    from surpipe import config as cfgmod
    from surpipe import render

    problems = _validate(cfg)
    if problems:
        raise SurpipeError("invalid generate settings:", problems)
    prompts = ([cfg.prompt] if cfg.prompt else []) + (read_prompts(cfg.prompts_file) if cfg.prompts_file else [])
    items = [(p, cfg.seed + i * cfg.images_per_prompt + j)
             for i, p in enumerate(prompts) for j in range(cfg.images_per_prompt)]
    t0 = time.perf_counter()
    pipe, adapter, folder, saved, dev, tdtype = open_pipeline_and_adapter(
        cfg.model, cfg.adapter, revision=cfg.revision, device=cfg.device, dtype=cfg.dtype,
        scheduler=cfg.scheduler, adapter_weight=cfg.adapter_weight)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    texts, seeds = [p for p, _ in items], [s for _, s in items]
    kw = dict(seeds=seeds, steps=cfg.steps, guidance=cfg.guidance, size=cfg.size,
              negative_prompt=cfg.negative_prompt, batch_size=cfg.batch_size)
    print(f"surpipe: generating {len(items)} image(s){' x 2 (compare)' if cfg.compare else ''} on {dev}",
          file=sys.stderr, flush=True)
    arms = [("without", None), ("with", adapter)] if cfg.compare else [("", adapter)]
    images, records = {}, []
    for arm, ad in arms:
        images[arm] = render.render(pipe, texts, adapter=ad, desc=f"generate{': ' + arm + ' adapter' if arm else ''}",
                                    **kw)
        for k, ((prompt, seed), im) in enumerate(zip(items, images[arm])):
            name = f"{k:04d}_{slug(prompt)}_s{seed}{'_' + arm if arm else ''}.png"
            im.save(out / name)
            records.append({"index": k, "prompt": prompt, "seed": seed, "adapter": arm != "without",
                            "file": name})
    grid = None
    if cfg.compare:
        rows = [(f"{p}  (seed {s})", [a, b]) for (p, s), a, b in zip(items, images["without"], images["with"])]
        g = render.caption_grid(rows, headers=["Stable Diffusion", "+ SUR-adapter"], cell=grid_cell(images["with"][0]))
        grid = "compare_grid.png"
        g.save(out / grid)
    first = next(iter(images.values()))[0]
    record = {
        "model": cfg.model,
        "revision": cfg.revision,
        "adapter": str(folder.resolve()),
        "adapter_config": saved,
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
        "images": records,
        "seconds": round(time.perf_counter() - t0, 2),
        "versions": versions(),
    }
    (out / "generate.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    cfgmod.save(cfg, out / "config.json")
    print(f"surpipe: wrote {len(records)} image(s){' and ' + grid if grid else ''} to {out}", file=sys.stderr)
    return record
