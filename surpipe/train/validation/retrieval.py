"""Scale-free, input-dependent alignment on held-out rows: retrieval of the complex prompt.

Each held-out row i is a query (a conditioning computed from row i's simple prompt: the adapter's
output, the raw simple-prompt embedding, ...) and every held-out row j's complex-prompt embedding is
a candidate. The similarity is the **token-averaged cosine**, ``S[i, j] = mean_t cos(q_i[t], c_j[t])``
over all sequence positions: a positive scale ``c * q`` changes nothing, and a query that is the
same for every row (a constant) ranks the candidates the same way for every row, so its true
candidate's rank runs through 1..N once: exactly chance. What a query scores above chance it owes to
depending on its own row.

From ``S``: R@k (the share of rows whose own complex prompt is among the k most similar) and the
median rank of the own complex prompt (1 is best). Ties are counted by their expectation under a
random order, so equal similarities give chance, never a lucky first place. Chance is R@k = k/N and
median rank (N+1)/2.

Torch-free: similarities are computed with numpy in float64 from float32 inputs, in row blocks.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

KS = (1, 5)  # R@k reported
MAX_GALLERY = 512  # rows compared with each other at most (memory N x L x D); a larger set uses its first 512


def _unit_tokens(x: np.ndarray) -> np.ndarray:
    """[N, L, D] -> the same with each token vector scaled to length 1 (a zero vector stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:  # one vector per row: a sequence of one token
        x = x[:, None, :]
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def token_cosine_matrix(queries: np.ndarray, candidates: np.ndarray, block: int = 64) -> np.ndarray:
    """``S[i, j]``: token-averaged cosine between query i [L, D] and candidate j [L, D] (float64).

    A candidate of one vector per row ([N, D], e.g. the projected LLM feature) is compared with every
    token of the query (broadcast over tokens)."""
    c = _unit_tokens(candidates)
    n, L = len(queries), np.asarray(queries).shape[1] if np.asarray(queries).ndim == 3 else 1
    out = np.empty((n, len(c)), dtype=np.float64)
    broadcast = c.shape[1] == 1 and L > 1
    cf = c[:, 0, :] if broadcast else c.reshape(len(c), -1)
    for s in range(0, n, block):
        q = _unit_tokens(np.asarray(queries[s:s + block]))
        if broadcast:  # mean_t q[t] . c  =  (mean_t q[t]) . c
            out[s:s + len(q)] = q.mean(axis=1) @ cf.T
        else:
            if q.shape[1:] != c.shape[1:]:
                raise ValueError(f"token_cosine_matrix: queries {q.shape[1:]} do not match candidates {c.shape[1:]}")
            out[s:s + len(q)] = (q.reshape(len(q), -1) @ cf.T) / q.shape[1]
    return out


def ranks(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row i: (#candidates more similar than its own, #other candidates exactly as similar)."""
    sim = np.asarray(sim, dtype=np.float64)
    own = np.diag(sim)[:, None]
    above = (sim > own).sum(axis=1)
    ties = (sim == own).sum(axis=1) - 1
    return above, ties


def hits_at(sim: np.ndarray, k: int) -> np.ndarray:
    """Per row: the probability that its own candidate is among the first ``k`` (ties in random order)."""
    above, ties = ranks(sim)
    return np.clip(k - above, 0, ties + 1) / (ties + 1)


def retrieval(sim: np.ndarray) -> dict[str, float]:
    """``{"r1", "r5", "median_rank"}`` of a square similarity matrix (rows: queries, columns:
    candidates, the diagonal the true pairs)."""
    sim = np.asarray(sim)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or not len(sim):
        raise ValueError(f"retrieval: need a non-empty square similarity matrix, got shape {sim.shape}")
    above, ties = ranks(sim)
    out = {f"r{k}": float(hits_at(sim, k).mean()) for k in KS}
    out["median_rank"] = float(np.median(above + 1 + ties / 2.0))  # each row's expected rank
    return out


def chance(n: int) -> dict[str, float]:
    """What a query that ignores its row scores among ``n`` candidates."""
    return {**{f"r{k}": min(k, n) / n for k in KS}, "median_rank": (n + 1) / 2.0}


def derangement(n: int, seed: int) -> np.ndarray:
    """A fixed permutation of ``range(n)`` that moves every row (n >= 2): row i is given row
    ``perm[i]``'s input in the shuffled-input control. A seeded shuffle, then each row takes the
    next one's place, so no row keeps its own."""
    if n < 2:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def arms(queries: Mapping[str, np.ndarray], complex_emb: np.ndarray,
         limit: Optional[int] = MAX_GALLERY) -> dict[str, dict[str, float]]:
    """``{arm: retrieval(...)}`` for each named query array against ``complex_emb``, plus ``chance``,
    over the first ``limit`` rows."""
    n = len(complex_emb) if limit is None else min(limit, len(complex_emb))
    out = {name: retrieval(token_cosine_matrix(q[:n], complex_emb[:n])) for name, q in queries.items()}
    out["chance"] = chance(n)
    return out
