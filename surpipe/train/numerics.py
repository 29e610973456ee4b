"""Guards against non-finite numbers in training: a NaN or an infinity in a loss term, a gradient
or a weight stops the run before anything of its step (or after it) is logged or saved, naming the
step and where it appeared. The checks stay on the device between sync points (PendingSteps)."""

from __future__ import annotations

import math
from typing import Optional

LOSS_TERMS = ("denoise", "llm", "prompt", "loss")


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


def nonfinite_tensors(**modules) -> list[str]:
    """``prefix.name`` of every floating tensor of the modules' state dicts holding a NaN or an infinity."""
    import torch  # heavy: the train stage imports this module torch-free

    return [f"{prefix}.{k}" for prefix, mod in modules.items() for k, v in mod.state_dict().items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def listing(names: list[str], most: int = 5) -> str:
    """``a, b, c`` (at most ``most``, then how many more)."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def finite_flags(tensors: list):
    """One bool per tensor on its device: all of its values finite (no host sync)."""
    import torch  # heavy: the train stage imports this module torch-free

    if not tensors:
        return None
    return torch.stack([n.float() for n in torch._foreach_norm(tensors)]).isfinite()


class PendingSteps:
    """The numbers of the steps since the last sync point, kept on the device (loss terms, gradient
    and weight finiteness per parameter, the gradient norm) and read in one transfer by
    :meth:`settle`: at every logging, checkpoint and validation step, so a non-finite value is found,
    with its step and where it appeared, before anything after it is logged or saved."""

    def __init__(self, params: list, names: dict):
        self.params, self.names, self.steps = params, names, []

    def add(self, step: int, terms: dict, grads: tuple, grad_norm, weights, host: dict) -> None:
        """``terms``: {name: 0-d tensor or None}; ``grads``: (indices of the parameters with a
        gradient, their finite flags); ``weights``: finite flags of every parameter after the step."""
        self.steps.append((step, terms, grads, grad_norm, weights, host))

    def settle(self, reduce=None) -> tuple[list[dict], Optional[tuple[int, str]]]:
        """(one row of floats per pending step, the first (step, problem) or None); ``reduce``
        averages the terms over data-parallel processes (one collective for every pending step)."""
        import torch  # heavy: the train stage imports this module torch-free

        if not self.steps:
            return [], None
        keys = [k for k in LOSS_TERMS if self.steps[0][1].get(k) is not None]
        terms = torch.stack([torch.stack([s[1][k].double() for k in keys]) for s in self.steps])
        if reduce is not None:
            terms = reduce(terms)
        dev = terms.device  # a grad norm may come back as a CPU number (some accelerate backends)
        parts = [torch.cat([s[3].reshape(1).to(dev, torch.float64),
                            (s[2][1].to(dev, torch.float64) if s[2][1] is not None else terms.new_zeros(0)),
                            (s[4].to(dev, torch.float64) if s[4] is not None else terms.new_zeros(0))])
                 for s in self.steps]  # per step: grad norm, gradient flags, weight flags (lengths may differ)
        flat = torch.cat([terms.reshape(-1), *parts]).cpu().tolist()  # the one transfer
        k = len(keys) * len(self.steps)
        host_terms = [flat[i * len(keys):(i + 1) * len(keys)] for i in range(len(self.steps))]
        host_extra, at = [], k
        for p in parts:
            host_extra.append(flat[at:at + len(p)])
            at += len(p)
        rows, problem = [], None
        for (step, _, (idx, gf), _, wf, host), vals, ex in zip(self.steps, host_terms, host_extra):
            sums = dict(zip(keys, vals))
            rows.append({"step": step, **{k: sums.get(k) for k in LOSS_TERMS}, "grad_norm": ex[0], **host})
            if problem is None:
                problem = self._problem(step, sums, idx, ex[1:1 + len(idx)], ex[1 + len(idx):])
        self.steps = []
        return rows, problem

    def _problem(self, step: int, sums: dict, idx: list, gflags: list, wflags: list) -> Optional[tuple[int, str]]:
        what = loss_problem(sums)
        if what is None and not all(gflags):
            bad = [self.names.get(id(self.params[i]), f"parameter {i}") for i, ok in zip(idx, gflags) if not ok]
            what = f"the gradient is not finite in {listing(bad)}"
        if what is None and not all(wflags):
            bad = [self.names.get(id(p), f"parameter {i}") for i, (p, ok) in enumerate(zip(self.params, wflags))
                   if not ok]
            what = f"a weight became non-finite after the optimizer step in {listing(bad)}"
        return None if what is None else (step, what)


HOST_TIMES = ("data_wait_s", "forward_s", "backward_s", "prefetch_s", "optimizer_s")


def host_means(rows: list[dict]) -> dict:
    """The host times of a logging interval's steps (``rows`` from :meth:`PendingSteps.settle`),
    averaged: a logged row's times then describe the interval, as its ``step_s`` does."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in HOST_TIMES if rows and all(k in r for r in rows)}
