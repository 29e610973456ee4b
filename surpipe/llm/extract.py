"""Extracting features from a loaded LLM: tokens, length-bucketed batches, hooked decoder-layer
outputs and pooling over each prompt's real tokens, in float32. What a prompt's vector is computed
from does not depend on its batch, its padding or the padding side; its rounding does (a padded
batch runs the matrix products in other shapes): within one float16 step of the stored value with
float32 compute, a relative 1e-3 with half-precision compute (docs/store-format.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.llm.load import LoadedLLM

POOLINGS = ("mean", "last", "tokens")
PADDING_SIDES = ("right", "left")


# --------------------------------------------------------------------------- tokens and batches


def tokenize(tok, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt as the tokenizer makes them by default (special tokens included),
    truncated to ``max_tokens``."""
    if not texts:
        return []
    enc = tok(list(texts), add_special_tokens=True, truncation=True, max_length=int(max_tokens))
    ids = [list(x) for x in enc["input_ids"]]
    for t, x in zip(texts, ids):
        if not x:
            raise SurpipeError(f"prompt {t!r} gives no tokens with this tokenizer")
    return ids


def length_buckets(lengths: Sequence[int], batch_size: int, bucket: bool = True) -> list[list[int]]:
    """Batches of indices. With ``bucket``, indices sorted by length (longest first, ties in input
    order) and cut into batches of ``batch_size``: similar lengths share a batch, minimising padding."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if bucket else list(range(len(lengths)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_stats(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> tuple[int, int]:
    """(real tokens, padded slots computed) for ``batches`` of indices into ``lengths``."""
    real = padded = 0
    for b in batches:
        ls = [lengths[i] for i in b]
        real += sum(ls)
        padded += max(ls) * len(ls)
    return real, padded


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right"):
    """(input_ids [B, T], attention_mask [B, T]) as int64 tensors, padded on ``side``."""
    import torch  # heavy: keeps --help torch-free

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
    return ids, mask


def _pad_id(tok) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if v is not None:
            return int(v)
    return 0


# --------------------------------------------------------------------------- the forward pass


def layer_states(llm: LoadedLLM, ids, mask, layers: Sequence[int]) -> dict[int, Any]:
    """Raw outputs [B, T, H] of decoder ``layers`` (hooked; before the final norm) for one padded batch."""
    import torch  # heavy: keeps --help torch-free

    got: dict[int, Any] = {}
    hooks = []

    def make(L):
        def hook(_mod, _args, out):
            got[L] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    for L in layers:
        hooks.append(llm.layers[L].register_forward_hook(make(L)))
    try:
        dev = llm.device
        kw = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        if llm.accepts_position_ids:
            # Positions count real tokens only, so left padding does not shift RoPE positions.
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(dev)
        with torch.inference_mode():
            llm.model(**kw)
    finally:
        for h in hooks:
            h.remove()
    missing = [L for L in layers if L not in got]
    if missing:  # pragma: no cover - a model whose forward skips layers
        raise RuntimeError(f"decoder layers {missing} did not run")
    return got


def pool(h, mask, pooling: str):
    """Pool hidden states ``h`` [B, T, H] over real tokens (``mask`` [B, T]) in float32.

    Padded positions are excluded by selection (never multiplied: they may hold NaN)."""
    import torch  # heavy: keeps --help torch-free

    m = mask.to(h.device).bool()
    h32 = h.float()
    if pooling == "mean":
        s = torch.where(m[..., None], h32, torch.zeros((), dtype=h32.dtype, device=h32.device)).sum(1)
        return s / m.sum(1, keepdim=True).to(h32.dtype)
    if pooling == "last":
        last = m.long().cumsum(-1).argmax(-1)  # first position reaching the full count: the last real token
        return h32[torch.arange(h32.shape[0], device=h32.device), last]
    raise ValueError(f"unknown pooling {pooling!r}")


@dataclass
class Extracted:
    """Features of a list of prompts, in input order (numpy float32)."""

    pooled: dict[int, np.ndarray]  # layer -> [n, H]
    tokens: dict[int, list[np.ndarray]] | None  # layer -> per-prompt [len_i, H] (pooling "tokens")
    lengths: list[int]
    real_tokens: int = 0
    padded_tokens: int = 0


def extract(
    llm: LoadedLLM,
    token_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    pooling: str = "mean",
    batch_size: int = 16,
    padding_side: str = "right",
    bucket: bool = True,
    on_batch=None,
) -> Extracted:
    """Features of prompts given as token id lists. ``pooling``: ``mean`` or ``last`` give one vector
    per prompt and layer; ``tokens`` gives every token's state (and the mean in ``pooled``).
    ``on_batch(n_prompts, n_tokens)`` is called after each forward (progress counters)."""
    if pooling not in POOLINGS:
        raise SurpipeError(f"unknown pooling {pooling!r}; valid choices: {', '.join(POOLINGS)}")
    if padding_side not in PADDING_SIDES:
        raise SurpipeError(f"unknown padding side {padding_side!r}; valid choices: {', '.join(PADDING_SIDES)}")
    layers = list(layers)
    n = len(token_ids)
    lengths = [len(t) for t in token_ids]
    H = llm.hidden_size
    pooled = {L: np.zeros((n, H), dtype=np.float32) for L in layers}
    toks: dict[int, list] | None = {L: [None] * n for L in layers} if pooling == "tokens" else None
    pad = _pad_id(llm.tokenizer)
    real = padded = 0
    for batch in length_buckets(lengths, batch_size, bucket):
        ids, mask = pad_batch([token_ids[i] for i in batch], pad, padding_side)
        states = layer_states(llm, ids, mask, layers)
        m = mask.to(llm.device).bool()
        for L in layers:
            p = pool(states[L], mask, "last" if pooling == "last" else "mean").cpu().numpy()
            pooled[L][batch] = p
            if toks is not None:
                h = states[L].float()
                for j, i in enumerate(batch):
                    toks[L][i] = h[j][m[j]].cpu().numpy()
        real += int(mask.sum())
        padded += int(mask.numel())
        if on_batch is not None:
            on_batch(len(batch), int(mask.sum()))
    return Extracted(pooled=pooled, tokens=toks, lengths=lengths, real_tokens=real, padded_tokens=padded)
