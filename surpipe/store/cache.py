"""A bounded local read-through cache of a remote store's chunks, for training.

``surpipe train`` on a store at a URL reads every block once per epoch; the chunk objects it reads
are kept on local disk (``--cache-dir``, at most ``--cache-gb``, least recently used evicted), so
the second epoch reads no chunk data remotely. Only the feature arrays' chunks are cached, never
metadata (``zarr.json``) nor the ``done`` records: those are read fresh, so a block being
rewritten is still refused by the reader.

Stale bytes are the danger (they pass their crc32c checksums), so a cached chunk is keyed by what
makes its bytes final: the store's URL, the group's path and ``generation`` (a new one at every
``--overwrite``), the store's row count (a growth rewrites the partial last block) and the group's
``rewrites`` count (``verify --repair`` bumps it before a block is recomputed in the same
generation). A change of any of them is a new namespace: old entries are never served, and age
out of the LRU.

The bound: each process counts the bytes it found at start plus what it added, and rescans the
folder (evicting the least recently used files down to 90 % of the cap) whenever that count passes
the cap or it has added 1/16 of the cap since its last scan; with W DataLoader workers filling the
cache at once the folder stays below ``cap * (1 + W / 16)``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from pathlib import Path
from typing import Any, Mapping

import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from surpipe.store.location import CACHE_DIR_ENV, CACHE_GB_ENV, DEFAULT_CACHE_GB
from surpipe.store.remote import zarr_store


def default_cache_dir() -> Path:
    """``$SURPIPE_STORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/surpipe/store-cache`` (``~/.cache/...``)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "surpipe" / "store-cache"


def default_cache_bytes() -> int:
    """``$SURPIPE_STORE_CACHE_GB`` (default 20) in bytes; 0 turns the cache off."""
    try:
        gb = float(os.environ.get(CACHE_GB_ENV, DEFAULT_CACHE_GB))
    except ValueError:
        gb = DEFAULT_CACHE_GB
    return max(0, int(gb * (1 << 30)))


def namespace(url: str, group: str, generation: Any, num_samples: int, rewrites: Any) -> str:
    """The cache namespace of a group's chunks: changes whenever their bytes may (module docstring)."""
    blob = "\0".join(map(str, (url, group, generation, num_samples, rewrites or 0)))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class LocalChunkCache:
    """Files ``<folder>/<namespace>/<key>`` with an LRU byte cap (mtime is the recency)."""

    def __init__(self, folder: Path, cap_bytes: int):
        self.folder = Path(folder)
        self.cap = int(cap_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._size = self._scan(evict=False)
        self._added = 0
        self.hits = self.misses = 0

    def _scan(self, evict: bool) -> int:
        files = []
        for dirpath, _, names in os.walk(self.folder):
            for n in names:
                p = os.path.join(dirpath, n)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
        total = sum(f[1] for f in files)
        if evict and total > self.cap:
            files.sort()
            target = int(self.cap * 0.9)
            for _, size, p in files:
                if total <= target:
                    break
                try:
                    os.unlink(p)
                    total -= size
                except OSError:
                    pass
        return total

    def path(self, ns: str, key: str) -> Path:
        return self.folder / ns / key

    def get(self, ns: str, key: str) -> bytes | None:
        p = self.path(ns, key)
        try:
            data = p.read_bytes()
        except OSError:
            self.misses += 1
            return None
        try:
            os.utime(p)  # recency for the LRU
        except OSError:
            pass
        self.hits += 1
        return data

    def put(self, ns: str, key: str, data: bytes) -> None:
        if len(data) > self.cap:
            return
        p = self.path(ns, key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, p)  # readers (other workers) see a whole file or none
        except OSError:
            return  # a full or read-only cache disk: reads still work, from the store
        with self._lock:
            self._size += len(data)
            self._added += len(data)
            if self._size > self.cap or self._added > self.cap // 16:
                self._size = self._scan(evict=True)
                self._added = 0


class CachedStore(WrapperStore):
    """A zarr store wrapper reading the chunks under ``prefixes`` (``{"llm/x/layer_3/pooled/": ns}``)
    through a :class:`LocalChunkCache`; everything else goes to the wrapped store. Counts the
    chunk bytes it had to fetch (``remote_gets``) and remembers keys that do not exist
    (``missing``: a done block's missing chunk would otherwise read as fill values)."""

    def __init__(self, store, cache: LocalChunkCache, prefixes: Mapping[str, str]):
        super().__init__(store)
        self.cache = cache
        self.prefixes = dict(prefixes)
        self.remote_gets = 0
        self.missing: set[str] = set()

    def _with_store(self, store):
        out = type(self)(store, self.cache, self.prefixes)
        out.missing = self.missing
        return out

    def _ns(self, key: str) -> str | None:
        for prefix, ns in self.prefixes.items():
            if key.startswith(prefix) and not key.endswith("zarr.json"):
                return ns
        return None

    async def get(self, key, prototype, byte_range=None):
        ns = self._ns(key)
        if ns is None:
            return await self._store.get(key, prototype, byte_range)
        data = self.cache.get(ns, key)
        if data is None:
            # the whole object, also for a range: a shard's index and its inner chunks are read as
            # ranges of one object (zarr sharding), which the cache keeps whole
            value = await self._store.get(key, prototype)
            self.remote_gets += 1
            if value is None:
                self.missing.add(key)
                return None
            data = value.to_bytes()
            self.cache.put(ns, key, data)
        return prototype.buffer.from_bytes(_byte_range(data, byte_range))

    async def exists(self, key: str) -> bool:
        ns = self._ns(key)
        if ns is not None and self.cache.path(ns, key).is_file():
            return True
        return await self._store.exists(key)

    def drop(self, key: str) -> bool:
        """Forget the cached copy of ``key``; whether there was one."""
        ns = self._ns(key)
        if ns is None:
            return False
        try:
            self.cache.path(ns, key).unlink()
            return True
        except OSError:
            return False

    def cached_bytes(self, key: str) -> bytes:
        """The cached object ``key`` (after :meth:`ensure`), or b"" when it is not cached."""
        ns = self._ns(key)
        return (self.cache.get(ns, key) or b"") if ns is not None else b""

    def ensure(self, key: str) -> bool:
        """Whether chunk ``key`` exists, fetching it into the cache when it is not there yet."""
        ns = self._ns(key)
        if ns is not None and self.cache.path(ns, key).is_file():
            return True
        return sync(self.get(key, default_buffer_prototype())) is not None


def _byte_range(data: bytes, byte_range) -> bytes:
    """``data`` cut to a zarr byte request (None: all of it)."""
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start:byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset:]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix:] if byte_range.suffix else b""
    raise TypeError(f"unknown byte request {byte_range!r}")


def cached_root(store, groups: Mapping[str, Any], arrays: Mapping[str, list[str]]):
    """(zarr root group reading ``arrays`` ({group path: [array names]}) of remote ``store``
    through the local cache, the :class:`CachedStore`); (None, None) when the cache is off."""
    cap = default_cache_bytes()
    if cap <= 0:
        return None, None
    cache = LocalChunkCache(default_cache_dir(), cap)
    prefixes = {}
    for gpath, names in arrays.items():
        g = groups[gpath]
        attrs = g.attrs
        ns = namespace(str(store.path), gpath, attrs.get("generation"), store.num_samples, attrs.get("rewrites"))
        for name in names:
            prefixes[f"{gpath}/{name}/"] = ns
    wrapped = CachedStore(zarr_store(store.path, read_only=True), cache, prefixes)
    return zarr.open_group(wrapped, mode="r"), wrapped
