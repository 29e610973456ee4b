"""Inference with a trained SUR-adapter: what ``surpipe generate`` and ``surpipe eval`` share.

The options both commands declare, opening and checking the adapter and the stock Stable
Diffusion pipeline (:func:`open_models`: cheap checks first, so a wrong argument fails before the
big load; devices and dtypes come from :mod:`surpipe.devices`), prompt files, rendering both arms
(without / with the adapter) at the same seeds, image file names, and generate's output folder
rules (never mix old and new images; a finished run is not redone). Rendering itself and the
grids are in :mod:`surpipe.evaluation.render`.

Importing this module loads no torch (the CLI's ``--help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from surpipe import config as cfgmod
from surpipe.config import read_json_object
from surpipe.devices import resolve_device, resolve_dtype, torch_dtype
from surpipe.errors import SurpipeError
from surpipe.evaluation import render
from surpipe.evaluation.render import SCHEDULERS
from surpipe.hub import check_model_source, is_local_model, read_model_config
from surpipe.safeload import file_sha256
from surpipe.sd import check_pipeline_class
from surpipe.store import library_versions

SchedulerName = Literal[SCHEDULERS]  # the choices of surpipe.evaluation.render, never a copy
DtypeName = Literal["auto", "float32", "float16", "bfloat16"]

# Files a generate run writes at the top of --out; --overwrite deletes these and nothing else.
OWN_FILES = ("generate.json", "config.json", "compare_grid.png")



def size_problems(size) -> list[str]:
    """The ``--size`` rule generate and eval share beyond its range: a multiple of 8 (the VAE's)."""
    return [f"size must be a multiple of 8 (got {size})"] if size is not None and size % 8 else []


# ----------------------------------------------------------------------------------- small helpers


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:max_len].rstrip("-") or "prompt")


def image_name(index: int, prompt: str, seed: int, arm: str = "", digits: int = 4) -> str:
    """``0003_a-red-bird_s7_with.png``: index, prompt slug, seed and arm (if any)."""
    return f"{index:0{digits}d}_{slug(prompt)}_s{seed}{'_' + arm if arm else ''}.png"


def text_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of every non-blank line of a UTF-8 text file; ``what`` names
    the file in the message when it cannot be read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SurpipeError(f"{what} {path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise SurpipeError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    return [(i, ln.strip()) for i, ln in enumerate(lines, 1) if ln.strip()]


def json_lines(lines: Sequence[tuple[int, str]], fields: Sequence[str]) -> tuple[list[dict], list[str]]:
    """The objects of numbered JSON lines, each reduced to its ``fields`` (non-empty strings,
    stripped), and one problem per bad line."""
    objs, problems = [], []
    quoted = " and ".join(f'"{f}"' for f in fields)
    need = ("a non-empty string " if len(fields) == 1 else "non-empty strings ") + quoted
    for i, ln in lines:
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            problems.append(f"line {i}: not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or not all(isinstance(obj.get(f), str) and obj[f].strip() for f in fields):
            problems.append(f"line {i}: needs {need}")
            continue
        objs.append({f: obj[f].strip() for f in fields})
    return objs, problems


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one a line; blank lines and ``#`` comments skipped) or a JSONL file
    (one object a line with a ``"prompt"`` string)."""
    p = Path(path)
    if not p.is_file():
        raise SurpipeError(f"prompts file not found: {p}")
    content = text_lines(p, "prompts file")
    if p.suffix.lower() == ".jsonl" or (content and content[0][1].startswith("{")):
        objs, problems = json_lines(content, ("prompt",))
        prompts = [o["prompt"] for o in objs]
    else:
        prompts, problems = [ln for _, ln in content if not ln.startswith("#")], []
    refuse_bad_lines("prompts file", p, problems, prompts)
    return prompts


def refuse_bad_lines(what: str, path: Path, problems: list[str], found) -> None:
    """Refuse a prompts file with bad lines (the first 20 named) or without any prompt."""
    if problems:
        raise SurpipeError(f"{what} {path} has bad lines:", problems[:20])
    if not found:
        raise SurpipeError(f"{what} {path} holds no prompts")


def versions() -> dict:
    """Python's version and those of the libraries that shape results (the store's list: one home)."""
    return {"python": platform.python_version(), **library_versions()}


# ----------------------------------------------------------------------------------- opening models


def check_adapter_finite(adapter, folder: Path) -> None:
    """Refuse an adapter with NaN/Inf weights, naming the file and the first bad tensors."""
    import torch  # heavy: keeps --help torch-free (surpipe.adapter imports torch too)

    from surpipe.adapter import WEIGHTS_NAME

    bad = [n for n, t in adapter.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SurpipeError(f"the adapter {folder / WEIGHTS_NAME} has non-finite (NaN or Inf) weights in "
                           f"{len(bad)} tensor(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; it would "
                           f"render blank images. Use an earlier checkpoint (RUN/checkpoints) or retrain")


def load_adapter(path: str, device, adapter_weight: Optional[float] = None):
    """(adapter in float32 on ``device``, its folder, its config.json as a dict)."""
    from surpipe.adapter import CONFIG_NAME, SURAdapter, resolve_adapter_dir  # heavy: imports torch

    folder = resolve_adapter_dir(path)
    adapter = SURAdapter.from_pretrained(folder, device=device)
    if adapter_weight is not None:
        if not 0.0 <= adapter_weight <= 1.0:
            raise SurpipeError(f"adapter_weight must be within [0, 1] (got {adapter_weight})")
        adapter.config = dataclasses.replace(adapter.config, adapter_weight=float(adapter_weight))
    check_adapter_finite(adapter, folder)
    return adapter, folder, read_json_object(folder / CONFIG_NAME)


def check_sd_model(model: str, revision: Optional[str] = None) -> Optional[int]:
    """Refuse early a local folder that is not a diffusers Stable Diffusion model; return the text
    encoder's width when it can be read without loading weights."""
    check_model_source(model)
    local = Path(model).expanduser()
    if is_local_model(model):
        if not local.is_dir():
            raise SurpipeError(f"model folder not found: {model}")
        index = local / "model_index.json"
        if not index.is_file():
            raise SurpipeError(f"{model} is not a diffusers Stable Diffusion folder (no model_index.json)")
        info = read_json_object(index)
        xl = info.get("_class_name") == "StableDiffusionXLPipeline"
        needed = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (
            ("text_encoder_2", "tokenizer_2") if xl else ())
        missing = [c for c in needed if c not in info]
        if missing:
            raise SurpipeError(f"{model} is not a Stable Diffusion folder: model_index.json has no "
                               f"{', '.join(missing)} (a {info.get('_class_name', 'different')} pipeline?)")
    family = check_pipeline_class(model, revision, accept=("sd", "sdxl"))
    try:
        encoders = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
        return sum(int(read_model_config(model, e, revision).get("hidden_size")) for e in encoders)
    except (SurpipeError, TypeError, ValueError):
        return None  # the pipeline load will say what is wrong


@dataclass
class Models:
    """A loaded stock pipeline and adapter, with where they came from and how they run."""

    model: str
    revision: Optional[str]
    pipe: Any
    adapter: Any
    folder: Path  # the adapter folder
    adapter_config: dict  # its config.json
    device: str
    dtype: Any  # torch dtype of the pipeline

    def describe(self) -> dict:
        """What a result record says about the models (same keys in generate.json and results.json)."""
        return {"model": self.model, "revision": self.revision, "adapter": str(self.folder.resolve()),
                "adapter_config": self.adapter_config, "adapter_weight": self.adapter.adapter_weight,
                "scheduler_class": type(self.pipe.scheduler).__name__,
                "dtype": str(self.dtype).removeprefix("torch."), "device": self.device}


def open_models(model: str, adapter: str, *, revision, device: str, dtype: str, scheduler: str,
                adapter_weight: Optional[float] = None) -> Models:
    """Load and check everything before rendering. Errors are SurpipeError with one clear message;
    the adapter and the model's config are checked before the pipeline's weights load."""
    dev = resolve_device(device, mps=True)
    tdtype = torch_dtype(resolve_dtype(dtype, dev, cuda="float16"))  # SD pipelines run in float16 on GPUs
    ad, folder, saved = load_adapter(adapter, dev, adapter_weight)  # cheap: fail before the big load
    width = check_sd_model(model, revision)
    if width is not None and width != ad.config.width:
        raise SurpipeError(f"the adapter is {ad.config.width} wide but {model}'s text encoder gives {width}-wide "
                           f"embeddings; use the adapter trained for this Stable Diffusion model")
    pipe = render.load_pipeline(model, revision=revision, device=dev, dtype=tdtype, scheduler=scheduler)
    render.check_width(pipe, ad)
    return Models(model, revision, pipe, ad, folder, saved, dev, tdtype)


def render_arms(models: Models, prompts: Sequence[str], *, arms: Sequence[str], label: str, **kw) -> dict:
    """{arm: images} for each arm of ``arms``: ``"without"`` renders without the adapter, any other
    name (``"with"``, ``""``) with it; the same seeds in every arm, so the pairs differ by the
    adapter only. Everything is rendered before anything is written: a failure leaves no partial set."""
    return {arm: render.render(models.pipe, prompts, adapter=None if arm == "without" else models.adapter,
                               desc=label + (f": {arm} adapter" if arm else ""), **kw) for arm in arms}


# ----------------------------------------------------------------------------------- generate's --out


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


def adapter_sha256(adapter: str | Path) -> str:
    """sha256 of the adapter's weights file (``adapter``: a run folder or an adapter folder)."""
    from surpipe.adapter import WEIGHTS_NAME, resolve_adapter_dir  # heavy: imports torch

    return file_sha256(resolve_adapter_dir(adapter) / WEIGHTS_NAME)


def finished_run(out: Path, cfg) -> Optional[dict]:
    """The record of an earlier run into ``out`` with the same settings, the same adapter weights
    (sha256) and every image still present; None otherwise (a rerun of it has nothing to do)."""
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
        if rec.get("adapter_sha256") != adapter_sha256(cfg.adapter):
            return None
        files = [r["file"] for r in rec["images"]] + ([rec["grid"]] if rec.get("grid") else [])
    except (SurpipeError, OSError, KeyError, TypeError):
        return None
    return rec if all(isinstance(f, str) and (out / f).is_file() for f in files) else None


def save_images(out: Path, items: Sequence[tuple[str, int]], images: dict) -> list[dict]:
    """Write each arm's images for ``items`` ((prompt, seed) pairs) into ``out``; their records."""
    records = []
    for arm, ims in images.items():
        for k, ((prompt, seed), im) in enumerate(zip(items, ims)):
            name = image_name(k, prompt, seed, arm)
            im.save(out / name)
            records.append({"index": k, "prompt": prompt, "seed": seed, "adapter": arm != "without", "file": name})
    return records
