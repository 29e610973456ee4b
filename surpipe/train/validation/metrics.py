"""Held-out metrics: the training losses plus an alignment score, measured with fixed noise on the
rows the split (:mod:`surpipe.train.validation.split`) keeps out of training.

- :class:`ValidationSet` holds the held-out rows' stored arrays together with latent samples,
  noise and timesteps drawn once per row from ``(seed, key)``: every evaluation of every run sees
  the same inputs, so values are comparable across steps and runs.
- :func:`evaluate` computes ``val/denoise``, ``val/llm``, ``val/prompt`` with the training loss
  functions (:mod:`surpipe.train.losses`), plus ``val/prompt_baseline`` (the prompt term of the raw
  simple-prompt embedding, what SD sees without the adapter) and the token-averaged cosine
  similarity to the complex prompt's embedding with and without the adapter.

Torch is imported inside the functions that need it (the train stage imports this module).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.store import FeatureStore
from surpipe.train.data import BlockReader

METRICS = ("val/denoise", "val/llm", "val/prompt", "val/prompt_baseline", "val/cos_adapter", "val/cos_baseline")


# --------------------------------------------------------------------------- the held-out data
def load_rows(store_path: str, groups: Any, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The training arrays (``BlockReader`` names: llm, llm_matched, clip_simple, clip_complex,
    lat_mean, lat_std) of ``rows`` in the given order, through the checked block reader (done
    flags, chunk checksums, finite values); flipped latents are not read."""
    rows = np.asarray(rows, dtype=np.int64)
    groups = dataclasses.replace(groups, use_flip=False)
    reader = BlockReader(store_path, groups, FeatureStore(store_path).block_rows)
    if len(rows) and (rows.min() < 0 or rows.max() >= reader.num_rows):
        raise SurpipeError(f"held-out rows out of range for {store_path} ({reader.num_rows} rows)")
    parts: dict[str, list] = {}
    order = []
    blocks = rows // reader.block_rows
    for b in np.unique(blocks):  # one checked read per touched block, only its held rows kept
        mine = np.flatnonzero(blocks == b)
        data = reader[int(b)]
        for k, v in data.items():
            parts.setdefault(k, []).append(v[rows[mine] - int(b) * reader.block_rows])
        order.append(mine)
    if not order:
        return {}
    back = np.argsort(np.concatenate(order), kind="stable")  # back to the order of ``rows``
    return {k: np.concatenate(v)[back] for k, v in parts.items()}


def _row_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"validation-noise:{seed}:{key}".encode("utf-8")).digest()[:8], "big") \
        & (2**63 - 1)


@dataclass
class ValidationSet:
    """Held-out rows as tensors (CPU), with FIXED latent samples, noise and timesteps.

    Each row's draws come from its own generator seeded by ``(seed, key)``: they do not depend on
    which other rows are held out, the batch size or the training seed. ``latents``/``noise``/
    ``timesteps`` are None when no VAE latents were given (then ``val/denoise`` is skipped).
    Unflipped latents only, and no noise offset: both are training augmentations.
    """

    keys: list
    llm: Any  # [N, llm_size] float32
    llm_mask: Any  # [N] bool or None (all rows have an LLM vector)
    clip_simple: Any  # [N, L, D], stored dtype
    clip_complex: Any
    latents: Any = None  # [N, C, H, W] float32, scaled as the VAE would
    noise: Any = None
    timesteps: Any = None  # [N] int64
    pooled: Any = None  # SDXL: [N, P] the simple prompt's pooled embedding (None for SD 1.x/2.x)
    time_ids: Any = None  # SDXL: [N, 6] micro-conditioning of the unflipped crop

    @classmethod
    def build(cls, arrays: Mapping[str, np.ndarray], keys: Sequence, *, scaling_factor: float = 1.0,
              shift_factor: Optional[float] = None, num_train_timesteps: int = 1000,
              seed: int = 0, resolution: Optional[int] = None) -> "ValidationSet":
        """From ``arrays`` as :func:`load_rows` returns them (``lat_mean``/``lat_std`` optional;
        SDXL's ``pooled_simple``, ``original_size`` and ``crop_top_left`` with ``resolution``)."""
        import torch  # heavy: this module is imported by the torch-free train stage

        keys = [str(k) for k in keys]
        n = len(keys)
        for k in ("llm", "clip_simple", "clip_complex"):
            if k not in arrays or len(arrays[k]) != n:
                raise SurpipeError(f"validation set: array {k!r} missing or not {n} rows")
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        mask = t["llm_matched"].bool() if "llm_matched" in t else None
        vs = cls(keys=keys, llm=t["llm"].float(), llm_mask=None if mask is None or bool(mask.all()) else mask,
                 clip_simple=t["clip_simple"], clip_complex=t["clip_complex"])
        if "lat_mean" in t:
            mean, std = t["lat_mean"].float(), t["lat_std"].float()
            eps, noise, steps = [], [], []
            for k in keys:
                g = torch.Generator(device="cpu").manual_seed(_row_seed(seed, k))
                eps.append(torch.randn(mean.shape[1:], generator=g))
                noise.append(torch.randn(mean.shape[1:], generator=g))
                steps.append(torch.randint(0, int(num_train_timesteps), (1,), generator=g))
            shift = float(shift_factor or 0.0)
            vs.latents = ((mean + std * torch.stack(eps)) - shift) * float(scaling_factor)
            vs.noise = torch.stack(noise)
            vs.timesteps = torch.cat(steps).long()
        if "pooled_simple" in t:
            from surpipe.train.losses import sdxl_time_ids

            if resolution is None:
                raise SurpipeError("validation set: SDXL rows need the training resolution")
            vs.pooled = t["pooled_simple"].float()
            vs.time_ids = sdxl_time_ids(t["original_size"], t["crop_top_left"], resolution)
        return vs

    @classmethod
    def from_store(cls, store_path: str, groups: Any, rows: np.ndarray, *, scaling_factor: float,
                   shift_factor: Optional[float] = None, num_train_timesteps: int = 1000,
                   seed: int = 0, resolution: Optional[int] = None) -> "ValidationSet":
        """Read the held-out ``rows`` of a store (``groups``: a resolved ``StoreGroups``)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            raise SurpipeError("validation set: no held-out rows (give --val-rows or --val-fraction)")
        keys = FeatureStore(store_path).keys()[rows]
        return cls.build(load_rows(store_path, groups, rows), keys, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, num_train_timesteps=num_train_timesteps, seed=seed,
                         resolution=resolution)

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, batch_size: int):
        """Yields ``(start, stop, {name: tensor slice})`` over the rows, in order."""
        if batch_size < 1:
            raise SurpipeError(f"validation batch size must be >= 1, got {batch_size}")
        names = ("llm", "llm_mask", "clip_simple", "clip_complex", "latents", "noise", "timesteps", "pooled",
                 "time_ids")
        for s in range(0, len(self), batch_size):
            e = min(s + batch_size, len(self))
            yield s, e, {k: (None if getattr(self, k) is None else getattr(self, k)[s:e]) for k in names}


# --------------------------------------------------------------------------- evaluation
def evaluate_rows(adapter, projection, unet, scheduler, vset: ValidationSet, *, prediction_type: Optional[str] = None,
                  min_snr_gamma: Optional[float] = None, prompt_target: str = "out", weight_dtype=None,
                  batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per-row values {metric: float64 [N]} (``val/llm`` NaN where a row has no LLM vector;
    ``val/denoise`` absent without ``unet`` or latents). See :func:`evaluate`."""
    # heavy: torch (losses imports it)
    import torch
    import torch.nn.functional as F

    from surpipe.train import losses as L  # heavy: imports torch

    if prompt_target not in ("out", "fc"):
        raise SurpipeError(f"prompt_target must be out or fc, got {prompt_target!r}")
    weight_dtype = weight_dtype or torch.float32
    dev = next(adapter.parameters()).device
    denoise = unet is not None and vset.latents is not None
    if denoise:
        sched = L._as_scheduler(scheduler)
    modules = [m for m in (adapter, projection) if m is not None]
    was = [m.training for m in modules]
    names = ["val/llm", "val/prompt", "val/prompt_baseline", "val/cos_adapter", "val/cos_baseline"]
    names += ["val/denoise"] if denoise else []
    out = {k: np.full(len(vset), np.nan) for k in names}
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            for s, e, b in vset.batches(batch_size):
                x = b["clip_simple"].to(dev).float()
                cc = b["clip_complex"].to(dev).float()
                o, enc, fc = adapter(x, return_aux=True)
                proj = projection(b["llm"].to(dev))
                tgt = o if prompt_target == "out" else fc
                mask = b["llm_mask"]
                for i in range(e - s):  # the training losses, one row at a time (per-row values)
                    r = slice(i, i + 1)
                    if mask is None or bool(mask[i]):
                        out["val/llm"][s + i] = L.llm_loss(proj[r], enc[r]).item()
                    out["val/prompt"][s + i] = L.prompt_loss(cc[r], tgt[r]).item()
                    out["val/prompt_baseline"][s + i] = L.prompt_loss(cc[r], x[r]).item()
                out["val/cos_adapter"][s:e] = F.cosine_similarity(o.float(), cc, dim=-1).mean(-1).double().cpu().numpy()
                out["val/cos_baseline"][s:e] = F.cosine_similarity(x, cc, dim=-1).mean(-1).double().cpu().numpy()
                if denoise:
                    lat, noise = b["latents"].to(dev), b["noise"].to(dev)
                    steps = b["timesteps"].to(dev)
                    noisy = sched.add_noise(lat, noise, steps)
                    added = None
                    if b["pooled"] is not None:
                        pooled = L._base(adapter).pool(b["pooled"].to(dev))
                        added = L.added_conditioning({"pooled": pooled, "time_ids": b["time_ids"].to(dev)},
                                                     weight_dtype)
                    pred = unet(noisy.to(weight_dtype), steps, o.to(weight_dtype),
                                added_cond_kwargs=added).sample.float()
                    target = L.denoise_target(sched, lat, noise, steps, prediction_type).float()
                    w = None if min_snr_gamma is None else L.min_snr_weights(sched, steps, min_snr_gamma,
                                                                             prediction_type)
                    for i in range(e - s):
                        r = slice(i, i + 1)
                        out["val/denoise"][s + i] = L.denoise_loss(pred[r], target[r],
                                                                   None if w is None else w[r]).item()
    finally:
        for m, t in zip(modules, was):
            m.train(t)
    return out


def _mean(v: np.ndarray) -> Optional[float]:
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else None


def evaluate(adapter, projection, unet, scheduler, vset: ValidationSet, *, prediction_type: Optional[str] = None,
             min_snr_gamma: Optional[float] = None, prompt_target: str = "out", weight_dtype=None,
             batch_size: int = 8) -> dict[str, float]:
    """The held-out metrics, means over the rows (``val/llm`` over rows with an LLM vector; a key
    is left out when no row has a value; ``val/denoise`` needs ``unet``):

    - ``val/denoise``, ``val/llm``, ``val/prompt``: the training terms (:mod:`surpipe.train.losses`) on
      the fixed inputs; the mean over rows equals the term computed on all rows as one batch.
    - ``val/prompt_baseline``: the prompt term for the raw simple-prompt embedding (no adapter).
    - ``val/cos_adapter`` / ``val/cos_baseline``: cosine similarity between the conditioning
      (adapter output / raw embedding) and the complex prompt's embedding, per token, averaged
      over tokens and rows.

    Runs in eval mode under ``torch.no_grad`` and restores the modules' train/eval modes. The
    adapter runs in its own dtype (wrap the call in ``accelerator.autocast()`` to match training).
    """
    per = evaluate_rows(adapter, projection, unet, scheduler, vset, prediction_type=prediction_type,
                        min_snr_gamma=min_snr_gamma, prompt_target=prompt_target, weight_dtype=weight_dtype,
                        batch_size=batch_size)
    return {k: m for k in METRICS if k in per and (m := _mean(per[k])) is not None}


def selection_score(metrics: Mapping[str, float]) -> float:
    """What ``--keep-best`` minimises: ``val/prompt + val/llm`` (a missing term counts 0)."""
    return float(metrics.get("val/prompt", 0.0)) + float(metrics.get("val/llm", 0.0))


def per_category(values_by_row: Mapping[str, np.ndarray], categories: Optional[Sequence[str]] = None) -> dict:
    """{category: {metric: mean, "rows": n}} plus ``"all"``, from :func:`evaluate_rows`' output.

    ``categories`` (one label per row, or None when the store has none) groups the rows; NaN
    values (rows without an LLM vector) are left out of their metric's mean.
    """
    n = len(next(iter(values_by_row.values()))) if values_by_row else 0
    if categories is not None and len(categories) != n:
        raise SurpipeError(f"per_category: {len(categories)} category labels for {n} rows")

    def stats(idx: np.ndarray) -> dict:
        d = {k: m for k, v in values_by_row.items() if (m := _mean(np.asarray(v, dtype=float)[idx])) is not None}
        d["rows"] = int(len(idx))
        return d

    out = {}
    if categories is not None:
        labels = [str(c) for c in categories]
        for c in dict.fromkeys(labels):
            out[c] = stats(np.array([i for i, lab in enumerate(labels) if lab == c], dtype=np.int64))
    out["all"] = stats(np.arange(n))
    return out


def markdown_table(stats: Mapping[str, Mapping[str, float]]) -> str:
    """The :func:`per_category` result as a Markdown table (one row per category, then all)."""
    cols = [k for k in METRICS if any(k in s for s in stats.values())]
    lines = ["| category | rows | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for cat, s in stats.items():
        cells = [f"{s[k]:.4f}" if k in s else "" for k in cols]
        lines.append(f"| {cat} | {s.get('rows', 0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
