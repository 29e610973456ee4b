"""What a training checkpoint holds, written and loaded with every damage check.

A checkpoint folder (its place in the run folder, its name and its atomic publication are
:class:`surpipe.train.run_folder.RunFolder`'s) holds ``adapter/`` (save_pretrained layout),
``projection.safetensors``, ``optimizer.pt`` (optimizer, LR schedule, fp16 scaler),
``rng.safetensors`` (torch CPU/CUDA and the recipe's generator) and ``state.json`` (step, data
position). Loading reports damage (:class:`Damaged`), never falls back silently.
Hand-written rather than ``accelerator.save_state``: that one neither renames atomically nor
checks what it loads (shapes, finiteness, the step of every part).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from surpipe.errors import SurpipeError, first_line
from surpipe.safeload import load_torch_file
from surpipe.train.run_layout import CK_ADAPTER, CK_OPTIMIZER, CK_PROJECTION, CK_RNG, CK_STATE, step_name


class Damaged(Exception):
    """A checkpoint file that is not what surpipe wrote (the caller words the message)."""


def write_parts(folder: Path, step: int, *, adapter, projection, optimizer, lr_scheduler, scaler, gen,
                position: Optional[dict], max_steps: int) -> None:
    """Write every part of checkpoint ``step`` into the (new, empty) ``folder``: unwrapped
    ``adapter`` and ``projection``, optimizer, schedule, scaler, RNG states and data position."""
    # heavy: torch and safetensors (the train stage imports this module torch-free)
    import torch
    from safetensors.torch import save_file

    adapter.save_pretrained(folder / CK_ADAPTER)
    projection.save(folder / CK_PROJECTION)
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None}, folder / CK_OPTIMIZER)
    rng = {"torch_cpu": torch.get_rng_state(), "generator": gen.get_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(folder / CK_RNG))
    # no Python `random` state: nothing in training draws from it (older checkpoints that hold
    # "python_random" still load; the key is ignored)
    state = {"step": step, "position": position, "max_steps": max_steps}
    (folder / CK_STATE).write_text(json.dumps(state, indent=2))


def load_parts(path: Path, *, adapter, projection, optimizer, lr_scheduler, scaler, gen, num_blocks: int,
               block_rows: int) -> tuple[int, dict]:
    """Restore checkpoint ``path`` into the given (unwrapped) modules, optimizer, schedule, scaler and
    generator; returns ``(step, data position)``. Raises :class:`Damaged` saying what is wrong."""
    from surpipe.adapter_io import WEIGHTS_NAME  # heavy: torch (the adapter's file names live there)

    # state.json first: cheap, and it says which step the rest must belong to
    step, pos = _read_state(path, num_blocks, block_rows)
    _check_adapter_config(path, adapter)
    _load_weights(adapter, path / CK_ADAPTER / WEIGHTS_NAME, f"{CK_ADAPTER}/{WEIGHTS_NAME}")
    _load_weights(projection, path / CK_PROJECTION, CK_PROJECTION)
    _load_optimizer(path, step, optimizer, lr_scheduler, scaler)
    _load_rng(path, gen)
    return step, pos


def _read_state(path: Path, num_blocks: int, block_rows: int) -> tuple[int, dict]:
    """The step and data position that state.json records, checked against the folder's name and
    the store's blocks."""
    try:
        state = json.loads((path / CK_STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Damaged(f"{CK_STATE} is missing, unreadable or truncated ({e})") from None
    step, pos = (state.get("step"), state.get("position")) if isinstance(state, dict) else (None, None)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or step_name(step) != path.name:
        raise Damaged(f"{CK_STATE} has step {step!r}, not the step of {path.name}")
    if not (isinstance(pos, dict) and set(pos) == {"epoch", "block_idx", "row_idx"}
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pos.values())
            and pos["block_idx"] <= num_blocks and pos["row_idx"] < block_rows):
        raise Damaged(f"{CK_STATE} has an invalid data position {pos!r}")
    return step, pos


def _check_adapter_config(path: Path, adapter) -> None:
    """The saved adapter's settings must be this run's: checked before any tensor is read."""
    from surpipe.adapter_io import CONFIG_NAME  # heavy: torch

    name = f"{CK_ADAPTER}/{CONFIG_NAME}"
    try:
        acfg = json.loads((path / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Damaged(f"{name} is unreadable ({e})") from None
    if not isinstance(acfg, dict):
        raise Damaged(f"{name} does not hold a JSON object")
    for k in ("width", "nhead", "dim_feedforward", "num_layers", "token_mixing", "adapter_weight"):
        if acfg.get(k) != getattr(adapter.config, k):
            raise Damaged(f"{name} has {k} {acfg.get(k)!r} where this run's adapter has "
                          f"{getattr(adapter.config, k)!r}")


def _load_optimizer(path: Path, step: int, optimizer, lr_scheduler, scaler) -> None:
    """Optimizer, schedule and scaler: read with weights_only (no pickled code runs), then checked."""
    try:
        opt = load_torch_file(path / CK_OPTIMIZER, "optimizer state")
    except SurpipeError as e:
        raise Damaged(str(e)) from None
    if not (isinstance(opt, dict) and isinstance(opt.get("optimizer"), dict)
            and isinstance(opt.get("lr_scheduler"), dict)):
        raise Damaged(f"{CK_OPTIMIZER} does not hold an optimizer state (a dict with 'optimizer' and "
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
        raise Damaged(f"{CK_OPTIMIZER} does not match this run's optimizer ({first_line(e)})") from None


def _load_rng(path: Path, gen) -> None:
    """The torch CPU (and CUDA) RNG states and the recipe's generator."""
    # heavy: torch and safetensors
    import torch
    from safetensors.torch import load_file

    try:
        rng = load_file(str(path / CK_RNG))
    except Exception as e:
        raise Damaged(f"{CK_RNG} is unreadable ({first_line(e)})") from None
    missing = [k for k in ("torch_cpu", "generator") if k not in rng]
    if missing:
        raise Damaged(f"{CK_RNG} lacks {', '.join(missing)}")
    try:
        torch.set_rng_state(rng["torch_cpu"])
        gen.set_state(rng["generator"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
    except Exception as e:
        raise Damaged(f"{CK_RNG} holds an invalid RNG state ({type(e).__name__}: "
                      f"{(str(e).strip().splitlines() or [''])[0]})") from None


def _load_weights(module, path: Path, name: str) -> None:
    """Load a safetensors file into ``module`` strictly, checking names, shapes and finiteness
    before reading any tensor (a damaged header cannot make us allocate)."""
    # heavy: torch and safetensors
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
    import torch  # heavy

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
