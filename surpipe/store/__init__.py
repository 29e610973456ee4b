"""The feature store: one Zarr v3 group, row-aligned by sample key (layout: docs/store-format.md).

Writers own whole row blocks: every array of a feature group is chunked by ``block_rows`` rows,
so a block is one chunk file per array and two writers never touch the same file. A block is
marked done (``<group>/done[b]``, one chunk file per block) only after every array of the group
has its rows written, so an interrupted job never leaves a half-written block that looks complete.

Integrity (format 2): every chunk ends with a crc32c checksum (zarr v3's ``crc32c`` codec, last in
the chain), so a flipped byte is a read error naming store, array and block; every group carries a
random ``generation`` id and ``done[b]`` records the generation that completed block b, so a block
written into a group that was since replaced (``--overwrite``) is never taken for valid data.
Groups are created and deleted only under the group's exclusive lock (:mod:`surpipe.store.locks`).

Modules, bottom up (none imports one above it): ``core`` (the format's names and numbers),
``errors`` (typed failures), ``remote`` / ``location`` (object storage, store paths and URLs),
``sharding``, ``integrity`` (checksums, generations, chunk files), ``sidecar`` / ``lease`` / ``locks``
(what lives beside a store; leases on object storage), ``creation`` (a new store's files),
``matching`` (a store's rows against a dataset), ``group_layout`` / ``group`` (feature groups and
their blocks), ``growth`` (appending rows), ``feature_store`` (the store object, create / open /
grow), ``opening`` (the one step a stage-one command calls), ``verify`` (whole-store checks),
``blockjob`` and ``cache``; ``spec`` (a leaf) is what the store and the feature kinds tell each
other. Each kind's contract (which arrays, what their settings imply) is :mod:`surpipe.features`,
which builds on the store; the store never imports it, and runs its checks when handed them
(``FeatureStore.group(path, rules=...)``, ``verify_store(..., rules=...)``).
"""

from surpipe.store.feature_store import FeatureStore, create_store, open_or_create
from surpipe.store.creation import check_writable
from surpipe.store.errors import ChecksumError, DatasetMismatch, StoreExists, StoreNotFound
from surpipe.store.core import (DEFAULT_BLOCK_ROWS, FORMAT_VERSION, KINDS, READABLE_FORMATS, library_versions,
                                  settings_hash)
from surpipe.store.group import FeatureGroup
from surpipe.store.integrity import (CODECS, _codecs, chunk_files, codec_chain, describe_codecs, fresh_attrs,
                                     generation_id, has_checksums, missing_chunk, read_failure, recorded_layout,
                                     to_storage)
from surpipe.store.matching import StoreMatch, match_store
from surpipe.store.sidecar import config_file, sidecar_dir
from surpipe.store.spec import ArraySpec, KindRules

__all__ = [
    "CODECS", "DEFAULT_BLOCK_ROWS", "FORMAT_VERSION", "KINDS", "READABLE_FORMATS",
    "ArraySpec", "ChecksumError", "KindRules", "DatasetMismatch", "FeatureGroup", "FeatureStore", "StoreExists", "StoreMatch", "StoreNotFound",
    "check_writable", "chunk_files", "codec_chain", "config_file", "create_store", "describe_codecs",
    "fresh_attrs", "generation_id", "has_checksums", "library_versions", "match_store", "missing_chunk",
    "open_or_create", "read_failure", "recorded_layout", "settings_hash", "sidecar_dir", "to_storage",
]
