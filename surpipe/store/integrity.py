"""Integrity of stored bytes: codec chains ending in a crc32c checksum, generation ids, chunk files,
the layout recorded at creation, and clear errors for reads that fail (docs/store-format.md)."""

from __future__ import annotations

import itertools
import json
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from surpipe.errors import SurpipeError, first_line
from surpipe.store.errors import ChecksumError
from surpipe.store.location import is_url, store_path as _sp
from surpipe.store.sharding import index_bytes, inner_chunk_missing, read_tail

CODECS = ("zstd", "blosc-lz4", "gzip", "none")


def codec_chain(name: str):
    """The bytes-to-bytes codec chain of ``name``, always ending with the crc32c checksum (it must
    be last: it covers the stored bytes, so any flipped byte of a chunk file fails the read)."""
    import zarr.codecs as zc  # heavy (zarr): the store package stays zarr-free on import (surpipe --help)

    if name == "zstd":
        chain = (zc.ZstdCodec(level=3),)
    elif name == "blosc-lz4":
        chain = (zc.BloscCodec(cname="lz4", clevel=5, shuffle=zc.BloscShuffle.shuffle),)
    elif name == "gzip":
        chain = (zc.GzipCodec(level=5),)
    elif name == "none":
        chain = ()
    else:
        raise SurpipeError(f"unknown codec {name!r}; valid choices: {', '.join(CODECS)}")
    return (*chain, zc.Crc32cCodec())


def has_checksums(arr) -> bool:
    """Whether every chunk of ``arr`` carries a crc32c checksum (arrays of format-1 stores do not)."""
    try:
        comps = arr.compressors
    except Exception:
        return False
    return bool(comps) and type(comps[-1]).__name__ == "Crc32cCodec"


def generation_id(generation: Any) -> int | None:
    """The int64 recorded in ``done[b]`` for a group of ``generation`` (a uuid hex string); None for a
    group without one (format 1: ``done`` is bool)."""
    if not isinstance(generation, str) or not generation:
        return None
    try:
        return int(uuid.UUID(generation).hex[:15], 16) + 1  # 60 bits, never 0 (0 = not done)
    except ValueError:
        return None


def chunk_files(store_path: str | os.PathLike, arr, first: int) -> list[Path]:
    """The chunk files of ``arr`` whose first index is ``first``: local Paths, or for a store at a
    URL RemotePaths (``is_file()``, ``read_bytes()`` as a Path's)."""
    return [_base(store_path) / arr.path / key for key in chunk_keys(arr, first)]


def chunk_keys(arr, first: int) -> list[str]:
    """The keys (relative to the array) of the objects holding ``arr``'s chunks whose first index
    is ``first``: the chunk objects, or in a sharded array the shards that hold them."""
    grid = arr.shards or arr.chunks
    first //= max(1, grid[0] // max(1, arr.chunks[0]))  # the shard holding inner chunk `first`
    rest = [range(-(-s // max(c, 1))) for s, c in zip(arr.shape[1:], grid[1:])]
    enc = arr.metadata.chunk_key_encoding.encode_chunk_key
    return [enc((first, *tail)) for tail in itertools.product(*rest)]


def missing_block_file(store_path, arr, block: int):
    """The file (or object) holding ``block`` of ``arr`` when the block's chunk is absent, else None:
    a chunk file that does not exist, or in a sharded array an existing shard whose index has no
    entry for the block (zarr would read it as fill values). A damaged shard index raises ValueError
    (:class:`~surpipe.store.errors.ChecksumError` when its checksum fails)."""
    found = missing_block(store_path, arr, block)
    return None if found is None else found[1]


def missing_block(store_path, arr, block: int) -> tuple[str, Any, bool] | None:
    """``(key, file, in_shard)`` of the first object of ``block`` of ``arr`` whose chunk is absent
    (``key`` relative to the array; ``in_shard``: the shard exists but its index has no entry for
    the block), else None. A damaged shard index raises ValueError, as :func:`missing_block_file`."""
    for key in chunk_keys(arr, block):
        f = _base(store_path) / arr.path / key
        if not f.is_file():
            return key, f, False
        if arr.shards and inner_chunk_missing(read_tail(f, index_bytes(arr)), arr, block):
            return key, f, True
    return None


def _base(store_path):
    """``store_path`` as a Path, or a RemotePath for a store at a URL."""
    return _sp(store_path) if is_url(store_path) else Path(store_path)


def checksum_typed(exc: BaseException) -> BaseException:
    """``exc`` as a :class:`~surpipe.store.errors.ChecksumError` when it reports a crc32c mismatch,
    else ``exc``. The zarr boundary, and the one place that reads an exception's text: zarr's
    ``Crc32cCodec`` raises a plain ValueError ("Stored and computed checksum do not match")."""
    if isinstance(exc, ValueError) and not isinstance(exc, ChecksumError) and "checksum" in str(exc).lower():
        return ChecksumError(str(exc))
    return exc


def read_rows(arr, sel):
    """``arr[sel]``; a chunk failing its crc32c checksum raises :class:`~surpipe.store.errors.ChecksumError`."""
    try:
        return arr[sel]
    except ValueError as e:
        typed = checksum_typed(e)
        if typed is e:
            raise
        raise typed from e


def read_failure(store_path, array_path: str, block: int, rows: tuple[int, int] | None,
                 exc: BaseException) -> SurpipeError:
    """A read of a block that failed in zarr (checksum mismatch, undecodable chunk) as a clear error."""
    text = first_line(exc)[:200]
    what = ("checksum mismatch (crc32c): the chunk file was altered after it was written"
            if isinstance(checksum_typed(exc), ChecksumError) else
            f"chunk cannot be decoded ({type(exc).__name__}: {text}): the chunk file is truncated or overwritten")
    span = f" (rows {rows[0]}-{rows[1] - 1})" if rows else ""
    return SurpipeError(f"store {store_path}: {array_path} block {block}{span}: {what}; run "
                        f"`surpipe verify --repair {store_path}` to mark the block for recomputation, "
                        "then rerun the stage that wrote it")


def missing_chunk(store_path, array_path: str, block: int, rows: tuple[int, int] | None, file: Path) -> SurpipeError:
    span = f" (rows {rows[0]}-{rows[1] - 1})" if rows else ""
    return SurpipeError(f"store {store_path}: {array_path} block {block}{span} is marked done but its chunk file "
                        f"{file} is missing (it would read back as zeros); run `surpipe verify --repair "
                        f"{store_path}` to mark the block for recomputation, then rerun the stage that wrote it")


def fresh_attrs(store_path, group_path: str) -> dict | None:
    """The group's attributes as on disk now (zarr objects cache them); None when it is gone."""
    try:
        meta = json.loads((_base(store_path) / group_path / "zarr.json").read_text())
        return dict(meta.get("attributes") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def recorded_layout(attrs: Mapping[str, Any], present: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems of arrays against the layout recorded at creation (attribute ``array_specs``,
    format 2): an edited ``data_type``, shape or chunk shape in an array's zarr.json."""
    specs = attrs.get("array_specs")
    out = []
    if not isinstance(specs, dict):
        return out
    for name, spec in specs.items():
        a = present.get(name)
        if a is None or not isinstance(spec, dict):
            continue
        if str(a.dtype) != spec.get("dtype"):
            out.append((name, f"data_type {a.dtype}, but it was created as {spec.get('dtype')} "
                              "(its zarr.json was edited: values would be misread)"))
        # the row count is checked against the store's (it changes when the store grows)
        if not isinstance(spec.get("shape"), list) or list(a.shape)[1:] != spec["shape"][1:]:
            out.append((name, f"shape {list(a.shape)}, but it was created as {spec.get('shape')} "
                              "(its zarr.json was edited)"))
        if list(a.chunks) != spec.get("chunks"):
            out.append((name, f"chunk shape {list(a.chunks)}, but it was created as {spec.get('chunks')} "
                              "(its zarr.json was edited)"))
        if spec.get("checksum") == "crc32c" and not has_checksums(a):
            out.append((name, "its codec chain lost the crc32c checksum it was created with "
                              "(its zarr.json was edited)"))
    return out


def to_storage(x: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """Cast ``x`` to the storage dtype, refusing values that are not finite or overflow it."""
    x = np.asarray(x)
    if not np.isfinite(x).all():
        raise SurpipeError(f"{what}: values contain NaN or Inf; refusing to store them")
    target = np.dtype(dtype)
    if target.kind == "f" and target.itemsize < x.dtype.itemsize:
        limit = float(np.finfo(target).max)
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > limit:
            raise SurpipeError(
                f"{what}: largest magnitude {peak:.4g} overflows {target.name} (max {limit:.4g}); "
                "store as float32 instead (--store-dtype float32)"
            )
    return x.astype(target, copy=False)


def describe_codecs(arr) -> str:
    """A short text of an array's codec chain, for ``inspect``."""
    try:
        comps = arr.compressors
    except AttributeError:
        return "?"
    return "+".join(type(c).__name__.replace("Codec", "").lower() for c in comps) or "none"


_codecs = codec_chain  # the name bench/ scripts import
