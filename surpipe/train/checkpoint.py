"""Training checkpoints: written atomically, pruned, found, and loaded with every damage check.

A checkpoint is ``OUT/checkpoints/step-<8 digits>/`` holding ``adapter/`` (save_pretrained layout),
``projection.safetensors``, ``optimizer.pt`` (optimizer, LR schedule, fp16 scaler), ``rng.safetensors``
(torch CPU/CUDA and the recipe's generator) and ``state.json`` (step, data position). It is written
under ``.tmp-step-*`` and appears by one rename, so a folder named ``step-*`` is complete unless
something outside surpipe damaged it; loading reports such damage, never falls back silently.
Hand-written rather than ``accelerator.save_state``: that one neither renames atomically nor
checks what it loads (shapes, finiteness, the step of every part).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from surpipe.errors import SurpipeError, first_line


class Damaged(Exception):
    """A checkpoint file that is not what surpipe wrote (the caller words the message)."""


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders (``step-<8 digits>``), oldest first. They appear by one atomic
    rename, so a damaged one (even without state.json) is reported at load, never skipped."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and p.is_dir())


def latest(ckpt_dir: Path) -> Optional[Path]:
    """The newest checkpoint folder, or None."""
    done = checkpoints(ckpt_dir)
    return done[-1] if done else None


def clean_stale_tmp(ckpt_dir: Path) -> list[Path]:
    """Delete the ``.tmp-step-*`` folders that killed runs left in the checkpoint folder (only
    those; call it only with the run folder's lock held, so no live writer owns one)."""
    if not ckpt_dir.is_dir():
        return []
    stale = [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-step-") and p.is_dir() and not p.is_symlink()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def write_failure(out: Path, what: str, e: Exception) -> str:
    """The message of a failed write into run folder ``out``: what failed, what is kept, what to do."""
    import errno as _errno

    full = getattr(e, "errno", None) == _errno.ENOSPC or "No space left" in str(e)
    why = "no space left on device" if full else f"write failed: {getattr(e, 'strerror', None) or e}"
    prev = latest(out / "checkpoints")
    kept = (f"the previous checkpoint {prev.name} (step {prev.name[5:].lstrip('0') or 0}) is intact"
            if prev else "no earlier checkpoint exists")
    return (f"{why} while writing the {what} of run folder {out}; nothing of it was kept and {kept}. "
            f"{'Free space' if full else 'Fix the disk'}, then rerun the same command: it resumes from the "
            "latest checkpoint")


def save_checkpoint(out: Path, step: int, *, adapter, projection, optimizer, lr_scheduler, scaler, gen,
                    position: Optional[dict], max_steps: int, keep: int) -> Path:
    """Write checkpoint ``step`` of run folder ``out`` (unwrapped ``adapter`` and ``projection``)
    under a temporary name, rename it, then prune all but the newest ``keep``.

    A failed write (full disk, I/O error) raises SurpipeError; the earlier checkpoints are kept."""
    import torch
    from safetensors.torch import save_file

    ckpt_dir = out / "checkpoints"
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        adapter.save_pretrained(tmp / "adapter")
        projection.save(tmp / "projection.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None}, tmp / "optimizer.pt")
        rng = {"torch_cpu": torch.get_rng_state(), "generator": gen.get_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        # no Python `random` state: nothing in training draws from it (older checkpoints that hold
        # "python_random" still load; the key is ignored)
        state = {"step": step, "position": position, "max_steps": max_steps}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise SurpipeError(write_failure(out, f"checkpoint step-{step:08d}", e)) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # publishes a whole folder: one rename, not a file write
    for old in checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_final(out: Path, adapter, projection, name: str = "adapter", note: Optional[dict] = None) -> None:
    """The final adapter in ``OUT/<name>`` (save_pretrained layout) with ``llm_projection.safetensors``
    (and ``note`` as ``<name>.json`` inside), replaced by one rename."""
    tmp = out / f".tmp-{name}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        adapter.save_pretrained(tmp)
        projection.save(tmp / "llm_projection.safetensors")
        if note is not None:
            (tmp / f"{name}.json").write_text(json.dumps(note, indent=2) + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SurpipeError(write_failure(out, "final adapter" if name == "adapter" else f"{name} adapter", e)) from None
    final = out / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def best_score(out: Path) -> Optional[float]:
    """The ``--keep-best`` score recorded in ``OUT/best/best.json`` (None when there is none)."""
    try:
        score = json.loads((out / "best" / "best.json").read_text())["score"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None


def final_adapter_stale(out: Path) -> bool:
    """True when OUT/adapter is missing or older than the latest checkpoint (killed in between)."""
    from surpipe.adapter import WEIGHTS_NAME

    final = out / "adapter" / WEIGHTS_NAME
    last = latest(out / "checkpoints")
    if not final.is_file():
        return True
    return last is not None and final.stat().st_mtime_ns < (last / "state.json").stat().st_mtime_ns


def load_checkpoint(path: Path, *, adapter, projection, optimizer, lr_scheduler, scaler, gen, num_blocks: int,
                    block_rows: int) -> tuple[int, dict]:
    """Restore checkpoint ``path`` into the given (unwrapped) modules, optimizer, schedule, scaler and
    generator; returns ``(step, data position)``. A damaged one raises SurpipeError naming the file
    and the previous checkpoint (deleting the damaged folder is the user's choice)."""
    try:
        return _load(path, adapter, projection, optimizer, lr_scheduler, scaler, gen, num_blocks, block_rows)
    except Damaged as e:
        earlier = [p for p in checkpoints(path.parent) if p.name < path.name]
        todo = (f"delete {path} to resume from the previous checkpoint {earlier[-1].name}" if earlier
                else f"it is the only checkpoint: delete {path} to start the run over from step 0")
        raise SurpipeError(f"checkpoint {path} cannot be loaded, it is damaged: {e}; {todo}") from None


def _load(path, adapter, projection, optimizer, lr_scheduler, scaler, gen, num_blocks, block_rows):
    import torch

    from surpipe.safeload import load_torch_file

    # state.json first: cheap, and it says which step the rest must belong to
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Damaged(f"state.json is missing, unreadable or truncated ({e})") from None
    step, pos = (state.get("step"), state.get("position")) if isinstance(state, dict) else (None, None)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or f"step-{step:08d}" != path.name:
        raise Damaged(f"state.json has step {step!r}, not the step of {path.name}")
    if not (isinstance(pos, dict) and set(pos) == {"epoch", "block_idx", "row_idx"}
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pos.values())
            and pos["block_idx"] <= num_blocks and pos["row_idx"] < block_rows):
        raise Damaged(f"state.json has an invalid data position {pos!r}")

    # weights: shapes checked against this run's modules before any tensor is read
    try:
        acfg = json.loads((path / "adapter" / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Damaged(f"adapter/config.json is unreadable ({e})") from None
    if not isinstance(acfg, dict):
        raise Damaged("adapter/config.json does not hold a JSON object")
    for k in ("width", "nhead", "dim_feedforward", "num_layers", "token_mixing", "adapter_weight"):
        if acfg.get(k) != getattr(adapter.config, k):
            raise Damaged(f"adapter/config.json has {k} {acfg.get(k)!r} where this run's adapter has "
                          f"{getattr(adapter.config, k)!r}")
    _load_weights(adapter, path / "adapter" / "model.safetensors", "adapter/model.safetensors")
    _load_weights(projection, path / "projection.safetensors", "projection.safetensors")

    # optimizer and schedule: read with weights_only (no pickled code runs), then checked
    try:
        opt = load_torch_file(path / "optimizer.pt", "optimizer state")
    except SurpipeError as e:
        raise Damaged(str(e)) from None
    if not (isinstance(opt, dict) and isinstance(opt.get("optimizer"), dict)
            and isinstance(opt.get("lr_scheduler"), dict)):
        raise Damaged("optimizer.pt does not hold an optimizer state (a dict with 'optimizer' and "
                      "'lr_scheduler')")
    try:
        optimizer.load_state_dict(opt["optimizer"])
        _check_optimizer(optimizer)
        lr_scheduler.load_state_dict(dict(opt["lr_scheduler"]))
        last = lr_scheduler.get_last_lr()
        if lr_scheduler.last_epoch != step or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in last):
            raise ValueError(f"the learning-rate schedule is at step {lr_scheduler.last_epoch!r}, "
                             f"the checkpoint at {step}")
        if opt.get("scaler") and scaler:
            scaler.load_state_dict(opt["scaler"])
    except Damaged:
        raise
    except Exception as e:  # torch raises ValueError, KeyError, TypeError ... for a wrong state
        raise Damaged(f"optimizer.pt does not match this run's optimizer ({first_line(e)})") from None

    # RNG states
    try:
        from safetensors.torch import load_file

        rng = load_file(str(path / "rng.safetensors"))
    except Exception as e:
        raise Damaged(f"rng.safetensors is unreadable ({first_line(e)})") from None
    missing = [k for k in ("torch_cpu", "generator") if k not in rng]
    if missing:
        raise Damaged(f"rng.safetensors lacks {', '.join(missing)}")
    try:
        torch.set_rng_state(rng["torch_cpu"])
        gen.set_state(rng["generator"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
    except Exception as e:
        raise Damaged(f"rng.safetensors holds an invalid RNG state ({type(e).__name__}: "
                      f"{(str(e).strip().splitlines() or [''])[0]})") from None
    return step, pos


def _load_weights(module, path: Path, name: str) -> None:
    """Load a safetensors file into ``module`` strictly, checking names, shapes and finiteness
    before reading any tensor (a damaged header cannot make us allocate)."""
    import torch
    from safetensors import safe_open

    want = module.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if keys != set(want):
                extra, missing = sorted(keys - set(want)), sorted(set(want) - keys)
                raise Damaged(f"{name} does not hold this run's tensors (unexpected {extra[:3]}, missing {missing[:3]})")
            for k in sorted(keys):
                shape = tuple(f.get_slice(k).get_shape())
                if shape != tuple(want[k].shape):
                    raise Damaged(f"{name}: tensor {k} has shape {list(shape)}, this run's has {list(want[k].shape)}")
            tensors = {k: f.get_tensor(k) for k in keys}
    except Damaged:
        raise
    except Exception as e:
        raise Damaged(f"{name} is unreadable ({first_line(e)})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise Damaged(f"{name} holds non-finite values (in {', '.join(bad[:3])})")
    module.load_state_dict(tensors)


def _check_optimizer(optimizer) -> None:
    """Raise Damaged when the loaded AdamW state does not fit its parameters (torch checks only the
    group sizes: a moment of another shape would fail at the next step)."""
    import torch

    for group in optimizer.param_groups:
        for k in ("lr", "eps", "weight_decay"):
            v = group.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise Damaged(f"optimizer.pt has an invalid {k} {v!r}")
        betas = group.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and math.isfinite(b) for b in betas)):
            raise Damaged(f"optimizer.pt has invalid betas {betas!r}")
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    raise Damaged(f"optimizer.pt: state {k!r} is a {type(v).__name__}, not a tensor")
                if k != "step" and tuple(v.shape) != tuple(p.shape):
                    raise Damaged(f"optimizer.pt: state {k!r} has shape {list(v.shape)} for a parameter of "
                                  f"shape {list(p.shape)}")
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise Damaged(f"optimizer.pt: state {k!r} holds non-finite values")
