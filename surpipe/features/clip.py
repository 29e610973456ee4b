"""``clip/<name>``: the CLIP text encoder's last hidden state of both prompts of each row."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from surpipe.features.base import FeatureKind, all_ints
from surpipe.store import ArraySpec


class ClipFeatures(FeatureKind):
    """``clip/<name>``: the CLIP text encoder's last hidden state of both prompts of each row."""

    kind = "clip"
    stage = "encode-latents"
    PROMPTS = ("simple", "complex")  # one embedding array per prompt, named after it
    _LENGTHS = {"simple": "simple_len", "complex": "complex_len"}

    @staticmethod
    def settings(*, max_length: int, hidden_size: int, store_dtype: str, **identity) -> dict[str, Any]:
        return {**identity, "max_length": int(max_length), "hidden_size": int(hidden_size),
                "output": "last_hidden_state", "store_dtype": store_dtype}

    @classmethod
    def arrays(cls, settings, codec="zstd"):
        L, D, dt = settings["max_length"], settings["hidden_size"], settings["store_dtype"]
        out = {w: ArraySpec((L, D), dt, codec) for w in cls.PROMPTS}
        return out | {cls._LENGTHS[w]: ArraySpec((), "int32", codec) for w in cls.PROMPTS}

    @classmethod
    def block(cls, embeddings: Mapping[str, np.ndarray], lengths: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One block's values: embeddings [n, L, D] and token counts [n] (before truncation) by prompt."""
        return {**{w: embeddings[w] for w in cls.PROMPTS}, **{cls._LENGTHS[w]: lengths[w] for w in cls.PROMPTS}}

    @classmethod
    def required(cls, s):
        return [*cls.PROMPTS, *cls._LENGTHS.values()] if all_ints(s.get("max_length"), s.get("hidden_size")) else []

    @classmethod
    def _kind_problems(cls, s, want, listed, out):
        L, D = s.get("max_length"), s.get("hidden_size")
        if all_ints(L, D):
            for name in cls.PROMPTS:
                want(name, shape=(L, D))
        for name in cls._LENGTHS.values():
            want(name, shape=(), dtype="int32")

    # ---- typed reads
    @classmethod
    def token_lengths(cls, group) -> dict[str, np.ndarray]:
        """Each prompt's token count before truncation, by prompt (``simple``, ``complex``)."""
        return {w: group.read(cls._LENGTHS[w]) for w in cls.PROMPTS}

    @classmethod
    def embedding_shape(cls, group) -> tuple[int, int] | None:
        """(sequence length, width) of the stored embeddings; None when there are none."""
        if cls.PROMPTS[0] not in group.array_names:
            return None
        shape = group.array(cls.PROMPTS[0]).shape
        return int(shape[-2]), int(shape[-1])

    @classmethod
    def train_arrays(cls) -> dict[str, str]:
        """What training reads, ``{batch key: array}``: both prompts' embeddings."""
        return {f"clip_{w}": w for w in cls.PROMPTS}

    @classmethod
    def train_problems(cls, group, path: str) -> list[str]:
        return cls._missing(group, path, cls.PROMPTS)
