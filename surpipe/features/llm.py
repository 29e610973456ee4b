"""``llm/<name>``: an LLM's decoder-layer outputs, pooled over each simple prompt's tokens."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from surpipe.features.base import FeatureKind, all_ints
from surpipe.store.spec import ArraySpec


class LLMFeatures(FeatureKind):
    """``llm/<name>``: an LLM's decoder-layer outputs pooled over each simple prompt's tokens."""

    kind = "llm"
    stage = "extract-llm (or import-prompt2vec)"
    OUTPUT = "decoder layer output (residual stream, before the final norm)"
    IMPORTED = "prompt2vec"  # settings ``source`` of import-prompt2vec groups

    @staticmethod
    def pooled(layer: int) -> str:
        return f"layer_{layer}/pooled"

    @staticmethod
    def tokens(layer: int) -> str:
        return f"layer_{layer}/tokens"

    @classmethod
    def settings(cls, *, layers: Iterable[int], hidden_size: int, store_dtype: str, pooling: str = "mean",
                 **identity) -> dict[str, Any]:
        """The settings of an LLM group; ``identity``: the source's keys (model, revision, hashes,
        quantization, tokenizer ..., or ``source``/``file_sha256`` of an imported file)."""
        return {**identity, "layers": [int(x) for x in layers], "output": cls.OUTPUT, "pooling": pooling,
                "hidden_size": int(hidden_size), "store_dtype": store_dtype}

    @staticmethod
    def settings_layers(settings: Mapping[str, Any]) -> list[int] | None:
        """The layers the settings list; groups imported before format 2's ``layers`` say ``layer``."""
        layers = settings.get("layers")
        if layers is None and all_ints(settings.get("layer")):
            layers = [settings["layer"]]
        return layers if isinstance(layers, list) else None

    @staticmethod
    def with_layers(settings: Mapping[str, Any], layers: Iterable[int]) -> dict[str, Any]:
        return {**{k: v for k, v in settings.items() if k != "layer"}, "layers": list(layers)}

    @classmethod
    def same_but_layers(cls, a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        """Whether two settings differ in their layers at most."""
        return cls.with_layers(a, []) == cls.with_layers(b, [])

    @classmethod
    def arrays(cls, settings, codec="zstd", tokens_capacity: int | None = None,
               row_arrays: bool = True) -> dict[str, ArraySpec]:
        """``layer_<L>/pooled`` [H] per layer (and ``layer_<L>/tokens``, block-ragged, when pooling
        is ``tokens``), then with ``row_arrays`` the per-row arrays: ``matched`` for an imported
        group, else ``token_counts`` (and ``token_offsets`` with tokens)."""
        H, dt, layers = settings["hidden_size"], settings["store_dtype"], cls.settings_layers(settings) or []
        toks = settings.get("pooling") == "tokens"
        out = {cls.pooled(L): ArraySpec((H,), dt, codec) for L in layers}
        if toks:
            out |= {cls.tokens(L): ArraySpec((H,), dt, codec, block_capacity=tokens_capacity) for L in layers}
        if row_arrays and settings.get("source") == cls.IMPORTED:
            out["matched"] = ArraySpec((), "bool", codec)
        elif row_arrays:
            out["token_counts"] = ArraySpec((), "int32", codec)
            if toks:
                out["token_offsets"] = ArraySpec((), "int64", codec)
        return out

    @classmethod
    def block(cls, pooled: Mapping[int, np.ndarray], tokens: Mapping[int, np.ndarray] | None = None,
              token_counts=None, token_offsets=None, matched=None) -> dict[str, np.ndarray]:
        """One block's values: ``pooled``/``tokens`` by layer; the per-row arrays given."""
        out = {cls.pooled(L): x for L, x in pooled.items()}
        out |= {cls.tokens(L): x for L, x in (tokens or {}).items()}
        for name, x in (("token_counts", token_counts), ("token_offsets", token_offsets), ("matched", matched)):
            if x is not None:
                out[name] = x
        return out

    @staticmethod
    def token_layout(lengths: np.ndarray, store) -> tuple[int, np.ndarray]:
        """Block-ragged layout of per-token rows: (capacity C, offsets [N] int64). Block b owns flat
        rows [b*C, (b+1)*C); row i's tokens are flat rows offsets[i] .. offsets[i] + lengths[i]."""
        offsets = np.zeros(len(lengths), dtype=np.int64)
        ranges = [store.block_range(b) for b in range(store.num_blocks)]
        cap = max([1] + [int(lengths[s:e].astype(np.int64).sum()) for s, e in ranges])
        for b, (s, e) in enumerate(ranges):
            offsets[s:e] = b * cap + np.concatenate([[0], np.cumsum(lengths[s:e].astype(np.int64))[:-1]])
        return cap, offsets

    @classmethod
    def required(cls, s):
        out = []
        if s.get("source") == cls.IMPORTED:
            out.append("matched")
        if s.get("pooling") == "tokens":
            out += [cls.tokens(L) for L in cls.settings_layers(s) or []]
        return out

    @classmethod
    def _kind_problems(cls, s, want, listed, out):
        hs, layers = s.get("hidden_size"), cls.settings_layers(s)
        for name in listed:
            if name.startswith("layer_") and "/" in name and all_ints(hs):
                want(name, shape=(hs,))
        for name, dtype in (("token_counts", "int32"), ("token_offsets", "int64"), ("matched", "bool")):
            want(name, shape=(), dtype=dtype)
        if layers is not None:
            have = {name.split("/")[0] for name in listed if name.startswith("layer_")}
            for L in layers:
                if f"layer_{L}" not in have:
                    out.append((None, f"settings list layer {L} but no array layer_{L}/... is stored"))
            for h in sorted(have - {f"layer_{L}" for L in layers}):
                out.append((None, f"arrays {h}/... are stored but layer {h[6:]} is not in the settings"))

    # ---- typed reads
    @classmethod
    def layers(cls, group) -> list[int]:
        """The layers a group holds (from its ``layer_<L>/pooled`` arrays), sorted."""
        out = []
        for n in group.array_names:
            if n.endswith("/pooled") and n.startswith("layer_"):
                try:
                    out.append(int(n.split("/")[0][6:]))
                except ValueError:
                    pass
        return sorted(out)

    @classmethod
    def width(cls, group, layer: int) -> int | None:
        """H of layer ``layer``'s pooled vectors; None when the group does not hold that layer."""
        name = cls.pooled(layer)
        return int(group.array(name).shape[-1]) if name in group.array_names else None

    @classmethod
    def train_arrays(cls, group, layer: int) -> dict[str, str]:
        """What training reads, ``{batch key: array}``: the pooled layer, and ``matched`` (rows
        without an imported vector hold zeros and take no part in the LLM term) when stored."""
        out = {"llm": cls.pooled(layer)}
        if "matched" in group.array_names:
            out["llm_matched"] = "matched"
        return out
