"""SUR-adapter losses: the two KL alignment terms, the LLM projection, and the denoising loss.

Authors' definitions (method notes), reproduced exactly:

- ``D(x, y) = KL(softmax(y) || softmax(x))`` over the last (feature) dimension, computed as
  ``F.kl_div(log_softmax(x), softmax(y), reduction="batchmean")``. torch's ``batchmean`` divides
  the total sum by ``x.size(0)`` only: for [B, L, D] inputs the value is the sum of the per-token
  KL divergences over all L tokens, divided by B (not by B * L). We keep that scale because the
  authors' loss weights (1e-5) were tuned with it.
- ``llm_loss = D(LLMResize(v_llm) broadcast to [B, 1, D], e)`` (``e``: the encoder output).
- ``prompt_loss = D(CLIP(complex prompt), out)`` (or ``fc(a)`` in place of ``out`` with
  ``prompt_target="fc"``, the authors' code before 2023-11-29). Note the order: the adapter output is the
  *target* distribution ``softmax(out)``; gradients flow into it (``F.kl_div`` differentiates its
  target).
- ``total = denoise + llm_weight * llm_loss + prompt_weight * prompt_loss``.

Half-precision inputs are upcast to float32 inside these losses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from surpipe.devices import to_device
from surpipe.errors import SurpipeError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# --------------------------------------------------------------------------- KL alignment
def kl_align(x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The authors' ``D(x, y) = KL(softmax(y / T) || softmax(x / T))`` over the last dim.

    ``F.kl_div(log_softmax(x / T), softmax(y / T), reduction="batchmean")``: the sum over every
    element divided by ``x.size(0)`` (for [B, L, D]: summed over tokens, averaged over the batch).
    ``temperature`` only divides the logits (no ``T**2`` rescaling); the authors used T = 1.
    ``x`` and ``y`` must have the same shape (broadcast them first).
    """
    if temperature <= 0:
        raise SurpipeError(f"temperature must be positive, got {temperature}")
    if x.shape != y.shape:
        raise ValueError(f"kl_align: shapes differ: {list(x.shape)} vs {list(y.shape)}")
    x, y = _up(x), _up(y)
    if temperature != 1.0:
        x, y = x / temperature, y / temperature
    return F.kl_div(F.log_softmax(x, dim=-1), F.softmax(y, dim=-1), reduction="batchmean")


def llm_loss(projected_llm: torch.Tensor, e: torch.Tensor, temperature: float = 1.0,
             mask: Optional[Union[torch.Tensor, np.ndarray]] = None) -> torch.Tensor:
    """``D(projected_llm[:, None, :] broadcast to e's shape, e)``.

    ``projected_llm``: [B, D] (``LLMProjection`` of the pooled LLM feature); ``e``: [B, L, D].
    ``mask`` [B] bool keeps only rows that have an LLM feature (the mean is over those rows; a batch
    without any gives 0, still attached to the graph). A numpy mask (the training batch's, read on
    the host) selects the rows without reading the device; a tensor mask on a GPU is read once.
    """
    if projected_llm.dim() == 2:
        projected_llm = projected_llm.unsqueeze(1)
    if projected_llm.dim() != 3 or projected_llm.shape[0] != e.shape[0] or projected_llm.shape[-1] != e.shape[-1]:
        raise ValueError(f"llm_loss: projection {list(projected_llm.shape)} does not fit e {list(e.shape)}")
    if isinstance(mask, np.ndarray):
        rows = np.flatnonzero(mask)
        if len(rows) == 0:
            return e.sum() * 0.0
        if len(rows) < len(mask):  # the same rows, in the same order, as boolean indexing picks
            idx = to_device(torch.from_numpy(rows), e.device)
            projected_llm, e = projected_llm.index_select(0, idx), e.index_select(0, idx)
    elif mask is not None and not bool(mask.all()):
        if not bool(mask.any()):
            return e.sum() * 0.0
        projected_llm, e = projected_llm[mask], e[mask]
    return kl_align(projected_llm.expand_as(e), e, temperature)


def prompt_loss(clip_complex: torch.Tensor, out: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``D(clip_complex, out)`` = KL(softmax(out) || softmax(clip_complex)), as the authors wrote it.

    ``out`` is the adapter output (the default, ``prompt_target="out"``) or its branch ``fc(a)``
    (``prompt_target="fc"``: the authors' code until 2023-11-29, likely their released checkpoint).
    """
    return kl_align(to_device(clip_complex, out.device), out, temperature)


# --------------------------------------------------------------------------- LLM projection
class LLMProjection(nn.Module):
    """The authors' ``LLMResize``: ``Linear(llm_size, width)`` applied to the pooled LLM feature.

    Theirs was randomly initialised, frozen, never seeded and never saved. Here the weights come
    from an explicit ``seed`` (a CPU ``torch.Generator``, so identical on every machine), with
    torch's default ``nn.Linear`` distribution (U(-1/sqrt(llm_size), 1/sqrt(llm_size)) for weight and
    bias); frozen unless ``learnable``; stored with :meth:`save` / :meth:`load`.
    """

    def __init__(self, llm_size: int, width: int, seed: int = 0, learnable: bool = False):
        super().__init__()
        if llm_size <= 0 or width <= 0:
            raise SurpipeError(f"LLMProjection sizes must be positive, got llm_size={llm_size}, width={width}")
        self.llm_size, self.width, self.seed, self.learnable = int(llm_size), int(width), int(seed), bool(learnable)
        self.linear = nn.Linear(llm_size, width)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        bound = 1.0 / llm_size ** 0.5
        with torch.no_grad():
            self.linear.weight.copy_(torch.rand(width, llm_size, generator=g) * (2 * bound) - bound)
            self.linear.bias.copy_(torch.rand(width, generator=g) * (2 * bound) - bound)
        self.requires_grad_(self.learnable)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """[B, llm_size] -> [B, width] (input cast to the weights' dtype)."""
        if v.shape[-1] != self.llm_size:
            raise SurpipeError(f"LLM features have size {v.shape[-1]}, the projection expects {self.llm_size}")
        return self.linear(v.to(self.linear.weight.dtype))

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the weights and settings to a safetensors file (atomically)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        meta = {"class": "LLMProjection", "llm_size": str(self.llm_size), "width": str(self.width),
                "seed": str(self.seed), "learnable": str(int(self.learnable))}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: Union[str, os.PathLike], learnable: Optional[bool] = None) -> "LLMProjection":
        """Read a file written by :meth:`save` (``learnable`` overrides the stored flag)."""
        p = Path(path)
        if not p.is_file():
            raise SurpipeError(f"LLM projection file not found: {p}")
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            llm_size, width = int(meta["llm_size"]), int(meta["width"])
            seed, stored_learnable = int(meta.get("seed", 0)), bool(int(meta.get("learnable", 0)))
        except SurpipeError:
            raise
        except Exception as e:
            raise SurpipeError(f"{p} is not an LLM projection file: {e}") from None
        proj = cls(llm_size, width, seed=seed, learnable=stored_learnable if learnable is None else learnable)
        expected = proj.state_dict()
        problems = [f"missing key: {k}" for k in expected if k not in tensors]
        problems += [f"unexpected key: {k}" for k in tensors if k not in expected]
        problems += [f"shape mismatch for {k}: file has {list(v.shape)}, expected {list(expected[k].shape)}"
                     for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
        if problems:
            raise SurpipeError(f"{p} does not hold a valid LLM projection:", problems)
        proj.load_state_dict(tensors, strict=True)
        return proj


# --------------------------------------------------------------------------- denoising
def _prediction_type(scheduler: Any, prediction_type: Optional[str]) -> str:
    if prediction_type is None:
        cfg = getattr(scheduler, "config", scheduler)
        prediction_type = cfg.get("prediction_type", "epsilon") if hasattr(cfg, "get") else \
            getattr(cfg, "prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise SurpipeError(f"unsupported prediction_type {prediction_type!r} "
                           f"(valid: {', '.join(PREDICTION_TYPES)})")
    return prediction_type


def _as_scheduler(scheduler: Any):
    """A scheduler object; a scheduler config (dict / FrozenDict) becomes a ``DDPMScheduler``."""
    if hasattr(scheduler, "alphas_cumprod"):
        return scheduler
    if isinstance(scheduler, dict):
        from diffusers import DDPMScheduler  # heavy: only for a scheduler given as its config

        # diffusers resets keys listed in "_use_default_values" to defaults: drop that list.
        return DDPMScheduler.from_config({k: v for k, v in scheduler.items() if k != "_use_default_values"})
    raise SurpipeError(f"expected a diffusers noise scheduler or its config, got {type(scheduler).__name__}")


def denoise_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   prediction_type: Optional[str] = None) -> torch.Tensor:
    """The UNet's regression target: ``noise`` (epsilon) or the velocity (v_prediction).

    ``scheduler``: a diffusers noise scheduler or its config; ``prediction_type`` overrides its
    ``config.prediction_type``. Velocity = sqrt(acp_t) * noise - sqrt(1 - acp_t) * latents.
    """
    kind = _prediction_type(scheduler, prediction_type)
    if kind == "epsilon":
        return noise
    return _as_scheduler(scheduler).get_velocity(latents, noise, timesteps)


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = acp_t / (1 - acp_t), computed in float64 on ``timesteps.device`` (no host sync; on
    MPS, which has no float64, on the CPU)."""
    dev = timesteps.device if timesteps.device.type != "mps" else torch.device("cpu")
    acp = to_device(_as_scheduler(scheduler).alphas_cumprod.detach(), dev).to(torch.float64)
    a = acp[to_device(timesteps.detach(), dev).long()]
    return a / (1.0 - a)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float,
                    prediction_type: Optional[str] = None) -> torch.Tensor:
    """Min-SNR-gamma per-sample weights: min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v).

    Where SNR = 0 (zero-terminal-SNR schedules) the epsilon weight is its limit, 1.
    Returned float32 on ``timesteps.device``.
    """
    if gamma is None or gamma <= 0:
        raise SurpipeError(f"min-SNR gamma must be positive, got {gamma}")
    kind = _prediction_type(scheduler, prediction_type)
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=float(gamma))
    if kind == "epsilon":
        w = torch.where(s > 0, clipped / torch.where(s > 0, s, torch.ones_like(s)), torch.ones_like(s))
    else:
        w = clipped / (s + 1.0)
    return to_device(w, timesteps.device).to(torch.float32)


def denoise_loss(pred: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample MSE (mean over all non-batch dims, float32), times ``weights`` [B], then mean."""
    if pred.shape != target.shape:
        raise ValueError(f"denoise_loss: shapes differ: {list(pred.shape)} vs {list(target.shape)}")
    per = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    if weights is not None:
        per = per * to_device(weights, per.device).to(per.dtype)
    return per.mean()


def _rows(draw, n: int, share: Optional[tuple]):
    """``draw(rows)`` for this process's rows: with ``share = (total, start)`` (data-parallel ranks
    that split one global batch) the whole batch is drawn and rows ``start:start+n`` kept, so every
    row gets the values a single process would draw for it."""
    if share is None:
        return draw(n)
    total, start = share
    return draw(total)[start:start + n]


def apply_noise_offset(noise: torch.Tensor, offset: float,
                       generator: Optional[torch.Generator] = None, share: Optional[tuple] = None) -> torch.Tensor:
    """``noise + offset * N(0, 1)`` of shape [B, C, 1, 1] (one shift per sample and channel).

    ``offset == 0`` returns ``noise`` unchanged and draws nothing from ``generator``.
    """
    if not offset:
        return noise
    b, c = noise.shape[:2]
    shape = (b, c) + (1,) * (noise.dim() - 2)
    dev = generator.device if generator is not None else noise.device
    extra = _rows(lambda m: torch.randn((m,) + shape[1:], generator=generator, device=dev, dtype=torch.float32),
                  b, share)
    return noise + float(offset) * to_device(extra, noise.device).to(noise.dtype)


# --------------------------------------------------------------------------- one training micro-batch
def sample_latents(batch: dict, *, use_flip: bool, scaling_factor: float, shift_factor: float,
                   generator: torch.Generator, return_flip: bool = False, share: Optional[tuple] = None):
    """Latents drawn from the stored VAE distributions (``lat_mean``/``lat_std``: numpy arrays, or
    tensors already on the training device; the flipped ones for a random half of the rows when
    ``use_flip``), shifted and scaled as the VAE's ``encode(...).sample()`` would feed the UNet. Draws
    the flips, then the noise, from ``generator`` (on the CPU: the same numbers on every device), and
    computes the latents where the stored arrays are. With ``return_flip``: ``(latents, flipped rows
    [B] bool on the CPU, or None)``."""
    t = {k: torch.as_tensor(batch[k]).float() for k in ("lat_mean", "lat_std", "lat_flip_mean", "lat_flip_std")
         if k in batch}
    mean, std = t["lat_mean"], t["lat_std"]
    flip = None
    if use_flip:
        flip = _rows(lambda m: torch.rand(m, generator=generator), mean.shape[0], share) < 0.5
        fm = to_device(flip, mean.device).view(-1, *([1] * (mean.dim() - 1)))
        mean = torch.where(fm, t["lat_flip_mean"], mean)
        std = torch.where(fm, t["lat_flip_std"], std)
    eps = _rows(lambda m: torch.randn((m,) + tuple(mean.shape[1:]), generator=generator), mean.shape[0], share)
    eps = to_device(eps, mean.device)
    latents = ((mean + std * eps) - shift_factor) * scaling_factor
    return (latents, flip) if return_flip else latents


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning per row, ``[B, 6]`` float: original (height, width), crop (top,
    left), target (resolution, resolution), in the order diffusers' SDXL pipeline and training
    example build ``add_time_ids``."""
    b = original_size.shape[0]
    target = torch.full((b, 2), float(resolution))
    return torch.cat([original_size.float(), crop_top_left.float(), target], dim=1)


def added_conditioning(b: dict, dtype: torch.dtype, pooled: Optional[torch.Tensor] = None) -> Optional[dict]:
    """SDXL's ``added_cond_kwargs`` (the pooled text embedding, ``pooled`` if given else the batch's,
    and the time ids) from a batch that has them (``pooled``, ``time_ids``); None for SD 1.x/2.x."""
    if b.get("pooled") is None:
        return None
    return {"text_embeds": (b["pooled"] if pooled is None else pooled).to(dtype), "time_ids": b["time_ids"].to(dtype)}


def _base(module):
    return getattr(module, "module", module)  # the adapter inside a DDP / compiled wrapper


def composed_loss(b: dict, *, adapter, projection, unet, scheduler, generator: torch.Generator, cfg: Any,
                  prediction_type: str, weight_dtype: torch.dtype = torch.float32, denoise: bool = True) -> dict:
    """The three losses of one micro-batch and their sum (method.md), as a dict of scalar tensors.

    ``b``: latents, clip_simple, clip_complex, llm, llm_mask (tensors on the device). Draws the noise,
    (its offset,) then the timesteps from ``generator``. ``cfg`` gives llm_weight, prompt_weight,
    prompt_target, gradient_path, min_snr_gamma, noise_offset (a TrainConfig).

    ``denoise=False`` (only with ``gradient_path="authors"``, where that term has no gradient for the
    adapter) skips the UNet: ``denoise`` is None and ``loss`` holds the weighted KL terms alone. The
    noise and timesteps are drawn all the same, so the random stream and the weights are those of the
    full computation."""
    latents = b["latents"]
    dev = latents.device
    share, n = b.get("share"), latents.shape[0]  # data-parallel ranks: each keeps its rows of global draws
    noise = to_device(_rows(lambda m: torch.randn((m,) + tuple(latents.shape[1:]), generator=generator), n, share), dev)
    if cfg.noise_offset:
        noise = apply_noise_offset(noise, cfg.noise_offset, generator, share)
    T = scheduler.config.num_train_timesteps
    timesteps = to_device(_rows(lambda m: torch.randint(0, T, (m,), generator=generator), n, share), dev)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    # through the (possibly wrapped) adapter's forward, which keeps accelerate's autocast hooks
    out, e, fc = adapter(b["clip_simple"], return_aux=True)
    llm = llm_loss(projection(b["llm"]), e, mask=b.get("llm_mask"))
    # prompt_target: the authors compared with fc(a) until 2023-11-29, with out since (method-decisions.md)
    prompt = prompt_loss(b["clip_complex"], out if cfg.prompt_target == "out" else fc)
    pooled = None
    if b.get("pooled") is not None and _base(adapter).config.pooled_width is not None:  # --pooled aligned
        pooled = _base(adapter).pool(b["pooled"])
        prompt = prompt + prompt_loss(b["pooled_complex"][:, None], pooled[:, None])
        pooled = pooled if cfg.gradient_path == "paper" else pooled.detach()
    if not denoise:
        if cfg.gradient_path != "authors":
            raise ValueError("the denoising term can be skipped only on the authors' gradient path")
        return {"loss": cfg.llm_weight * llm + cfg.prompt_weight * prompt, "denoise": None, "llm": llm,
                "prompt": prompt}
    cond = out if cfg.gradient_path == "paper" else out.detach()
    pred = unet(noisy.to(weight_dtype), timesteps, cond.to(weight_dtype),
                added_cond_kwargs=added_conditioning(b, weight_dtype, pooled)).sample.float()
    target = denoise_target(scheduler, latents, noise, timesteps, prediction_type)
    weights = None
    if cfg.min_snr_gamma is not None:
        weights = min_snr_weights(scheduler, timesteps, cfg.min_snr_gamma, prediction_type)
    denoise = denoise_loss(pred, target.float(), weights)
    total = denoise + cfg.llm_weight * llm + cfg.prompt_weight * prompt
    return {"loss": total, "denoise": denoise, "llm": llm, "prompt": prompt}
