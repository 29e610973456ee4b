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
    return None if k <= 1 else (chunks[0] * k, *chunks[1:])


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
