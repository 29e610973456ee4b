"""``ArraySpec``: how one array of a feature group is stored. A leaf module (numpy-free, no
project imports): the feature kinds describe their arrays with it and the store creates them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArraySpec:
    """An array of a feature group: ``row_shape`` per sample, stored dtype and codec.

    ``block_capacity`` (optional) makes a *block-ragged* array for variable-length rows (e.g.
    per-token states): shape ``[num_blocks * block_capacity, *row_shape]``, chunked by
    ``block_capacity``, so block b owns exactly rows ``[b * cap, (b + 1) * cap)`` (one chunk file)
    and writes its flat rows there, zero-padded to ``cap``; readers locate rows with offsets stored
    in a row-aligned array. Without it (the default) the array is row-aligned ``[N, *row_shape]``.
    """

    row_shape: tuple[int, ...]
    dtype: str = "float16"
    codec: str = "zstd"
    block_capacity: int | None = None
