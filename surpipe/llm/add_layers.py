"""Adding layers to an existing ``llm/<name>`` group without recomputing the stored ones.

``extract-llm --layers`` with more layers than a group holds (its settings otherwise equal) computes
only the new layers, into a side store beside the store (``<store>.adding-layers/``, the same rows
and shard layout) through the same resumable block loop; once complete, their arrays are moved
into the group and its settings list every layer (:func:`adopt_arrays`). Until then the group keeps
its settings, so a reader never sees a half-added layer.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.features import LLMFeatures, open_group
from surpipe.store import settings_hash
from surpipe.store.sidecar import remove_sidecars, sidecar_dir


def added_layers(store, path: str, settings: dict) -> tuple[list[int], list[int]]:
    """(stored layers, layers to add) when group ``path`` exists with settings that differ from
    ``settings`` in ``layers`` only; ([], []) otherwise (absent group, or any other difference,
    which ``check_settings`` then refuses)."""
    if not store.has_group(path):
        return [], []
    old = open_group(store, path).settings
    stored, wanted = LLMFeatures.settings_layers(old), LLMFeatures.settings_layers(settings)
    if not isinstance(stored, list) or stored == wanted or not LLMFeatures.same_but_layers(old, settings):
        return [], []
    return [int(x) for x in stored], sorted(set(wanted) - set(stored))


def side_store(store_path: str, name: str, extra: list[int]) -> Path:
    """Where layers being added to group llm/<name> are computed before they join it: beside the
    store (``<store>.adding-layers/``), so a zarr reader of the store never meets the scratch folder."""
    return sidecar_dir(store_path, "adding-layers") / f"{name}-L{'_'.join(map(str, extra))}.zarr"


def _move_array(store, path: str, src, top: str) -> None:
    """Move one top-level array folder of group ``src`` into group ``path``; a no-op once moved."""
    if getattr(store, "remote", False):
        # object storage has no rename: every object copied, then the source deleted (a rerun after
        # a kill copies again what is still at the source)
        source, target = src.store.path / src.path / top, store.path / path / top
        objs = source.fs.find(source.path) if source.exists() else []
        for o in objs:
            source.fs.copy(o, target.path + o[len(source.path):])
        if objs:
            source.rmtree()
        return
    target = Path(store.path) / path / top
    if not target.exists():
        os.replace(Path(src.store.path) / src.path / top, target)  # moves a whole array folder


def adopt_arrays(store, path: str, src, settings: dict, note: dict | None = None):
    """Move the arrays of complete group ``src`` (of a side store made from the same rows) into
    complete group ``path`` of ``store``, then record ``settings`` (one metadata write, after the
    moves). Arrays already moved are left alone, so an interrupted call can simply be repeated.
    The caller holds the group's lock exclusively."""
    dst = open_group(store, path)
    if (src.store.num_samples, src.store.block_rows, src.store.fingerprint) != \
            (store.num_samples, store.block_rows, store.fingerprint):
        raise SurpipeError(f"{src.store.path} does not have the rows of {store.path}; cannot adopt its arrays")
    src.require_complete()
    dst.require_complete()
    names = [a for a in src.array_names if a not in dst.array_names]
    for top in sorted({a.split("/")[0] for a in names}):
        _move_array(store, path, src, top)
    attrs = dst.attrs
    settings = json.loads(json.dumps(dict(settings), default=str))
    prov = dict(attrs.get("provenance") or {})
    prov["added"] = list(prov.get("added", [])) + [
        {**dict(note or {}), "arrays": names, "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}]
    update = {"settings": settings, "settings_hash": settings_hash(settings),
              "arrays": list(attrs.get("arrays", [])) + names, "provenance": prov}
    specs, src_specs = attrs.get("array_specs"), src.attrs.get("array_specs")
    if isinstance(specs, dict) and isinstance(src_specs, dict):  # layout recorded at creation (format 2)
        update["array_specs"] = {**specs, **{a: src_specs[a] for a in names if a in src_specs}}
    store.root[path].update_attributes(update)
    return open_group(store, path)


def remove_side_stores(side_path: Path, name: str) -> None:
    """Remove the side store of group llm/<name>, those of earlier attempts at other layer sets for
    it, their lock folders, and the side-store folder once empty."""
    mine = re.compile(re.escape(name) + r"-L\d+(_\d+)*\.zarr")
    for p in [side_path, *(q for q in side_path.parent.glob("*.zarr") if mine.fullmatch(q.name))]:
        if hasattr(p, "rmtree"):  # on object storage
            p.rmtree()
        else:
            shutil.rmtree(p, ignore_errors=True)
        remove_sidecars(p)  # its lock folder
    with contextlib.suppress(OSError, AttributeError):  # (object storage has no folders to remove)
        side_path.parent.rmdir()


def stored_capacity(store, path: str, lengths: np.ndarray, cap: int, offsets: np.ndarray) -> tuple[int, np.ndarray]:
    """The per-token layout of an existing group keeps the capacity it was created with (its done
    blocks' offsets depend on it): differs from ``cap`` only after the store grew. New rows that
    need more room than it has are refused."""
    if not store.has_group(path):
        return cap, offsets
    g = store.root[path]
    names = [LLMFeatures.tokens(layer) for layer in LLMFeatures.settings_layers(open_group(store, path).settings) or []]
    stored = next((int(g[a].attrs["block_capacity"]) for a in names
                   if a in g and g[a].attrs.get("block_capacity")), None)
    if stored is None or stored == cap:
        return cap, offsets
    if cap > stored:
        need = [b for b in range(store.num_blocks) if int(lengths[slice(*store.block_range(b))].sum()) > stored]
        raise SurpipeError(f"store {store.path}: group {path} holds at most {stored} token rows per block (set when it "
                           f"was created); block {need[0]} of the grown store needs {cap}. Rerun with --overwrite "
                           "(recomputes every row) or choose another --name")
    blocks = np.arange(len(offsets)) // store.block_rows
    return stored, offsets + blocks * (stored - cap)
