"""A feature group's layout (docs/store-format.md): creating its arrays and ``done`` record, and the
check that opening a group runs, so a damaged or edited zarr.json is refused, never misread: arrays
present and readable, row-aligned with the store, chunked by block, dtypes and shapes as the group's
settings imply (each kind's contract, handed in as ``rules`` by :mod:`surpipe.features`) and as
recorded at creation."""

from __future__ import annotations

import datetime as _dt
import uuid
from typing import Any, Mapping

import numpy as np

from surpipe.errors import first_line
from surpipe.store.core import library_versions, settings_hash
from surpipe.store.integrity import codec_chain, recorded_layout
from surpipe.store.sharding import effective_shard_blocks, shard_shape
from surpipe.store.spec import ArraySpec, KindRules


def create_group(store, path: str, kind: str, settings: dict, arrays: Mapping[str, ArraySpec],
                 provenance: Mapping[str, Any] | None, shard_blocks: int = 1) -> None:
    """Create group ``path`` of ``store`` (under its creation lock): each array chunked by block
    (sharded when ``shard_blocks`` > 1), the ``done`` record, then one metadata write of every
    attribute, so a kill leaves all of them or none (a group without ``settings`` is half-created)."""
    g = store.root.require_group(path)
    n, b = store.num_samples, store.block_rows
    K = effective_shard_blocks(shard_blocks, store.num_blocks)
    specs = {}
    for aname, spec in arrays.items():
        if spec.block_capacity:
            cap = int(spec.block_capacity)
            chunks = (cap, *spec.row_shape)
            a = g.create_array(aname, shape=(store.num_blocks * cap, *spec.row_shape), dtype=spec.dtype,
                               chunks=chunks, shards=shard_shape(chunks, K), compressors=codec_chain(spec.codec),
                               fill_value=0, attributes={"block_capacity": cap})
        else:
            chunks = (min(b, max(n, 1)), *spec.row_shape)
            a = g.create_array(aname, shape=(n, *spec.row_shape), dtype=spec.dtype, chunks=chunks,
                               shards=shard_shape(chunks, K), compressors=codec_chain(spec.codec), fill_value=0)
        specs[aname] = {"dtype": str(a.dtype), "shape": list(a.shape), "chunks": list(a.chunks),
                        "checksum": "crc32c"}
        if K > 1:
            specs[aname]["shards"] = list(a.shards)
    # done[b] holds the generation id that completed block b (0: not done)
    g.create_array("done", shape=(store.num_blocks,), dtype="int64", chunks=(1,), shards=shard_shape((1,), K),
                   fill_value=0, compressors=codec_chain("none"))
    g.update_attributes({  # one metadata write: a kill leaves all of these or none
        "kind": kind,
        "settings": settings,
        "settings_hash": settings_hash(settings),
        "arrays": list(arrays),
        "array_specs": specs,
        "generation": uuid.uuid4().hex,
        "shard_blocks": K,
        "provenance": {**dict(provenance or {}), "library_versions": library_versions(),
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    })


def layout_problems(group, rules: KindRules | None = None) -> list[str]:
    """Problems of the group's metadata that make its data unreadable or misread: arrays
    missing or unreadable, rows not aligned with the store, chunks that are not blocks, a
    dtype or shape other than what was recorded at creation or (given the kinds' ``rules``)
    what the settings imply."""
    st = group.store
    problems = []
    attrs = group.attrs
    kind = group.path.split("/")[0]
    settings, listed = attrs.get("settings"), attrs.get("arrays")
    if attrs.get("kind") != kind:
        problems.append(f"attribute kind is {attrs.get('kind')!r}, expected {kind!r}")
    if not isinstance(settings, dict):
        problems.append("attribute settings missing or not a mapping")
        settings = {}
    if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
        problems.append("attribute arrays missing or not a list of names")
        listed = []
    present = {}
    for name in listed:
        try:
            a = group.group[name]
        except KeyError:
            problems.append(f"array {name} is missing")
            continue
        except Exception as e:
            problems.append(f"array {name}: metadata (zarr.json) cannot be read ({type(e).__name__}: "
                            f"{first_line(e)[:120]})")
            continue
        if not hasattr(a, "dtype"):
            problems.append(f"{name} is a group, expected an array")
            continue
        present[name] = a
        cap = a.attrs.get("block_capacity")
        if cap:
            rows, chunk = st.num_blocks * int(cap), int(cap)
        else:
            rows, chunk = st.num_samples, min(st.block_rows, max(st.num_samples, 1))
        if a.shape[0] != rows:
            problems.append(f"array {name} has {a.shape[0]} rows, expected {rows}")
        elif a.chunks[0] != chunk:
            problems.append(f"array {name} is chunked by {a.chunks[0]} rows, expected {chunk}")
    try:
        d = group.group["done"]
        want = np.dtype(bool) if group.gen_id is None else np.dtype("int64")
        if tuple(d.shape) != (st.num_blocks,) or d.dtype != want or tuple(d.chunks) != (1,):
            problems.append(f"done record has shape {tuple(d.shape)} dtype {d.dtype} chunks {tuple(d.chunks)}; "
                            f"expected ({st.num_blocks},) {want} chunks (1,)")
    except Exception as e:
        problems.append(f"done record unreadable ({type(e).__name__})")
    kind_problems = rules.layout_problems(kind, settings, present, listed) if rules else []
    for name, msg in recorded_layout(attrs, present) + kind_problems:
        problems.append(f"{name}: {msg}" if name else msg)
    return problems
