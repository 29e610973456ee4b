"""Growing a store: a stage-one command given the store's dataset plus rows after its last row
appends those rows instead of refusing the dataset (docs/store-format.md, "Growth").

:func:`surpipe.store.feature_store.grow_store` runs it. Under the store's growth lock
(``<store>.locks/store.grow.lock``, :func:`surpipe.store.locks.growth_lock`; each group also under
its group lock held exclusively, so no job writes a block meanwhile):

1. the root's ``surpipe_format`` becomes ``"<format>+growing"`` and ``growing`` names the target:
   older surpipe versions refuse the store (unknown format), this one completes the growth before
   any other use, so a half-grown store is never read;
2. per group: the old partial last block is marked not done (its new rows have no values yet);
   when it was done, ``kept_rows`` records that its first rows hold valid values, which the job
   completing the block keeps bit for bit (:meth:`FeatureGroup.keep_stored_rows`); every array and
   ``done`` is resized (zarr resize: metadata only, no chunk file is rewritten), new blocks are
   pending, the generation stays;
3. keys, prompts (and category labels) are resized and the new rows written;
4. one root metadata write commits: ``num_samples``, ``dataset_fingerprint``, ``dataset_source``
   and the format number.

Every step is idempotent and computed from the committed row count, so a rerun after a kill at any
point completes the growth (to the rows its dataset appends).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import shutil
from pathlib import Path

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.store.core import CATEGORY_ARRAY, GROWING, KEYS_ARRAY, PROMPT_ARRAYS
from surpipe.store.integrity import codec_chain, generation_id
from surpipe.store.locks import _holders, group_lock


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint_of(dataset, rows: list) -> str:
    """The dataset fingerprint of ``rows`` (the store's rows), by ``dataset``'s own definition."""
    d = copy.copy(dataset)
    d.samples = rows
    return d.fingerprint()


def grow_rows(store, dataset, rows: list) -> None:
    """Grow ``store`` (opened with ``allow_growing``, under :func:`~surpipe.store.locks.growth_lock`)
    to ``rows``, whose first ``store.num_samples`` rows are the store's rows."""
    root = store.root
    n, m = store.num_samples, len(rows)
    attrs = dict(root.attrs)
    fmt = store.format
    root.update_attributes({"surpipe_format": f"{fmt}{GROWING}",
                            "growing": {"from": n, "to": m, "started": _now()}})
    for path in store.group_paths():
        grow_group(store, path, n, m)
    values = {KEYS_ARRAY: [s.key for s in rows], PROMPT_ARRAYS["simple"]: [s.simple for s in rows],
              PROMPT_ARRAYS["complex"]: [s.complex for s in rows]}
    labels = [getattr(s, "category", None) for s in rows]
    if (store.path / CATEGORY_ARRAY / "zarr.json").is_file():
        values[CATEGORY_ARRAY] = ["" if c is None else str(c) for c in labels]
    elif any(c is not None for c in labels[n:]):  # the new rows bring labels: "" for the old rows
        keys = root[KEYS_ARRAY]
        arr = root.create_array(CATEGORY_ARRAY, shape=(m,), dtype=str, chunks=keys.chunks,
                                compressors=codec_chain("zstd"))
        arr[:] = np.array(["" if c is None or i < n else str(c) for i, c in enumerate(labels)], dtype=object)
    for name, vals in values.items():
        arr = root[name]
        arr.resize((m,))
        if m > n:  # rewrites only the chunk that holds row n onwards (old rows with their own values)
            arr[n:m] = np.array(vals[n:m], dtype=object)
    grown = [*list(attrs.get("grown") or []), {"from": n, "to": m, "at": _now()}]
    root.update_attributes({  # one metadata write commits the growth
        "surpipe_format": fmt, "growing": None, "num_samples": m,
        "dataset_fingerprint": fingerprint_of(dataset, rows), "dataset_source": str(dataset.source),
        "grown": grown})


def grow_group(store, path: str, n: int, m: int) -> None:
    """Resize group ``path`` from ``n`` to ``m`` rows (see the module docstring, step 2), holding
    its group lock exclusively: a job writing the group meanwhile makes this refuse."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(group_lock(store.path, path, exclusive=True, wait_s=60.0))
        except SurpipeError:
            raise SurpipeError(
                f"cannot grow feature store {store.path}: group {path} is being written by "
                f"{_holders(store.path, path)}; wait for that job to finish (or stop it), then rerun "
                "(the growth resumes where it stopped)") from None
        _grow_group(store, path, n, m)


def _grow_group(store, path: str, n: int, m: int) -> None:
    g = store.root[path]
    attrs = dict(g.attrs)
    if "settings" not in attrs:
        return  # a half-created group: the next require_group deletes and recreates it at the new size
    R = store.block_rows
    nb = max(1, -(-m // R))
    want_chunk = min(R, max(m, 1))
    gen_id = generation_id(attrs.get("generation"))
    done = g["done"]

    def is_done(v) -> bool:
        return (int(v) == gen_id) if gen_id is not None else bool(v)

    arrays = {name: g[name] for name in attrs.get("arrays", [])}
    ragged = any(a.attrs.get("block_capacity") for a in arrays.values())
    # a store smaller than one block has its arrays chunked by its row count: re-chunked below
    rechunk = [name for name, a in arrays.items() if not a.attrs.get("block_capacity") and a.chunks[0] != want_chunk]
    kept = {str(k): int(v) for k, v in (attrs.get("kept_rows") or {}).items()}
    if m > n and n % R:
        b = n // R  # the old partial last block: its new rows have no values yet
        if is_done(done[b]) and not ragged and not rechunk:
            kept[str(b)] = n  # rows [b * R, n) keep their values (recorded before done[b] is cleared)
        elif rechunk:
            kept.pop(str(b), None)
        if kept != attrs.get("kept_rows", {}):
            g.update_attributes({"kept_rows": kept})
        done[b] = 0 if gen_id is not None else False
    for name, a in arrays.items():
        cap = a.attrs.get("block_capacity")
        if cap:
            a.resize((nb * int(cap), *a.shape[1:]))
        elif name in rechunk:
            _rechunk(store, a, m, want_chunk)
        else:
            a.resize((m, *a.shape[1:]))
    done.resize((nb,))
    for k, v in list(kept.items()):
        b = int(k)
        if b >= nb or is_done(done[b]):
            kept.pop(k)  # a block since completed (or no longer in the store): nothing to keep
        elif v >= min((b + 1) * R, m):
            done[b] = gen_id if gen_id is not None else True  # rows back to fewer: its kept rows are the block
            kept.pop(k)
    specs = dict(attrs.get("array_specs") or {})
    for name in arrays:
        if isinstance(specs.get(name), dict):
            a = g[name]
            specs[name] = {**specs[name], "shape": list(a.shape), "chunks": list(a.chunks)}
    update = {"kept_rows": kept}
    if specs:
        update["array_specs"] = specs
    g.update_attributes(update)


def _rechunk(store, a, m: int, chunk: int) -> None:
    """Give array ``a`` (of a store smaller than one block: one chunk, block 0 already marked not
    done) ``m`` rows chunked by ``chunk``: its chunk files are deleted, then its zarr.json rewritten
    (atomically), so a kill in between leaves an array this step redoes."""
    if getattr(store, "remote", False):
        # object storage: each chunk object deleted, then zarr.json replaced by one PUT (atomic)
        folder = store.path / a.path
        for obj in folder.glob("**"):
            if obj.name != "zarr.json" and obj.is_file():
                obj.unlink(missing_ok=True)
        meta = json.loads((folder / "zarr.json").read_text())
        meta["shape"] = [m, *meta["shape"][1:]]
        grid = meta["chunk_grid"]["configuration"]
        grid["chunk_shape"] = [chunk, *grid["chunk_shape"][1:]]
        (folder / "zarr.json").write_text(json.dumps(meta, indent=2))
        return
    folder = Path(store.path) / a.path
    meta_file = folder / "zarr.json"
    for child in folder.iterdir():
        if child.name != "zarr.json":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    meta = json.loads(meta_file.read_text())
    meta["shape"] = [m, *meta["shape"][1:]]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [chunk, *meta["chunk_grid"]["configuration"]["chunk_shape"][1:]]
    tmp = Path(store.path).parent / f".{Path(store.path).name}.rechunk-{os.getpid()}.tmp"  # outside the hierarchy
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_file)
