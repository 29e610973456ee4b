"""The held-out rows as a validation set: their stored arrays read through the checked block reader,
with latent samples, noise and timesteps drawn once per row from ``(seed, key)`` so every evaluation
of every run sees the same inputs; and the constant control's embedding (the mean complex-prompt
embedding of training rows).

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
    const: Any = None  # [L, D] float32: the constant control, the mean complex embedding of training rows
    const_rows: int = 0  # how many training rows that mean is over

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
                   seed: int = 0, resolution: Optional[int] = None,
                   train_rows: Optional[np.ndarray] = None) -> "ValidationSet":
        """Read the held-out ``rows`` of a store (``groups``: a resolved ``StoreGroups``); with
        ``train_rows``, also the constant control (:func:`mean_complex`)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            raise SurpipeError("validation set: no held-out rows (give --val-rows or --val-fraction)")
        keys = FeatureStore(store_path).keys()[rows]
        vs = cls.build(load_rows(store_path, groups, rows), keys, scaling_factor=scaling_factor,
                       shift_factor=shift_factor, num_train_timesteps=num_train_timesteps, seed=seed,
                       resolution=resolution)
        if train_rows is not None and len(train_rows):
            vs.const, vs.const_rows = mean_complex(store_path, groups, train_rows)
        return vs

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, start: int, stop: int) -> dict:
        """``{name: tensor slice}`` of rows start..stop (None where the set has no such array)."""
        names = ("llm", "llm_mask", "clip_simple", "clip_complex", "latents", "noise", "timesteps", "pooled",
                 "time_ids")
        return {k: (None if getattr(self, k) is None else getattr(self, k)[start:stop]) for k in names}

    def batches(self, batch_size: int):
        """Yields ``(start, stop, {name: tensor slice})`` over the rows, in order."""
        if batch_size < 1:
            raise SurpipeError(f"validation batch size must be >= 1, got {batch_size}")
        for s in range(0, len(self), batch_size):
            e = min(s + batch_size, len(self))
            yield s, e, self.batch(s, e)

CONST_ROWS = 1024  # training rows the constant control averages (the first ones: a few blocks read)


def mean_complex(store_path: str, groups: Any, train_rows: np.ndarray, limit: int = CONST_ROWS):
    """(the mean complex-prompt embedding [L, D] float32 over the first ``limit`` of ``train_rows``,
    how many rows): the constant control, an output that ignores its input but knows the data."""
    import torch  # heavy: this module is imported by the torch-free train stage

    picked = np.sort(np.asarray(train_rows, dtype=np.int64))[:limit]
    cc = load_rows(store_path, groups, picked)["clip_complex"]
    return torch.from_numpy(np.asarray(cc, dtype=np.float64).mean(axis=0).astype(np.float32)), int(len(picked))
