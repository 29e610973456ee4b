"""``vae/<name>``: the VAE latent distribution of each row's image, unscaled (and of its flip)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from surpipe.features.base import FeatureKind, finite_number, all_ints
from surpipe.store import ArraySpec


@dataclass(frozen=True)
class LatentParams:
    """What a trainer needs to turn a stored latent distribution into UNet input:
    ``((mean + std * eps) - shift_factor) * scaling_factor``."""

    shape: tuple[int, ...]  # [C, h, w]
    scaling_factor: float | None  # None: not recorded (training refuses the group)
    shift_factor: float
    has_flip: bool  # flip_mean/flip_std stored: training may random-flip


class VaeFeatures(FeatureKind):
    """``vae/<name>``: the VAE latent distribution of each row's image, unscaled (and of its flip)."""

    kind = "vae"
    stage = "encode-latents"
    _DIST = ("mean", "std")
    _FLIP = ("flip_mean", "flip_std")

    @staticmethod
    def settings(*, resolution: int, flip: bool, scaling_factor: float, shift_factor: float | None,
                 latent_channels: int, downsample_factor: int, store_dtype: str, **identity) -> dict[str, Any]:
        """The settings of a VAE group; ``shift_factor`` is recorded only when the VAE has one."""
        s = {**identity, "resolution": int(resolution), "crop": "center", "resize": "shorter side, PIL bilinear",
             "flip": bool(flip), "normalize": "[-1, 1]", "latent": "latent_dist mean, std (unscaled)",
             "scaling_factor": scaling_factor, "latent_channels": int(latent_channels),
             "downsample_factor": int(downsample_factor), "store_dtype": store_dtype}
        if shift_factor is not None:
            s["shift_factor"] = shift_factor
        return s

    @classmethod
    def _names(cls, s) -> tuple[str, ...]:
        return cls._DIST + (cls._FLIP if s.get("flip") else ())

    @classmethod
    def arrays(cls, settings, codec="zstd"):
        R, f = settings["resolution"], settings["downsample_factor"]
        row = (settings["latent_channels"], R // f, R // f)
        return {n: ArraySpec(row, settings["store_dtype"], codec) for n in cls._names(settings)}

    @classmethod
    def block(cls, mean, std, flip_mean=None, flip_std=None) -> dict[str, np.ndarray]:
        """One block's values: latent mean and std [n, C, h, w], and those of the flipped crops."""
        out = dict(zip(cls._DIST, (mean, std)))
        if flip_mean is not None:
            out |= dict(zip(cls._FLIP, (flip_mean, flip_std)))
        return out

    @classmethod
    def required(cls, s):
        return list(cls._DIST) if all_ints(s.get("latent_channels"), s.get("resolution"), s.get("downsample_factor")) \
            else []

    @classmethod
    def _kind_problems(cls, s, want, listed, out):
        C, R, f = s.get("latent_channels"), s.get("resolution"), s.get("downsample_factor")
        if all_ints(C, R, f) and f > 0:
            for name in cls._names(s):
                want(name, shape=(C, R // f, R // f))
        if s.get("flip") is True:
            for name in cls._FLIP:
                if name not in listed:
                    out.append((None, f"settings say flip but array {name} is not stored"))
        for key in ("scaling_factor", "shift_factor"):
            if key in s and not (s[key] is None and key == "shift_factor") and not finite_number(s[key]):
                out.append((None, f"settings {key} is {s[key]!r}, not a finite number: latents cannot be scaled"))

    # ---- typed reads
    @classmethod
    def has_flip(cls, group) -> bool:
        return all(n in group.array_names for n in cls._FLIP)

    @classmethod
    def latent_shape(cls, group) -> tuple[int, ...] | None:
        name = cls._DIST[0]
        return tuple(int(x) for x in group.array(name).shape[1:]) if name in group.array_names else None

    @classmethod
    def latent_params(cls, group) -> LatentParams | None:
        """The latent parameters training uses; None when the group stores no latents. The numbers
        come from the settings (stores of format 1 may hold them in the provenance only)."""
        shape = cls.latent_shape(group)
        if shape is None:
            return None
        rec = {**(group.attrs.get("provenance") or {}), **group.settings}
        scale = rec.get("scaling_factor")
        return LatentParams(shape, None if scale is None else float(scale), float(rec.get("shift_factor") or 0.0),
                            cls.has_flip(group))

    @classmethod
    def train_arrays(cls, flip: bool) -> dict[str, str]:
        """What training reads, ``{batch key: array}``; with ``flip`` also the flipped crops'."""
        return {f"lat_{n}": n for n in cls._DIST + (cls._FLIP if flip else ())}

    @classmethod
    def train_problems(cls, group, path: str) -> list[str]:
        return cls._missing(group, path, cls._DIST)
