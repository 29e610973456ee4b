"""``--compile-unet``'s first step, checked: the compiled UNet must give the gradient the eager one
gives with respect to the text conditioning, which is all the adapter learns from through the UNet.

Why: torch 2.13's inductor, with channels-last convolutions (its own layout optimisation, on by
default, or channels-last weights), computes the UNet's forward right and that gradient 53% off on
the tiny SD on a CPU; its bisector names the lowering of a view in the backward (docs/reliability.md).
``unet_for_loss`` avoids both; a compiled UNet whose loss looks right could still train the adapter
on a wrong gradient elsewhere, and the check costs one extra forward and backward of each UNet, once.
"""

from __future__ import annotations

from surpipe.errors import SurpipeError

# relative L2 distance allowed between the two gradients: bf16 rounding in fused kernels stays
# near 1.5e-2 and float8's (--unet-fp8: casts fused or not round differently) at 0.08-0.15
# (measured: docs/reliability.md); the CPU inductor fault was 0.53
GRAD_RTOL, GRAD_RTOL_FP8 = 0.1, 0.35


def relative_distance(a, b) -> float:
    """|a - b| / |b| in float64 (inf when b is zero and a is not, or either is not finite)."""
    import torch

    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    den = float(b.norm())
    num = float((a - b).norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


# rows of the batch the eager UNet recomputes: its memory stays small beside the step's (samples are
# independent in the frozen UNet: group norms and attention work within one sample)
CHECK_ROWS = 2


class CheckedCompiledUNet:
    """Calls ``compiled`` like the UNet; on the first call whose conditioning carries a gradient (the
    adapter learns through it), first compares that gradient with ``eager``'s on the same inputs
    (its first ``CHECK_ROWS`` rows) and raises SurpipeError, with the way out, beyond ``rtol``."""

    def __init__(self, compiled, eager, rtol: float = GRAD_RTOL):
        self.compiled, self.eager, self.rtol = compiled, eager, rtol
        self.distance = None  # measured at the first call that needs the gradient

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        if self.distance is None and encoder_hidden_states.requires_grad:
            self.distance = self.check(sample, timestep, encoder_hidden_states, **kwargs)
        return self.compiled(sample, timestep, encoder_hidden_states, **kwargs)

    def __getattr__(self, name):  # config, dtype, device: the UNet's
        if name.startswith("__") or name in ("compiled", "eager", "rtol", "distance"):
            raise AttributeError(name)
        return getattr(self.eager, name)

    def check(self, sample, timestep, cond, **kwargs) -> float:
        """The relative distance of the compiled UNet's conditioning gradient to the eager one's,
        the largest over data-parallel ranks (every rank stops, or none)."""
        import torch

        # the compiled call sees the training call's inputs as they are (no new graph to compile);
        # the gradient is taken for the adapter's output only
        ours = _gradient(self.compiled, sample, timestep, cond, kwargs)[:CHECK_ROWS]
        n = len(cond)
        head = cond[:CHECK_ROWS].detach().requires_grad_(True)
        reference = _gradient(self.eager, _head(sample, n), _head(timestep, n), head, _head(kwargs, n), batch=n)
        d = relative_distance(ours, reference)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            worst = torch.tensor([d], dtype=torch.float64, device=cond.device)
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            d = float(worst)
        if not d <= self.rtol:
            raise SurpipeError(
                f"--compile-unet: the compiled UNet's gradient for the adapter's output is {d:.0%} off the "
                f"eager UNet's (allowed {self.rtol:.0%}) with torch {torch.__version__} on {cond.device.type}: "
                "training on it would be wrong. Rerun without --compile-unet (the same --out resumes)")
        return d


def _head(value, n: int):
    """The first ``CHECK_ROWS`` rows of each tensor of a batch of ``n`` rows (in dicts too), detached."""
    import torch

    if isinstance(value, dict):
        return {k: _head(v, n) for k, v in value.items()}
    if torch.is_tensor(value) and value.ndim and len(value) == n:
        return value[:CHECK_ROWS].detach()
    return value


def _gradient(unet, sample, timestep, cond, kwargs, batch=None):
    """d(sum(out * w)) / d(cond), w a fixed random direction of the whole batch's output (its first
    rows for a head of the batch): every output element weighs in, none cancels by symmetry."""
    import torch

    with torch.enable_grad():
        out = unet(sample, timestep, cond, **kwargs).sample.float()
        shape = (batch or len(out), *out.shape[1:])
        weights = torch.randn(shape, generator=torch.Generator().manual_seed(0))[:len(out)].to(out.device)
        (grad,) = torch.autograd.grad((out * weights).sum(), cond)
    return grad
