"""Building a new store's files from a dataset's rows: keys, prompts (and category labels) and the
root attributes (docs/store-format.md). :func:`surpipe.store.feature_store.create_store` calls this, then
opens the result.

A local store is built under a temporary name beside its path and renamed into place, so
data-parallel ranks may all try and the losers get :class:`~surpipe.store.errors.StoreExists`.
Object stores have no rename: there the store is built in place under a store-level lease, with
:func:`building_marker` written first and the attributes that make it a surpipe store written last.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.store.errors import HalfBuilt, StoreExists, StoreNotFound
from surpipe.store.core import CATEGORY_ARRAY, FORMAT_VERSION, KEYS_ARRAY, PROMPT_ARRAYS, library_versions
from surpipe.store.integrity import codec_chain
from surpipe.store.lease import Lease
from surpipe.store.remote import remote_errors, zarr_store
from surpipe.store.sidecar import sidecar_dir


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Refuse a folder we cannot write into, by creating and deleting a probe file there
    (``os.access`` is not enough: root passes it on read-only mounts)."""
    probe = Path(folder) / f".surpipe-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SurpipeError(f"{what} is read-only or not writable ({e.strerror or e}); "
                           "cannot write to it") from None


def building_marker(path):
    """``<store>.locks/store.building``: present while a remote store is built in place (and after
    an interrupted build), so a prefix without a finished store is known to be surpipe's."""
    return sidecar_dir(path, "locks") / "store.building"


def build_local(path: Path, dataset, block_rows: int) -> None:
    """Build the store of ``dataset``'s rows at local ``path``, atomically (temporary name, then a
    rename that never replaces). Full disk and unwritable folders raise SurpipeError naming the
    store; nothing is left behind."""
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


def build_remote(path, dataset, block_rows: int, open_now: Callable[[], object]) -> None:
    """Build a store on object storage in place, under the store-level lease
    ``<store>.locks/store.create``: a half-built store (a build killed midway) is never read as a
    store (:class:`~surpipe.store.errors.HalfBuilt`) and the next creator rebuilds it from scratch.
    ``open_now()`` opens the store as it is (raising StoreNotFound or HalfBuilt), to decide again
    under the lease."""
    locks = sidecar_dir(path, "locks")
    with Lease(path.fs, f"{locks.path}/store.create", f"creation of feature store {path}", wait_s=600.0) as lease:
        try:  # decide again under the lease: another process (a rank) may have finished it meanwhile
            open_now()
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


def _build(tmp, dataset, block_rows: int, before_commit=None) -> None:
    import zarr  # heavy: the store package stays zarr-free on import (surpipe --help)

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
