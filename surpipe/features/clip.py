"""``clip/<name>``: the CLIP text encoder's last hidden state of both prompts of each row; of an SDXL model
(``ClipXLFeatures``), what ``StableDiffusionXLPipeline.encode_prompt`` feeds the UNet for both prompts
(embeddings of both text encoders and the pooled embedding)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from surpipe.features.base import FeatureKind, all_ints
from surpipe.store.spec import ArraySpec


class ClipFeatures(FeatureKind):
    """``clip/<name>``: the CLIP text encoder's last hidden state of both prompts of each row."""

    kind = "clip"
    stage = "encode-latents"
    PROMPTS = ("simple", "complex")  # one embedding array per prompt, named after it
    _LENGTHS = {"simple": "simple_len", "complex": "complex_len"}
    _LENGTH_SETS = (_LENGTHS,)  # the token-count arrays of each tokenizer

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
    def for_settings(cls, settings):
        """``ClipXLFeatures`` for an SDXL group (settings ``pipeline: "sdxl"``), else ``ClipFeatures``."""
        sdxl = isinstance(settings, Mapping) and settings.get("pipeline") == ClipXLFeatures.PIPELINE
        return ClipXLFeatures if sdxl else ClipFeatures

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
        for name in (n for lengths in cls._LENGTH_SETS for n in lengths.values()):
            want(name, shape=(), dtype="int32")

    # ---- typed reads
    @classmethod
    def token_lengths(cls, group, tokenizer: int = 1) -> dict[str, np.ndarray]:
        """Each prompt's token count before truncation, by prompt (``simple``, ``complex``), with the
        first tokenizer or (``tokenizer=2``, SDXL) the second."""
        return {w: group.read(cls._LENGTH_SETS[tokenizer - 1][w]) for w in cls.PROMPTS}

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


class ClipXLFeatures(ClipFeatures):
    """``clip/<name>`` with settings ``pipeline: "sdxl"``: per prompt, the penultimate hidden states of
    both text encoders concatenated [L, D1+D2] and the second encoder's projected pooled output [P];
    token counts of both tokenizers. Group kind and path as SD's (``clip``), so group resolution,
    verify and the store code treat it as a CLIP group."""

    PIPELINE = "sdxl"  # settings["pipeline"] of the groups this class describes
    OUTPUT = ("hidden_states[-2] of text_encoder and text_encoder_2, concatenated; pooled: text_encoder_2's "
              "projected output (text_embeds)")
    _POOLED = {"simple": "simple_pooled", "complex": "complex_pooled"}
    _LENGTHS_2 = {"simple": "simple_len_2", "complex": "complex_len_2"}  # second tokenizer's counts
    _LENGTH_SETS = (ClipFeatures._LENGTHS, _LENGTHS_2)

    @classmethod
    def settings(cls, *, max_length: int, hidden_size: int, store_dtype: str, pooled_size: int = 0,
                 **identity) -> dict[str, Any]:
        """``hidden_size``: D1 + D2; ``pooled_size``: P (the second encoder's projection_dim)."""
        return {**identity, "pipeline": cls.PIPELINE, "max_length": int(max_length), "hidden_size": int(hidden_size),
                "pooled_size": int(pooled_size), "output": cls.OUTPUT, "store_dtype": store_dtype}

    @classmethod
    def arrays(cls, settings, codec="zstd"):
        out = super().arrays(settings, codec)
        out |= {cls._POOLED[w]: ArraySpec((settings["pooled_size"],), settings["store_dtype"], codec)
                for w in cls.PROMPTS}
        return out | {cls._LENGTHS_2[w]: ArraySpec((), "int32", codec) for w in cls.PROMPTS}

    @classmethod
    def block(cls, embeddings: Mapping[str, np.ndarray], lengths: Mapping[str, np.ndarray],
              pooled: Mapping[str, np.ndarray] | None = None,
              lengths_2: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """One block's values by prompt: embeddings [n, L, D1+D2], token counts of both tokenizers [n]
        (before truncation) and pooled embeddings [n, P]."""
        out = super().block(embeddings, lengths)
        out |= {cls._POOLED[w]: pooled[w] for w in cls.PROMPTS}
        return out | {cls._LENGTHS_2[w]: lengths_2[w] for w in cls.PROMPTS}

    @classmethod
    def required(cls, s):
        out = super().required(s)
        if all_ints(s.get("pooled_size")):
            out += list(cls._POOLED.values())
        return out + list(cls._LENGTHS_2.values())

    @classmethod
    def _kind_problems(cls, s, want, listed, out):
        super()._kind_problems(s, want, listed, out)
        P = s.get("pooled_size")
        for name in cls._POOLED.values():
            want(name, shape=(P,) if all_ints(P) else None)

    # ---- typed reads
    @classmethod
    def pooled_size(cls, group) -> int | None:
        """P of the stored pooled embeddings; None when there are none."""
        name = cls._POOLED[cls.PROMPTS[0]]
        return int(group.array(name).shape[-1]) if name in group.array_names else None

    @classmethod
    def train_arrays(cls) -> dict[str, str]:
        """What training reads, ``{batch key: array}``: both prompts' embeddings and pooled embeddings."""
        return super().train_arrays() | {f"pooled_{w}": cls._POOLED[w] for w in cls.PROMPTS}

    @classmethod
    def train_problems(cls, group, path: str) -> list[str]:
        return cls._missing(group, path, [*cls.PROMPTS, *cls._POOLED.values()])
