"""The check of each feature group ``<kind>/<name>`` for ``surpipe verify`` (:mod:`surpipe.store.verify`):
provenance attributes, the layout its settings imply (each kind's contract, handed in as the
checker's ``rules`` by :mod:`surpipe.features`) and recorded at creation, the ``done`` record, and every done block's chunks (present, checksum,
decodable, finite). Findings go to a :class:`~surpipe.store.verify_checker.Checker`."""

from __future__ import annotations

from typing import Any

import numpy as np

from surpipe.errors import first_line
from surpipe.store.core import KINDS, settings_hash
from surpipe.store.integrity import chunk_keys, generation_id, missing_block, recorded_layout

_FLOAT_KINDS = "fc"


def check_groups(c, root) -> None:
    """Check every feature group of every kind under ``root``."""
    for kind in KINDS:
        try:
            if kind not in root:
                continue
            kg = root[kind]
        except Exception as e:
            c.problem(kind, f"metadata (zarr.json) cannot be read ({type(e).__name__}: "
                      f"{first_line(e, '')[:160]})")
            continue
        try:
            names = sorted(kg.group_keys())
        except Exception:  # a member's zarr.json is broken: list the folders, report each below
            names = sorted(d.name for d in (c.path / kind).iterdir() if (d / "zarr.json").exists())
        try:
            for name, _ in sorted(kg.arrays()):
                c.problem(f"{kind}/{name}", f"an array directly under {kind}/; feature groups are {kind}/<name>/")
        except Exception:
            pass  # an unreadable member: reported below, by the group it belongs to
        for name in names:
            path = f"{kind}/{name}"
            g = c.open(root, path, path)
            if g is None or not hasattr(g, "group_keys"):
                continue
            check_group(c, kind, path, g)


def check_group(c, kind: str, path: str, g) -> None:
    """Check group ``path`` (zarr group ``g``) of kind ``kind``; its summary goes to ``c.rep.groups``."""
    try:
        attrs = dict(g.attrs)
    except Exception as e:
        c.problem(path, f"attributes cannot be read: {e}")
        return
    n, nb = c.rep.num_samples, c.rep.num_blocks
    info: dict[str, Any] = {"blocks_done": 0, "num_blocks": nb, "incomplete_blocks": [], "arrays": []}
    c.rep.groups[path] = info
    settings, listed = _provenance(c, kind, path, attrs)
    present = _present_arrays(c, path, g, listed)
    info["arrays"] = sorted(present)
    for name in sorted(present):
        c.note_checksums(present[name], f"{path}/{name}")
    for name, msg in recorded_layout(attrs, present):
        c.problem(f"{path}/{name}", msg)
    generation = attrs.get("generation")
    gen_id = generation_id(generation)
    if generation is not None and gen_id is None:
        c.problem(path, f"attribute generation {generation!r} is not a generation id")
    done = _done_record(c, path, g, gen_id)
    if n is None or nb is None:
        return
    for name, msg in (c.rules.layout_problems(kind, settings, present, listed) if c.rules else []):
        c.problem(f"{path}/{name}" if name else path, msg)
    for name in info["arrays"]:
        if _array_layout(c, path, name, present[name]) and done is not None:
            _done_blocks(c, path, name, present[name], done)
    if done is not None:
        _incomplete(c, kind, path, done, info)


def _provenance(c, kind: str, path: str, attrs: dict) -> tuple[dict, list]:
    """The group's ``settings`` and listed ``arrays`` (empty when unusable), after checking its
    ``kind``, ``settings_hash`` and ``provenance`` attributes."""
    if attrs.get("kind") != kind:
        c.problem(path, f"attribute kind is {attrs.get('kind')!r}, expected {kind!r}")
    settings = attrs.get("settings")
    if not isinstance(settings, dict):
        c.problem(path, "attribute settings missing or not a mapping")
        settings = {}
    elif attrs.get("settings_hash") != settings_hash(settings):
        c.problem(path, f"attribute settings_hash {attrs.get('settings_hash')!r} does not match its "
                  f"settings ({settings_hash(settings)}): settings were edited after writing")
    listed = attrs.get("arrays")
    if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
        c.problem(path, "attribute arrays missing or not a list of names")
        listed = []
    if not isinstance(attrs.get("provenance"), dict):
        c.warning(path, "attribute provenance missing (model, revision, library versions)")
    return settings, listed


def _present_arrays(c, path: str, g, listed: list) -> dict:
    """``{name: zarr array}`` of the listed arrays that open; a listed array missing or unreadable,
    and an array present but not listed, are problems."""
    present = {}
    for name in listed:
        try:
            obj = g[name]
        except KeyError:
            c.problem(f"{path}/{name}", "array listed in the group's attribute arrays is missing")
            continue
        except Exception as e:
            c.problem(f"{path}/{name}", f"metadata (zarr.json) cannot be read ({type(e).__name__}: "
                      f"{first_line(e, '')[:160]})")
            continue
        if not hasattr(obj, "shape"):
            c.problem(f"{path}/{name}", "is a group, expected an array")
            continue
        present[name] = obj
    try:
        unlisted = sorted(name for name, obj in g.members(max_depth=None)
                          if hasattr(obj, "shape") and name != "done" and name not in listed)
    except Exception:
        unlisted = []  # an unreadable member; listed ones are reported above
    for name in unlisted:
        c.problem(f"{path}/{name}", "array present but not listed in the group's attribute arrays")
    return present


def _done_record(c, path: str, g, gen_id: int | None) -> np.ndarray | None:
    """Which blocks are done in the group's generation (None when the record is unusable); a block
    completed by another generation is a problem."""
    n, br, nb = c.rep.num_samples, c.rep.block_rows, c.rep.num_blocks
    d = c.open(g, "done", f"{path}/done")
    if d is None or not hasattr(d, "shape"):
        c.problem(path, "no done record (array done): its blocks cannot be trusted")
        return None
    if nb is None:
        return None
    c.note_checksums(d, f"{path}/done")
    # format 1: bool; format 2: the generation id that completed each block (0: not done)
    want = np.dtype(bool) if gen_id is None else np.dtype("int64")
    if tuple(d.shape) != (nb,) or d.dtype != want or tuple(d.chunks) != (1,):
        c.problem(f"{path}/done", f"shape {tuple(d.shape)} dtype {d.dtype} chunks {tuple(d.chunks)}; "
                  f"expected ({nb},) {want} chunks (1,)")
        return None
    done = np.zeros(nb, dtype=bool)
    for b in range(nb):
        v = c.read(d, f"{path}/done", slice(b, b + 1), group=path, block=b, chunk=f"{d.path}/{_key(d, b)}")
        if v is None:
            continue
        if gen_id is None:
            done[b] = bool(v[0])
        elif int(v[0]) == gen_id:
            done[b] = True
        elif int(v[0]) != 0:
            c.problem(f"{path}/done", "block completed by another generation of the group (a job "
                      "that was writing it before it was replaced with --overwrite): its data "
                      "is not valid in this group", group=path, block=b,
                      rows=(b * br, min((b + 1) * br, n)) if br and n is not None else None)
    return done


def _array_layout(c, path: str, name: str, arr) -> bool:
    """Whether ``arr`` has the store's rows (or its blocks' capacity) chunked by block; a problem if not."""
    n, br, nb = c.rep.num_samples, c.rep.block_rows, c.rep.num_blocks
    cap = arr.attrs.get("block_capacity")
    exp_rows, exp_chunk = (nb * int(cap), int(cap)) if cap else (n, min(br, max(n, 1)))
    if arr.shape[0] != exp_rows:
        c.problem(f"{path}/{name}", f"{arr.shape[0]} rows, expected {exp_rows}"
                  + ("" if cap else " (= len(keys)): not row-aligned"))
        return False
    if arr.chunks[0] != exp_chunk:
        c.problem(f"{path}/{name}", f"chunked by {arr.chunks[0]} rows, expected {exp_chunk} (block_rows): "
                  "a block is not one chunk file")
        return False
    return True


def _done_blocks(c, path: str, name: str, arr, done: np.ndarray) -> None:
    """Each done block of ``arr``: its chunk present (in its shard's index too), decodable, finite."""
    n, br = c.rep.num_samples, c.rep.block_rows
    where = f"{path}/{name}"
    cap = arr.attrs.get("block_capacity")
    cap = int(cap) if cap else None
    for b in np.flatnonzero(done).tolist():
        s, e = (b * cap, (b + 1) * cap) if cap else (b * br, min((b + 1) * br, n))
        rows = None if cap else (s, e)
        # the object named in messages: the block's (first) chunk file, or the shard holding it
        keys = chunk_keys(arr, b)
        chunk = f"{arr.path}/{keys[0] if keys else _key(arr, b, *([0] * (arr.ndim - 1)))}"
        try:
            gone = missing_block(c.path, arr, b)
        except (ValueError, OSError) as err:
            c.problem(where, f"shard index cannot be read ({first_line(err, '')[:120]}): the shard "
                      "object was altered or truncated", group=path, block=b, rows=rows, chunk=chunk)
            continue
        if gone is not None and not gone[2]:
            c.problem(where, f"chunk file missing although done[{b}] is true (it would read back "
                      "as zeros)", group=path, block=b, rows=rows, chunk=f"{arr.path}/{gone[0]}")
            continue
        if gone is not None:
            c.problem(where, f"chunk missing from its shard although done[{b}] is true (it would "
                      "read back as zeros)", group=path, block=b, rows=rows, chunk=chunk)
            continue
        v = c.read(arr, where, slice(s, e), group=path, block=b, rows=rows, chunk=chunk)
        if v is not None and arr.dtype.kind in _FLOAT_KINDS:
            _finite(c, path, where, np.asarray(v), b, s, rows, cap)


def _key(arr, *coords: int) -> str:
    """The key of ``arr``'s chunk at ``coords`` (of the chunk grid, not the shards')."""
    return arr.metadata.chunk_key_encoding.encode_chunk_key(coords)


def _finite(c, path: str, where: str, v: np.ndarray, b: int, s: int, rows, cap) -> None:
    """A problem naming the rows of block ``b`` (first row ``s``) holding NaN or Inf."""
    if v.size == 0:  # zero-length rows (e.g. an imported file of empty vectors): nothing to check
        return
    bad = ~np.isfinite(v.reshape(v.shape[0], -1)).all(axis=1) if v.ndim > 1 else ~np.isfinite(v)
    if bad.any():
        idx = (np.flatnonzero(bad) + s).tolist()
        what = ("flat rows " if cap else "rows ") + f"{idx[:10]}" + (" ..." if len(idx) > 10 else "")
        c.problem(where, f"{len(idx)} rows hold NaN or Inf ({what})", group=path, block=b, rows=rows)


def _incomplete(c, kind: str, path: str, done: np.ndarray, info: dict) -> None:
    """Blocks not done: a warning (the stage has not finished), never read."""
    n, br, nb = c.rep.num_samples, c.rep.block_rows, c.rep.num_blocks
    pend = np.flatnonzero(~done).tolist()
    info["blocks_done"] = int(done.sum())
    info["incomplete_blocks"] = pend
    if pend:
        spans = ", ".join(f"{b} (rows {b * br}-{min((b + 1) * br, n) - 1})" for b in pend[:10])
        c.warning(path, f"{len(pend)} of {nb} blocks incomplete: {spans}"
                  + (" ..." if len(pend) > 10 else "")
                  + (f"; rerun `surpipe {c.rules.stage(kind)}` to finish them" if c.rules
                     else "; rerun the stage that writes it to finish them"),
                  group=path)
