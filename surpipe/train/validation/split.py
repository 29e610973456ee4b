"""The held-out split: which rows of the store a run never trains on, chosen from the sample keys
alone (``sha256(f"{seed}:{key}")``), so it does not depend on row order, batch size, training seed
or machine; and the record of it a run folder keeps, compared on every resume.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from surpipe.errors import SurpipeError

def _key_hashes(keys: Sequence, salt: str) -> np.ndarray:
    """uint64 of the first 8 bytes of ``sha256(f"{salt}:{key}")`` for every key."""
    out = np.empty(len(keys), dtype=np.uint64)
    for i, k in enumerate(keys):
        out[i] = int.from_bytes(hashlib.sha256(f"{salt}:{k}".encode("utf-8")).digest()[:8], "big")
    return out


def _check_split_args(total: int, rows: Any, fraction: Any) -> None:
    if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 0:
        raise SurpipeError(f"--val-rows must be a whole number >= 0, got {rows!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not math.isfinite(fraction) \
            or not (fraction == 0 or 0 < fraction <= 0.5):
        raise SurpipeError(f"--val-fraction must be in (0, 0.5] (0: off), got {fraction!r}")
    if rows and fraction:
        raise SurpipeError(f"give --val-rows or --val-fraction, not both (got --val-rows {rows} "
                           f"and --val-fraction {fraction:g})")
    if rows and rows >= total:
        raise SurpipeError(f"--val-rows {rows} leaves no row to train on: the store has {total} rows; "
                           "hold out fewer")


def held_out_rows(keys: Sequence, *, rows: int = 0, fraction: float = 0.0, seed: int = 0) -> np.ndarray:
    """Sorted row indices of the held-out rows, from the sample keys alone (empty when both are 0).

    Each key gets ``h = sha256(f"{seed}:{key}")`` (first 8 bytes, an unsigned integer).

    - ``rows=N`` (``--val-rows``): the N keys with the smallest ``h``. Exactly N rows; independent
      of row order. When rows are appended, a row that was trained on never becomes held out; a
      held-out row may leave the set only if a new key ranks before it (resume then refuses the
      changed split, see :func:`check_same_split`).
    - ``fraction=F`` (``--val-fraction``, in (0, 0.5]): every key with ``h < F * 2**64``. About
      F of the rows; each key's membership depends on that key and the seed only, so appending
      rows never changes it for the existing ones.
    """
    keys = [str(k) for k in np.asarray(keys).tolist()]
    total = len(keys)
    _check_split_args(total, rows, fraction)
    if not rows and not fraction:
        return np.zeros(0, dtype=np.int64)
    h = _key_hashes(keys, str(seed))
    if rows:
        # ties (a 64-bit collision, or a repeated key) broken by the key text, then the position
        order = sorted(range(total), key=lambda i: (int(h[i]), keys[i], i))
        held = np.sort(np.asarray(order[:rows], dtype=np.int64))
    else:
        threshold = min(int(fraction * 2.0**64), 2**64 - 1)
        held = np.flatnonzero(np.array([int(v) < threshold for v in h], dtype=bool)).astype(np.int64)
        if len(held) == 0:
            raise SurpipeError(f"--val-fraction {fraction:g} holds out none of the store's {total} rows; "
                               "raise it or give --val-rows N")
        if len(held) >= total:
            raise SurpipeError(f"--val-fraction {fraction:g} holds out all {total} rows of the store, "
                               "leaving none to train on; give --val-rows N")
    return held


def training_rows(total: int, held: np.ndarray) -> np.ndarray:
    """The row indices not held out (sorted)."""
    mask = np.ones(int(total), dtype=bool)
    mask[np.asarray(held, dtype=np.int64)] = False
    return np.flatnonzero(mask)


def keep_mask(total: int, held) -> Optional[np.ndarray]:
    """Bool per store row, False on the held-out rows (None without a split)."""
    if held is None or not len(held):
        return None
    keep = np.ones(total, dtype=bool)
    keep[np.asarray(held, dtype=np.int64)] = False
    return keep


def selection_mask(held_keys: Sequence, seed: int = 0) -> np.ndarray:
    """Bool per held-out row: True for the *selection* part that ``--keep-best`` chooses on, False
    for the *report* part that ``surpipe eval --store`` reports on. About half each, from the key and
    the seed alone (``sha256(f"select:{seed}:{key}")``); with two or more rows both parts are non-empty."""
    keys = [str(k) for k in np.asarray(held_keys).tolist()]
    if not keys:
        return np.zeros(0, dtype=bool)
    h = _key_hashes(keys, f"select:{seed}")
    mask = h < np.uint64(2**63)
    if len(keys) >= 2 and (mask.all() or not mask.any()):  # a lopsided draw: split by rank instead
        mask = np.zeros(len(keys), dtype=bool)
        mask[np.argsort(h, kind="stable")[: len(keys) // 2]] = True
    return mask


def _keys_digest(keys: Sequence[str]) -> str:
    """sha256 over the sorted keys, each length-prefixed (no separator can be forged by a key)."""
    d = hashlib.sha256()
    for k in sorted(keys):
        b = k.encode("utf-8")
        d.update(len(b).to_bytes(8, "big") + b)
    return d.hexdigest()


def split_record(keys: Sequence, held: np.ndarray, *, rows: int = 0, fraction: float = 0.0,
                 seed: int = 0, keep_best: bool = False) -> dict:
    """What the run folder records about the split (JSON-ready): mode, settings, counts and a
    sha256 of the held-out keys, which :func:`check_same_split` compares on resume; with
    ``keep_best``, also its two parts (``selection`` chooses the best adapter, ``report`` is what
    ``eval --store`` reports on), each as a count and a sha256 of its keys."""
    keys = np.asarray(keys)
    held_keys = [str(k) for k in keys[np.asarray(held, dtype=np.int64)].tolist()] if len(held) else []
    mode = "rows" if rows else "fraction" if fraction else "off"
    rec = {"mode": mode, "rows": int(rows), "fraction": float(fraction), "seed": int(seed),
           "count": len(held_keys), "total": int(len(keys)), "keys_sha256": _keys_digest(held_keys)}
    if keep_best and held_keys:
        sel = selection_mask(held_keys, seed)
        for part, m in (("selection", sel), ("report", ~sel)):
            chosen = [k for k, x in zip(held_keys, m) if x]
            rec[part] = {"count": len(chosen), "keys_sha256": _keys_digest(chosen)}
    return rec


def _describe(rec: Optional[Mapping]) -> str:
    if not rec or rec.get("mode", "off") == "off":
        return "no held-out split"
    opt = f"--val-rows {rec.get('rows')}" if rec.get("mode") == "rows" else f"--val-fraction {rec.get('fraction'):g}"
    return f"{opt} (seed {rec.get('seed')}, {rec.get('count')} rows)"


def check_same_split(saved: Optional[Mapping], now: Mapping) -> list[str]:
    """Problems (empty: the same split) between the split a run recorded and the one asked for
    now. ``saved`` None (a run folder from before validation existed) equals a split that is off."""
    was, want = _describe(saved), _describe(now)
    saved_off = not saved or saved.get("mode", "off") == "off"
    now_off = now.get("mode", "off") == "off"
    if saved_off and now_off:
        return []
    if saved_off != now_off or any(saved.get(k) != now.get(k) for k in ("mode", "rows", "fraction", "seed")):
        return [f"the run was trained with {was} but this command asks for {want}: a held-out split cannot "
                "change on resume (its rows would have been trained on); use the run's split or a new --out"]
    if saved.get("keys_sha256") != now.get("keys_sha256") or saved.get("count") != now.get("count"):
        return [f"the held-out rows of {want} differ from the run's ({saved.get('count')} rows then, "
                f"{now.get('count')} now; the store's keys changed): resume on the store the run started "
                "from, or train into a new --out"]
    return []
