"""``vae/<name>``: the VAE latent distribution of each row's image, unscaled (and of its flip)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from surpipe.features.base import FeatureKind, finite_number, all_ints
from surpipe.store.spec import ArraySpec


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
    # SDXL micro-conditioning per row (settings micro_conditioning): the source image's (height, width)
    # and the (top, left) of the crop in the resized image. A flipped row's offsets are derived from
    # these in training (surpipe.train.setup.sdxl_conditioning), so there is no flipped variant.
    _MICRO = ("original_size", "crop_top_left")

    @staticmethod
    def settings(*, resolution: int, flip: bool, scaling_factor: float, shift_factor: float | None,
                 latent_channels: int, downsample_factor: int, store_dtype: str, micro_conditioning: bool = False,
                 **identity) -> dict[str, Any]:
        """The settings of a VAE group; ``shift_factor`` is recorded only when the VAE has one,
        ``micro_conditioning`` (SDXL's per-row sizes and crop offsets) only when true, so SD groups
        keep their settings."""
        s = {**identity, "resolution": int(resolution), "crop": "center", "resize": "shorter side, PIL bilinear",
             "flip": bool(flip), "normalize": "[-1, 1]", "latent": "latent_dist mean, std (unscaled)",
             "scaling_factor": scaling_factor, "latent_channels": int(latent_channels),
             "downsample_factor": int(downsample_factor), "store_dtype": store_dtype}
        if shift_factor is not None:
            s["shift_factor"] = shift_factor
        if micro_conditioning:
            s["micro_conditioning"] = True
        return s

    @classmethod
    def _names(cls, s) -> tuple[str, ...]:
        return cls._DIST + (cls._FLIP if s.get("flip") else ())

    @classmethod
    def arrays(cls, settings, codec="zstd"):
        R, f = settings["resolution"], settings["downsample_factor"]
        row = (settings["latent_channels"], R // f, R // f)
        out = {n: ArraySpec(row, settings["store_dtype"], codec) for n in cls._names(settings)}
        if settings.get("micro_conditioning"):
            out |= {n: ArraySpec((2,), "int32", codec) for n in cls._MICRO}
        return out

    @classmethod
    def block(cls, mean, std, flip_mean=None, flip_std=None, original_size=None,
              crop_top_left=None) -> dict[str, np.ndarray]:
        """One block's values: latent mean and std [n, C, h, w], those of the flipped crops, and
        SDXL's micro-conditioning, (height, width) and (top, left) [n, 2] int32."""
        out = dict(zip(cls._DIST, (mean, std)))
        if flip_mean is not None:
            out |= dict(zip(cls._FLIP, (flip_mean, flip_std)))
        if original_size is not None:
            out |= dict(zip(cls._MICRO, (original_size, crop_top_left)))
        return out

    @classmethod
    def required(cls, s):
        out = list(cls._DIST) if all_ints(s.get("latent_channels"), s.get("resolution"), s.get("downsample_factor")) \
            else []
        return out + (list(cls._MICRO) if s.get("micro_conditioning") else [])

    @classmethod
    def _kind_problems(cls, s, want, listed, out):
        C, R, f = s.get("latent_channels"), s.get("resolution"), s.get("downsample_factor")
        if all_ints(C, R, f) and f > 0:
            for name in cls._names(s):
                want(name, shape=(C, R // f, R // f))
        for name in cls._MICRO:
            want(name, shape=(2,), dtype="int32")
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
    def has_micro_conditioning(cls, group) -> bool:
        """Whether the group stores SDXL's per-row ``original_size`` and ``crop_top_left``."""
        return all(n in group.array_names for n in cls._MICRO)

    @classmethod
    def train_arrays(cls, flip: bool, group=None) -> dict[str, str]:
        """What training reads, ``{batch key: array}``; with ``flip`` also the flipped crops'; when
        ``group`` stores SDXL's micro-conditioning, also ``original_size`` and ``crop_top_left``
        (batch keys named as the arrays)."""
        out = {f"lat_{n}": n for n in cls._DIST + (cls._FLIP if flip else ())}
        if group is not None and cls.has_micro_conditioning(group):
            out |= {n: n for n in cls._MICRO}
        return out

    @classmethod
    def train_problems(cls, group, path: str) -> list[str]:
        return cls._missing(group, path, cls._DIST)
