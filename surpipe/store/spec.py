"""What the store and the feature kinds (:mod:`surpipe.features`) tell each other, as plain types.
A leaf module (numpy-free, no project imports): the kinds describe their arrays with ``ArraySpec``
and the store creates them; the kinds hand the store their checks as ``KindRules``, so the store
never imports the kinds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

# (array name, or None for the group as a whole; message)
Problems = list[tuple[str | None, str]]


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


@dataclass(frozen=True)
class KindRules:
    """The feature kinds' checks, given to the store by :mod:`surpipe.features` (``RULES``).

    ``layout_problems(kind, settings, present, listed)``: a group's arrays (``present``: name ->
    zarr array; ``listed``: its attribute ``arrays``) against what its kind and settings imply.
    ``stage(kind)``: the command that writes groups of ``kind`` (for messages)."""

    layout_problems: Callable[[str, Mapping[str, Any], Mapping[str, Any], Iterable[str]], Problems]
    stage: Callable[[str], str]
