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


class CheckedCompiledUNet:
    """Calls ``compiled`` like the UNet; on the first call, first compares its gradient with respect
    to ``encoder_hidden_states`` with ``eager``'s on the same inputs and raises SurpipeError (with
    the way out) when they differ by more than ``rtol``."""

    def __init__(self, compiled, eager, rtol: float = GRAD_RTOL):
        self.compiled, self.eager, self.rtol = compiled, eager, rtol
        self.distance = None  # measured at the first call

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        if self.distance is None:
            self.distance = self.check(sample, timestep, encoder_hidden_states, **kwargs)
        return self.compiled(sample, timestep, encoder_hidden_states, **kwargs)

    def __getattr__(self, name):  # config, dtype, device: the UNet's
        return getattr(self.eager, name)

    def gradient(self, unet, sample, timestep, cond, kwargs):
        import torch

        cond = cond.detach().requires_grad_(True)
        with torch.enable_grad():
            out = unet(sample.detach(), timestep, cond, **kwargs).sample.float()
            # a fixed random direction: every output element weighs in, none cancels by symmetry
            g = torch.Generator().manual_seed(0)
            weights = torch.randn(out.shape, generator=g).to(out.device)
            (grad,) = torch.autograd.grad((out * weights).sum(), cond)
        return grad

    def check(self, sample, timestep, cond, **kwargs) -> float:
        """The relative distance of the compiled UNet's conditioning gradient to the eager one's."""
        kwargs = {k: _detached(v) for k, v in kwargs.items()}
        ours = self.gradient(self.compiled, sample, timestep, cond, kwargs)
        reference = self.gradient(self.eager, sample, timestep, cond, kwargs)
        d = relative_distance(ours, reference)
        if not d <= self.rtol:
            import torch

            raise SurpipeError(
                f"--compile-unet: the compiled UNet's gradient for the adapter's output is {d:.0%} off the "
                f"eager UNet's (allowed {self.rtol:.0%}) with torch {torch.__version__} on {cond.device.type}: "
                "training on it would be wrong. Rerun without --compile-unet (the same --out resumes)")
        return d


def _detached(value):
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value.detach() if hasattr(value, "detach") else value
