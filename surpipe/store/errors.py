"""The store's typed failures: callers tell them apart by type, never by message text. Each is a
``SurpipeError`` (one message, exit 1) except :class:`ChecksumError`, which is what a read raises
before it is turned into a message naming store, array and block (:func:`surpipe.store.integrity.read_failure`)."""

from __future__ import annotations

from surpipe.errors import SurpipeError

Row = tuple  # (key, simple, complex)


class StoreNotFound(SurpipeError):
    """There is no feature store at the given path."""


class HalfBuilt(StoreNotFound):
    """A remote store whose creation (in place: object stores have no rename) did not finish."""


class StoreExists(SurpipeError):
    """Another process created the store first (data-parallel ranks race to create it)."""


class DatasetMismatch(SurpipeError):
    """The store was made from other rows than the dataset's.

    ``row`` is the first store row that differs (the store's row count when the dataset has rows
    past the store's end), ``stored`` the store's (key, simple, complex) there or None, ``given``
    the dataset's row at that place or None, ``detail`` one line saying how they differ."""

    def __init__(self, message: str, *, row: int | None, stored: Row | None, given: Row | None, detail: str):
        super().__init__(message)
        self.row, self.stored, self.given, self.detail = row, stored, given, detail


class ChecksumError(ValueError):
    """Stored bytes fail their crc32c checksum (a chunk, or a shard's index): altered after they were
    written. A ValueError, as zarr's own codec reports a mismatch."""
