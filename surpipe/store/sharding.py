"""Shards: several blocks of a feature group in one stored object (zarr v3's sharding codec).

On object storage every chunk is an object, and a 64-row block of a group is about ten of them
(one per array): SURD alone makes ~9k objects per group, 90k at ten times its size. With
``shard_blocks`` K > 1 a group stores K consecutive blocks per shard object; each block stays one
inner chunk, so reads, checksums and completion records keep their block granularity.

Zarr rewrites a whole shard when any inner chunk of it is written, so two writers in one shard lose
data (measured: two writers in one shard lost 124 of 256 chunks). Hence the rules here: a shard
belongs to one rank (shard s to rank s % world_size), and a writer writes a shard's pending blocks
in one piece (:func:`shard_runs`), one object upload instead of K growing rewrites.
"""

from __future__ import annotations

import re
import struct

import google_crc32c

from surpipe.store.errors import ChecksumError

# object stores: fewer, larger objects; a local folder keeps one file per chunk (no rewrite cost)
REMOTE_DEFAULT = 4
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def default_shard_blocks(store: str, requested: int | None) -> int:
    """``requested``, or the default for ``store``: 1 for a local folder (and ``file://``),
    :data:`REMOTE_DEFAULT` for an object-store URL (``s3://``, ``gs://``, ...)."""
    if requested is not None:
        return int(requested)
    m = _URL.match(str(store))
    return REMOTE_DEFAULT if m and m.group(1).lower() not in ("file", "local") else 1


def effective_shard_blocks(shard_blocks: int, num_blocks: int) -> int:
    """The shard size a new group gets: never more blocks than the store has (a store of one
    block, whose chunks are its row count, is never sharded)."""
    return max(1, min(int(shard_blocks), num_blocks)) if num_blocks > 1 else 1


def shard_shape(chunks: tuple[int, ...], k: int) -> tuple[int, ...] | None:
    """The ``shards=`` argument of ``create_array`` for ``k`` chunks per shard (None: unsharded)."""
    if k <= 1 or 0 in chunks:  # zero-width rows (an empty vector) have no chunks to group
        return None
    return (chunks[0] * k, *chunks[1:])


def shard_of(block: int, k: int) -> int:
    return block // max(1, k)


def owner(block: int, k: int, world_size: int) -> int:
    """The rank that writes ``block``: whole shards per rank, so no two ranks share an object."""
    return shard_of(block, k) % world_size


def shard_runs(blocks: list[int], k: int) -> list[list[int]]:
    """``blocks`` (sorted) split into runs of consecutive blocks of one shard each: what a writer
    writes in one piece."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and shard_of(runs[-1][-1], k) == shard_of(b, k) and runs[-1][-1] + 1 == b:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


_EMPTY = 2**64 - 1


def inner_chunks_per_shard(arr) -> int:
    """Inner chunks per shard of ``arr`` along the row axis (1: unsharded)."""
    if not arr.shards:
        return 1
    return max(1, arr.shards[0] // max(1, arr.chunks[0]))


def index_bytes(arr) -> int:
    """Size of a shard's index (zarr's default: at the end, a (offset, nbytes) uint64 pair per inner
    chunk, then its crc32c)."""
    n = 1
    for s, c in zip(arr.shards, arr.chunks):
        n *= max(1, s // max(1, c))
    return 16 * n + 4


def inner_chunk_missing(tail: bytes, arr, block: int) -> bool:
    """Whether the shard whose index ends ``tail`` holds no inner chunk for ``block``. A shard keeps
    one index for all its chunks: an inner chunk absent from it reads back as fill values, so a
    done block must be looked up there, not only its shard object (:func:`index_bytes` bytes).
    A damaged index raises ValueError (:class:`~surpipe.store.errors.ChecksumError` for a checksum
    mismatch)."""
    n = index_bytes(arr)
    if len(tail) < n:
        raise ValueError(f"shard index truncated ({len(tail)} of {n} bytes)")
    idx, crc = tail[-n:-4], tail[-4:]
    if google_crc32c.value(idx) != int.from_bytes(crc, "little"):
        raise ChecksumError("Stored and computed checksum do not match (shard index)")
    # rows are the only sharded axis: the other axes hold one chunk per shard
    off, nbytes = struct.unpack_from("<QQ", idx, 16 * (block % inner_chunks_per_shard(arr)))
    return off == _EMPTY and nbytes == _EMPTY


def read_tail(f, n: int) -> bytes:
    """The last ``n`` bytes of file or object ``f`` (a Path, or a RemotePath)."""
    fs = getattr(f, "fs", None)
    if fs is not None and hasattr(f, "path"):
        return fs.cat_file(f.path, start=-n)
    with open(f, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - n))
        return fh.read()
