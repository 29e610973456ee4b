"""Matching a store's rows to a dataset (no image is read here).

A store's rows (sample keys, simple and complex prompts and, when the dataset has them, category
labels, in dataset order) are fixed when it is created; every feature group is row-aligned with
them. Matching compares keys and prompts only (never categories, never images): a dataset row
missing from the store is accepted only when the caller can explain why it was left out at
creation (``left_out``: its image fails the check the creation applied), and rows after the store's
last row are what a growth appends (:func:`plan_rows`). Works with any dataset-like object:
``samples`` (``key``, ``simple``, ``complex``, optional ``category``), ``source``, ``fingerprint()``
and ``len()``; ``store`` is a :class:`~surpipe.store.feature_store.FeatureStore`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from surpipe.store.errors import DatasetMismatch, Row

LeftOut = Callable[[Sequence[int]], "dict[int, str]"]  # dataset indices -> {index: why it is not in the store}


@dataclass
class StoreMatch:
    """A store matched to a dataset: ``samples`` are the dataset's samples of the store's rows, in
    row order; ``left_out`` maps keys of dataset rows not in the store to the reason."""

    samples: list
    left_out: dict[str, str] = field(default_factory=dict)
    grown: tuple[int, int] | None = None  # (rows before, rows after) when this call appended rows


def _aligned(store, dataset, samples: list) -> tuple[list[int], tuple]:
    """The dataset index of every store row (keys and prompts equal, same order), and the store's
    (keys, simple, complex); raises :class:`DatasetMismatch` at the first store row that differs."""
    keys = [str(k) for k in store.keys()]
    simple, complex_ = store.prompts("simple"), store.prompts("complex")
    where = {s.key: j for j, s in enumerate(samples)}
    picked: list[int] = []
    for i, k in enumerate(keys):
        stored = (k, str(simple[i]), str(complex_[i]))
        j = where.get(k)
        if j is None:
            _mismatch(store, dataset, i, stored, None, f"store row {i} (key {k!r}) is not in the dataset")
        s = samples[j]
        if picked and j < picked[-1]:
            _mismatch(store, dataset, i, stored, _row(s),
                      f"store row {i} (key {k!r}) comes before key {keys[i - 1]!r} in the dataset")
        for what, a, b in (("simple", stored[1], s.simple), ("complex", stored[2], s.complex)):
            if a != b:
                _mismatch(store, dataset, i, stored, _row(s),
                          f"store row {i} (key {k!r}): {what} prompt {_short(a)} in the store, {_short(b)} in the dataset")
        picked.append(j)
    return picked, (keys, simple, complex_)


def _explained(store, dataset, samples, picked, rows, extra: list[int], left_out: LeftOut | None) -> dict[int, str]:
    """``{index: reason}`` for dataset rows ``extra`` (not in the store); the first one without a
    reason raises :class:`DatasetMismatch`."""
    keys, simple, complex_ = rows
    reasons: dict[int, str] = {}
    for c in range(0, len(extra), 64):  # in chunks: another dataset is refused after a few checks
        chunk = extra[c:c + 64]
        reasons.update(left_out(chunk) if left_out is not None else {})
        j = next((j for j in chunk if j not in reasons), None)
        if j is not None:
            i = int(np.searchsorted(picked, j))  # where the row would be in the store
            _mismatch(store, dataset, i, _store_row(keys, simple, complex_, i), _row(samples[j]),
                      f"dataset row {j} (key {samples[j].key!r}) is not in the store"
                      + (" (and its image passes the check)" if left_out is not None else ""))
    return reasons


def _same_rows(store, dataset, samples: list) -> bool:
    return store.num_samples == len(samples) and store.fingerprint == dataset.fingerprint()


def match_store(store, dataset, left_out: LeftOut | None = None) -> StoreMatch:
    """Match ``store``'s rows to ``dataset`` by keys and prompts (no image is read here).

    Every store row must be a dataset row with the same key and prompts, in the same order. A
    dataset row not in the store is accepted only when ``left_out`` (called with the indices of
    such rows, a chunk at a time) gives a reason for it; otherwise, or on any other difference, raises
    :class:`DatasetMismatch` naming the first differing row.
    """
    samples = list(dataset.samples)
    if _same_rows(store, dataset, samples):
        return StoreMatch(samples)
    picked, rows = _aligned(store, dataset, samples)
    extra = sorted(set(range(len(samples))) - set(picked))
    reasons = _explained(store, dataset, samples, picked, rows, extra, left_out)
    return StoreMatch([samples[j] for j in picked], {samples[j].key: reasons[j] for j in extra})


@dataclass
class RowPlan:
    """How a dataset extends a store: ``picked`` the dataset index of each store row, ``appended``
    the dataset rows after the store's last row to append (in order), ``left_out`` the other
    dataset rows not in the store, with the reason."""

    picked: list[int]
    appended: list[int]
    left_out: dict[int, str]


def has_rows_after(store, dataset) -> bool:
    """Whether ``dataset`` has rows after the store's last row (cheap: keys and prompts only, no
    image). A dataset that changes or removes store rows raises :class:`DatasetMismatch`."""
    samples = list(dataset.samples)
    if _same_rows(store, dataset, samples):
        return False
    picked, _ = _aligned(store, dataset, samples)
    return len(samples) - 1 > (picked[-1] if picked else -1)


def plan_rows(store, dataset, left_out: LeftOut | None = None,
              new_rows: LeftOut | None = None) -> RowPlan:
    """Which dataset rows a growth of ``store`` appends: those after the store's last row that pass
    ``new_rows`` (the check a new store's rows pass; it returns ``{index: why not}``). Store rows
    changed, removed or reordered, and rows inserted before the store's last row that ``left_out``
    cannot explain, raise :class:`DatasetMismatch` naming the first differing row."""
    samples = list(dataset.samples)
    if _same_rows(store, dataset, samples):
        return RowPlan(list(range(len(samples))), [], {})
    picked, rows = _aligned(store, dataset, samples)
    last = picked[-1] if picked else -1
    extra = sorted(set(range(len(samples))) - set(picked))
    middle, tail = [j for j in extra if j < last], [j for j in extra if j > last]
    reasons = _explained(store, dataset, samples, picked, rows, middle, left_out)
    bad = new_rows(tail) if (new_rows is not None and tail) else {}
    return RowPlan(picked, [j for j in tail if j not in bad], {**reasons, **bad})


def _row(s) -> Row:
    return (s.key, s.simple, s.complex)


def _store_row(keys, simple, complex_, i) -> Row | None:
    return (keys[i], str(simple[i]), str(complex_[i])) if i < len(keys) else None


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _mismatch(store, dataset, row, stored, given, detail: str):
    raise DatasetMismatch(
        f"feature store {store.path} was made from a different dataset "
        f"({store.num_samples} rows from {store.root.attrs.get('dataset_source')!s}, "
        f"fingerprint {store.fingerprint[:12]}) than {dataset.source} "
        f"({len(dataset)} rows, fingerprint {dataset.fingerprint()[:12]}): {detail}; use another --store",
        row=row, stored=stored, given=given, detail=detail)
