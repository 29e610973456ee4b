"""A store's rows: creating a store from a dataset, and matching an existing store to a dataset.

A store's rows (sample keys, simple and complex prompts and, when the dataset has them, category
labels, in dataset order) are fixed when it is created; every feature group is row-aligned with
them. Matching compares keys and prompts only (never categories, never images): a dataset row
missing from the store is accepted only when the caller can explain why it was left out at
creation (``left_out``: its image fails the check the creation applied). Works with any
dataset-like object: ``samples`` (``key``, ``simple``, ``complex``, optional ``category``),
``source``, ``fingerprint()`` and ``len()``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.store.core import (CATEGORY_ARRAY, DEFAULT_BLOCK_ROWS, FORMAT_VERSION, KEYS_ARRAY, PROMPT_ARRAYS,
                                FeatureStore, StoreNotFound, check_writable, library_versions, local_store_path)
from surpipe.store.location import is_remote
from surpipe.store.integrity import codec_chain

Row = tuple  # (key, simple, complex)
LeftOut = Callable[[Sequence[int]], "dict[int, str]"]  # dataset indices -> {index: why it is not in the store}


class StoreExists(SurpipeError):
    """Another process created the store first (data-parallel ranks race to create it)."""


class DatasetMismatch(SurpipeError):
    """The store was made from other rows than the dataset's.

    ``row`` is the first store row that differs (the store's row count when the dataset has rows
    past the store's end), ``stored`` the store's (key, simple, complex) there or None, ``given``
    the dataset's row at that place or None, ``detail`` one line saying how they differ."""

    def __init__(self, message: str, *, row: int | None, stored: Row | None, given: Row | None, detail: str):
        super().__init__(message)
        self.row, self.stored, self.given, self.detail = row, stored, given, detail


@dataclass
class StoreMatch:
    """A store matched to a dataset: ``samples`` are the dataset's samples of the store's rows, in
    row order; ``left_out`` maps keys of dataset rows not in the store to the reason."""

    samples: list
    left_out: dict[str, str] = field(default_factory=dict)
    grown: tuple[int, int] | None = None  # (rows before, rows after) when this call appended rows


def create_store(path: str | os.PathLike, dataset, block_rows: int = DEFAULT_BLOCK_ROWS) -> FeatureStore:
    """Create the store of ``dataset``'s rows at ``path`` and open it for writing (``created_now``).

    Atomic: built under a temporary name beside ``path``, then renamed, so data-parallel ranks may
    all call this; the losers get :class:`StoreExists`. Full disk and unwritable folders raise
    SurpipeError naming the store; nothing is left behind.
    """
    path = local_store_path(path)
    if block_rows < 1:
        raise SurpipeError(f"block_rows must be >= 1, got {block_rows}")
    if is_remote(path):
        return _create_remote(path, dataset, block_rows)
    if path.exists():
        raise StoreExists(f"feature store {path} exists already")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SurpipeError(f"cannot create feature store {path}: {e.strerror or e}") from None
    check_writable(path.parent, f"cannot create feature store {path}: folder {path.parent}")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _build(tmp, dataset, block_rows)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise SurpipeError(f"cannot create feature store {path}: {what}"
                           + (f" ({e.filename})" if e.filename else "")) from None
    try:
        os.rename(tmp, path)  # publishes the whole store folder; fails (never replaces) when one appeared
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreExists(f"feature store {path} was created by another process meanwhile") from None
    store = FeatureStore(path, mode="a")
    store.created_now = True  # read by surpipe.store.opening.discard_new_store_on_error
    return store


def building_marker(path):
    """``<store>.locks/store.building``: present while a remote store is built in place (and after
    an interrupted build), so a prefix without a finished store is known to be surpipe's."""
    from surpipe.store.sidecar import sidecar_dir

    return sidecar_dir(path, "locks") / "store.building"


def _create_remote(path, dataset, block_rows: int) -> FeatureStore:
    """Create a store on object storage. Object stores have no rename, so the store is built in
    place under the store-level lease ``<store>.locks/store.create``, with the marker
    :func:`building_marker` written first and the root attributes that make it a surpipe store
    (``surpipe_format``) written LAST: a half-built store (a build killed midway) is never read as
    a store (:class:`~surpipe.store.core.HalfBuilt`) and the next creator rebuilds it from scratch."""
    from surpipe.store.core import HalfBuilt
    from surpipe.store.lease import Lease
    from surpipe.store.location import remote_errors
    from surpipe.store.sidecar import sidecar_dir

    locks = sidecar_dir(path, "locks")
    with Lease(path.fs, f"{locks.path}/store.create", f"creation of feature store {path}", wait_s=600.0) as lease:
        try:  # decide again under the lease: another process (a rank) may have finished it meanwhile
            FeatureStore(path, mode="a")
            raise StoreExists(f"feature store {path} was created by another process meanwhile")
        except HalfBuilt:
            pass  # rebuilt below (mode "w" clears the prefix first)
        except StoreNotFound:
            if path.exists() and not building_marker(path).is_file():
                raise SurpipeError(f"{path} holds objects but no feature store; refusing to build a store over "
                                   "them: choose another --store") from None
        marker = building_marker(path)
        with remote_errors(path):
            marker.write_text(json.dumps({"pid": os.getpid(), "started": _dt.datetime.now(_dt.timezone.utc)
                                          .isoformat(timespec="seconds")}))
            _build(path, dataset, block_rows, before_commit=lease.check)
            marker.unlink(missing_ok=True)
    store = FeatureStore(path, mode="a")
    store.created_now = True
    return store


def _build(tmp, dataset, block_rows: int, before_commit=None) -> None:
    import zarr

    from surpipe.store.location import zarr_store

    n = len(dataset)
    root = zarr.open_group(zarr_store(tmp, read_only=False), mode="w")
    attrs = {
        "surpipe_format": FORMAT_VERSION,
        "num_samples": n,
        "block_rows": int(block_rows),
        "dataset_fingerprint": dataset.fingerprint(),
        "dataset_source": str(dataset.source),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "library_versions": library_versions(),
    }
    if before_commit is None:  # a local build: published whole by the rename
        root.attrs.update(attrs)
    samples = dataset.samples
    chunk = max(1, min(n, 65536))
    arrays = [(KEYS_ARRAY, [s.key for s in samples]),
              (PROMPT_ARRAYS["simple"], [s.simple for s in samples]),
              (PROMPT_ARRAYS["complex"], [s.complex for s in samples])]
    # optional per-row labels (evaluation groups its numbers by them); "" for a row without one.
    # Not part of the fingerprint or of matching, so stores without them keep matching
    categories = [getattr(s, "category", None) for s in samples]
    if any(c is not None for c in categories):
        arrays.append((CATEGORY_ARRAY, ["" if c is None else str(c) for c in categories]))
    for name, values in arrays:
        arr = root.create_array(name, shape=(n,), dtype=str, chunks=(chunk,), compressors=codec_chain("zstd"))
        arr[:] = np.array(values, dtype=object)
    if before_commit is not None:  # built in place: the attributes that make it a store come last
        before_commit()
        root.attrs.update(attrs)


def _aligned(store: FeatureStore, dataset, samples: list) -> tuple[list[int], tuple]:
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


def _same_rows(store: FeatureStore, dataset, samples: list) -> bool:
    return store.num_samples == len(samples) and store.fingerprint == dataset.fingerprint()


def match_store(store: FeatureStore, dataset, left_out: LeftOut | None = None) -> StoreMatch:
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


def has_rows_after(store: FeatureStore, dataset) -> bool:
    """Whether ``dataset`` has rows after the store's last row (cheap: keys and prompts only, no
    image). A dataset that changes or removes store rows raises :class:`DatasetMismatch`."""
    samples = list(dataset.samples)
    if _same_rows(store, dataset, samples):
        return False
    picked, _ = _aligned(store, dataset, samples)
    return len(samples) - 1 > (picked[-1] if picked else -1)


def plan_rows(store: FeatureStore, dataset, left_out: LeftOut | None = None,
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


def open_or_create(path: str | os.PathLike, dataset, block_rows: int = DEFAULT_BLOCK_ROWS,
                   left_out: LeftOut | None = None, grow: bool = False,
                   new_rows: LeftOut | None = None) -> tuple[FeatureStore, StoreMatch]:
    """The store of ``dataset`` at ``path``: created from the dataset's rows when absent, else
    opened for writing and matched (:func:`match_store`). ``store.created_now`` says which.

    With ``grow``, a dataset that is the store's rows plus rows after its last row first appends
    those rows (:func:`surpipe.store.growth.grow_store`; ``new_rows`` is the check they pass, as a
    new store's rows do); ``StoreMatch.grown`` then says (rows before, rows after)."""
    try:
        store = FeatureStore(path, mode="a", allow_growing=grow)
    except StoreNotFound:
        try:
            return create_store(path, dataset, block_rows), StoreMatch(list(dataset.samples))
        except StoreExists:
            store = FeatureStore(path, mode="a", allow_growing=grow)
    grown = None
    if grow and (store.growing or has_rows_after(store, dataset)):
        from surpipe.store.growth import grow_store

        before = store.num_samples
        store = grow_store(path, dataset, left_out, new_rows)
        if store.num_samples != before:
            grown = (before, store.num_samples)
    match = match_store(store, dataset, left_out)
    match.grown = grown
    return store, match


def _row(s) -> Row:
    return (s.key, s.simple, s.complex)


def _store_row(keys, simple, complex_, i) -> Row | None:
    return (keys[i], str(simple[i]), str(complex_[i])) if i < len(keys) else None


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _mismatch(store: FeatureStore, dataset, row, stored, given, detail: str):
    raise DatasetMismatch(
        f"feature store {store.path} was made from a different dataset "
        f"({store.num_samples} rows from {store.root.attrs.get('dataset_source')!s}, "
        f"fingerprint {store.fingerprint[:12]}) than {dataset.source} "
        f"({len(dataset)} rows, fingerprint {dataset.fingerprint()[:12]}): {detail}; use another --store",
        row=row, stored=stored, given=given, detail=detail)
