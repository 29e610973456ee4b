"""Guards against non-finite numbers in training: a NaN or an infinity in a loss term, a gradient
or a weight stops the run before anything is stepped or saved, naming where it appeared."""

from __future__ import annotations

import math
from typing import Iterable, Optional

LOSS_TERMS = ("denoise", "llm", "prompt", "loss")


def _names(names: dict, params: list, values: Iterable, most: int = 5) -> str:
    """The names (at most ``most``) of the ``params`` whose entry in ``values`` (a tensor or its
    norm) holds a NaN or an infinity."""
    import torch  # heavy: the train stage imports this module torch-free

    bad = [names.get(id(p), f"parameter {i}") for i, (p, t) in enumerate(zip(params, values))
           if not bool(torch.isfinite(t).all())]
    return listing(bad, most) if bad else "(none found)"


def param_names(**modules) -> dict:
    """``{id(parameter): "prefix.name"}`` of each keyword's module, for the messages below (the
    optimizer holds the same tensors)."""
    return {id(p): f"{prefix}.{n}" for prefix, mod in modules.items() for n, p in mod.named_parameters()}


def loss_problem(sums: dict) -> Optional[str]:
    """Which accumulated loss term is not finite (the first of denoise, llm, prompt, total), or None."""
    bad = [k for k in LOSS_TERMS if sums.get(k) is not None and not math.isfinite(sums[k])]
    if not bad:
        return None
    what = "the total loss" if bad == ["loss"] else f"the {bad[0]} loss"
    return f"{what} is not finite ({sums[bad[0]]})"


def gradient_problem(params: list, names: dict) -> Optional[str]:
    """Which gradients hold a NaN or an infinity, or None. Checked before clipping, which would
    spread a NaN norm over every gradient."""
    import torch  # heavy: the train stage imports this module torch-free

    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return None
    norms = torch._foreach_norm([p.grad for p in with_grad])
    if bool(torch.stack([n.float() for n in norms]).isfinite().all()):
        return None
    return f"the gradient is not finite in {_names(names, with_grad, norms)}"


def weight_problem(params: list, names: dict) -> Optional[str]:
    """Which weights became non-finite (after an optimizer step), or None."""
    import torch  # heavy: the train stage imports this module torch-free

    norms = torch._foreach_norm([p.detach() for p in params])
    if bool(torch.stack([n.float() for n in norms]).isfinite().all()):
        return None
    return f"a weight became non-finite after the optimizer step in {_names(names, params, norms)}"


def nonfinite_tensors(**modules) -> list[str]:
    """``prefix.name`` of every floating tensor of the modules' state dicts holding a NaN or an infinity."""
    import torch  # heavy: the train stage imports this module torch-free

    return [f"{prefix}.{k}" for prefix, mod in modules.items() for k, v in mod.state_dict().items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def listing(names: list[str], most: int = 5) -> str:
    """``a, b, c`` (at most ``most``, then how many more)."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
