"""The feature store: one Zarr v3 group, row-aligned by sample key (layout: docs/store-format.md).

Writers own whole row blocks: every array of a feature group is chunked by ``block_rows`` rows,
so a block is one chunk file per array and two writers never touch the same file. A block is
marked done (``<group>/done[b]``, one chunk file per block) only after every array of the group
has its rows written, so an interrupted job never leaves a half-written block that looks complete.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import metadata as _md
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from surpipe.errors import SurpipeError

FORMAT_VERSION = 1
DEFAULT_BLOCK_ROWS = 256
KINDS = ("llm", "clip", "vae")
CODECS = ("zstd", "blosc-lz4", "gzip", "none")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape stored values (read from metadata: no imports)."""
    out = {}
    for name in ("surpipe", "torch", "transformers", "diffusers", "bitsandbytes", "accelerate",
                 "zarr", "numcodecs", "numpy", "pillow", "tokenizers"):
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            pass
    return out


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short stable hash of a settings mapping (JSON, sorted keys)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Refuse a folder we cannot write into, by creating and deleting a probe file there
    (``os.access`` is not enough: root passes it on read-only mounts)."""
    probe = Path(folder) / f".surpipe-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SurpipeError(f"{what} is read-only or not writable ({e.strerror or e}); "
                           "cannot write to it") from None


def _codecs(name: str):
    import zarr.codecs as zc

    if name == "zstd":
        return (zc.ZstdCodec(level=3),)
    if name == "blosc-lz4":
        return (zc.BloscCodec(cname="lz4", clevel=5, shuffle=zc.BloscShuffle.shuffle),)
    if name == "gzip":
        return (zc.GzipCodec(level=5),)
    if name == "none":
        return None
    raise SurpipeError(f"unknown codec {name!r}; valid choices: {', '.join(CODECS)}")


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


class FeatureGroup:
    """A group of row-aligned arrays (e.g. ``clip/sd15``) with per-block completion records."""

    def __init__(self, store: "FeatureStore", path: str):
        self.store = store
        self.path = path
        self.group = store.root[path]

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def settings(self) -> dict:
        return dict(self.group.attrs.get("settings", {}))

    @property
    def array_names(self) -> list[str]:
        return list(self.group.attrs.get("arrays", []))

    def array(self, name: str):
        try:
            return self.group[name]
        except KeyError:
            raise SurpipeError(
                f"store {self.store.path}: group {self.path} has no array {name!r} "
                f"(it has: {', '.join(self.array_names) or 'none'})"
            ) from None

    def done_mask(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def completed_blocks(self) -> int:
        return int(self.done_mask().sum())

    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    def pending_blocks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Blocks not yet done that belong to ``rank`` (block b belongs to rank b % world_size).

        Ownership depends on the block index alone, never on timing, so ranks that list their
        blocks at different moments still get disjoint sets; a resumed job may use another
        world size.
        """
        pending = np.flatnonzero(~self.done_mask()).tolist()
        return [b for b in pending if b % world_size == rank]

    def write_block(self, block: int, values: Mapping[str, np.ndarray]) -> None:
        """Write every array's rows of ``block`` (one chunk each), then mark the block done.

        A failed write (full disk, I/O error) raises SurpipeError naming the group and block; the
        block stays not done, so a rerun redoes it.
        """
        try:
            self._write_block(block, values)
        except OSError as e:
            where = e.filename or self.store.path
            what = "no space left on device" if e.errno == errno.ENOSPC else "write failed"
            raise SurpipeError(
                f"{what} while writing {self.path} block {block} of store {self.store.path} "
                f"({where}: {e.strerror or e}); block {block} is not marked done: free space or fix "
                "the disk, then rerun the same command (finished blocks are kept)") from None

    def _write_block(self, block: int, values: Mapping[str, np.ndarray]) -> None:
        start, stop = self.store.block_range(block)
        missing = sorted(set(self.array_names) - set(values))
        extra = sorted(set(values) - set(self.array_names))
        if missing or extra:
            raise ValueError(f"write_block({self.path}): missing arrays {missing}, unexpected {extra}")
        for name, x in values.items():
            # write_empty_chunks: an all-zero block still gets its chunk file, so a done block with a
            # missing chunk file is always damage (surpipe verify checks it)
            arr = self.group[name].with_config({"write_empty_chunks": True})
            cap = arr.attrs.get("block_capacity")
            if cap:  # block-ragged array: this block owns flat rows [block * cap, (block + 1) * cap)
                cap = int(cap)
                if x.ndim != arr.ndim or x.shape[0] > cap or x.shape[1:] != arr.shape[1:]:
                    raise ValueError(f"{self.path}/{name}: block {block} expects at most {cap} rows of "
                                     f"shape {arr.shape[1:]}, got {x.shape}")
                full = np.zeros((cap, *arr.shape[1:]), dtype=x.dtype)
                full[: x.shape[0]] = x
                arr[block * cap:(block + 1) * cap] = to_storage(
                    full, str(arr.dtype), f"{self.path}/{name} block {block} (rows {start}-{stop - 1})")
                continue
            if x.shape != (stop - start, *arr.shape[1:]):
                raise ValueError(f"{self.path}/{name}: block {block} expects shape "
                                 f"{(stop - start, *arr.shape[1:])}, got {x.shape}")
            arr[start:stop] = to_storage(x, str(arr.dtype), f"{self.path}/{name} rows {start}-{stop - 1}")
        self.group["done"][block] = True

    def mark_incomplete(self, block: int) -> None:
        self.group["done"][block] = False

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.array(name)[start:stop]

    def require_complete(self) -> None:
        n = self.store.num_blocks
        done = self.completed_blocks()
        if done < n:
            raise SurpipeError(f"store {self.store.path}: group {self.path} is incomplete "
                               f"({done}/{n} blocks done); rerun the stage that writes it")


class FeatureStore:
    """A surpipe feature store (Zarr v3) opened for reading or writing."""

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise SurpipeError(f"feature store not found: {self.path}")
        if not (self.path / "zarr.json").is_file():
            raise SurpipeError(f"{self.path} is not a Zarr v3 store (no zarr.json)")
        if mode != "r":
            if not os.access(self.path, os.W_OK):
                raise SurpipeError(f"feature store {self.path} is read-only; cannot write to it")
            check_writable(self.path, f"feature store {self.path}")
        try:
            self.root = zarr.open_group(str(self.path), mode="r" if mode == "r" else "r+")
        except Exception as e:  # zarr raises several types for broken metadata
            raise SurpipeError(f"cannot open feature store {self.path}: {e}") from None
        fmt = self.root.attrs.get("surpipe_format")
        if fmt is None:
            raise SurpipeError(f"{self.path} is a Zarr group but not a surpipe feature store")
        if fmt != FORMAT_VERSION:
            raise SurpipeError(f"{self.path} has store format {fmt}; this surpipe reads format {FORMAT_VERSION}")
        try:
            self.num_samples = int(self.root.attrs["num_samples"])
            self.block_rows = int(self.root.attrs["block_rows"])
            self.fingerprint = str(self.root.attrs["dataset_fingerprint"])
        except (KeyError, TypeError, ValueError) as e:
            raise SurpipeError(f"{self.path}: damaged store metadata (root attribute {e} missing or "
                               "invalid); run `surpipe verify` on it") from None

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path: str | os.PathLike, dataset, block_rows: int = DEFAULT_BLOCK_ROWS) -> "FeatureStore":
        """Open the store for ``dataset`` at ``path``, creating it (keys and prompts) if absent.

        A store made from another dataset is refused. Creation is atomic (built under a temporary
        name, then renamed), so concurrent ranks may all call this.
        """
        import zarr

        path = Path(path)
        if not path.exists():
            if block_rows < 1:
                raise SurpipeError(f"block_rows must be >= 1, got {block_rows}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SurpipeError(f"cannot create feature store {path}: {e.strerror or e}") from None
            check_writable(path.parent, f"cannot create feature store {path}: folder {path.parent}")
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            n = len(dataset)
            root = zarr.open_group(str(tmp), mode="w")
            root.attrs.update({
                "surpipe_format": FORMAT_VERSION,
                "num_samples": n,
                "block_rows": int(block_rows),
                "dataset_fingerprint": dataset.fingerprint(),
                "dataset_source": str(dataset.source),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "library_versions": library_versions(),
            })
            samples = dataset.samples
            chunk = max(1, min(n, 65536))
            for name, values in (("keys", [s.key for s in samples]),
                                 ("prompts/simple", [s.simple for s in samples]),
                                 ("prompts/complex", [s.complex for s in samples])):
                arr = root.create_array(name, shape=(n,), dtype=str, chunks=(chunk,))
                arr[:] = np.array(values, dtype=object)
            try:
                os.rename(tmp, path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)  # another rank won the race
            else:
                return cls(path, mode="a")
        store = cls(path, mode="a")
        fp = dataset.fingerprint()
        if store.fingerprint != fp or store.num_samples != len(dataset):
            raise SurpipeError(
                f"feature store {path} was made from a different dataset "
                f"({store.num_samples} rows from {store.root.attrs.get('dataset_source')!s}, "
                f"fingerprint {store.fingerprint[:12]}) than {dataset.source} "
                f"({len(dataset)} rows, fingerprint {fp[:12]}); use another --store"
            )
        return store

    # -- rows ---------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return max(1, -(-self.num_samples // self.block_rows))

    def block_range(self, block: int) -> tuple[int, int]:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range 0..{self.num_blocks - 1}")
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.num_samples)

    def keys(self) -> np.ndarray:
        return np.asarray(self.root["keys"][:])

    def prompts(self, which: str) -> np.ndarray:
        """``which`` is ``simple`` or ``complex``."""
        return np.asarray(self.root[f"prompts/{which}"][:])

    # -- feature groups -----------------------------------------------------------------------
    def group_paths(self, kind: str | None = None) -> list[str]:
        """Paths ``kind/name`` of the feature groups present (all kinds if ``kind`` is None)."""
        out = []
        for k in (KINDS if kind is None else (kind,)):
            if k in self.root:
                out += [f"{k}/{name}" for name in sorted(self.root[k].group_keys())]
        return out

    def has_group(self, path: str) -> bool:
        return path in self.root and "done" in self.root[path]

    def group(self, path: str) -> FeatureGroup:
        if not self.has_group(path):
            have = self.group_paths()
            raise SurpipeError(f"store {self.path} has no feature group {path!r} "
                               f"(it has: {', '.join(have) or 'none'})")
        return FeatureGroup(self, path)

    def _half_created(self, path: str) -> bool:
        return path in self.root and "settings" not in self.root[path].attrs

    def check_settings(self, kind: str, name: str, settings: Mapping[str, Any]) -> None:
        """Refuse when group ``kind/name`` exists with settings other than ``settings``, listing
        each difference (cheap: stages call it before loading any model)."""
        path = f"{kind}/{name}"
        if path not in self.root or self._half_created(path):
            return
        settings = json.loads(json.dumps(dict(settings), default=str))
        old = dict(self.root[path].attrs.get("settings", {}))
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise SurpipeError(
                f"store {self.path}: group {path} was written with other settings; "
                "pass --overwrite to replace it or choose another --name",
                [f"{k}: stored {old.get(k)!r}, requested {settings.get(k)!r}" for k in diff])

    def require_group(
        self,
        kind: str,
        name: str,
        settings: Mapping[str, Any],
        arrays: Mapping[str, ArraySpec],
        provenance: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> FeatureGroup:
        """Create feature group ``kind/name`` or reopen it when its ``settings`` match.

        ``settings`` are what determines the stored values (model, revision, layers, dtype ...):
        reopening with different settings is refused unless ``overwrite`` deletes the group.
        """
        if kind not in KINDS:
            raise SurpipeError(f"unknown feature kind {kind!r}; valid choices: {', '.join(KINDS)}")
        if not name or "/" in name or name.startswith("."):
            raise SurpipeError(f"invalid group name {name!r}: use a plain name without '/'")
        path = f"{kind}/{name}"
        settings = json.loads(json.dumps(dict(settings), default=str))
        if self._half_created(path) or (overwrite and path in self.root):
            # a group without settings had its creation interrupted (attrs are written last, and
            # no block is written before this method returns): nothing computed is lost
            del self.root[path]
        if path in self.root:
            self.check_settings(kind, name, settings)
            return FeatureGroup(self, path)
        g = self.root.require_group(path)
        n, b = self.num_samples, self.block_rows
        for aname, spec in arrays.items():
            if spec.block_capacity:
                cap = int(spec.block_capacity)
                g.create_array(aname, shape=(self.num_blocks * cap, *spec.row_shape), dtype=spec.dtype,
                               chunks=(cap, *spec.row_shape), compressors=_codecs(spec.codec),
                               fill_value=0, attributes={"block_capacity": cap})
                continue
            g.create_array(aname, shape=(n, *spec.row_shape), dtype=spec.dtype,
                           chunks=(min(b, max(n, 1)), *spec.row_shape), compressors=_codecs(spec.codec),
                           fill_value=0)
        g.create_array("done", shape=(self.num_blocks,), dtype=bool, chunks=(1,), fill_value=False)
        g.update_attributes({  # one metadata write: a kill leaves all of these or none
            "kind": kind,
            "settings": settings,
            "settings_hash": settings_hash(settings),
            "arrays": list(arrays),
            "provenance": {**dict(provenance or {}), "library_versions": library_versions(),
                           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        })
        return FeatureGroup(self, path)


def block_order(num_blocks: int, epoch: int, seed: int) -> np.ndarray:
    """The block visiting order of ``epoch``: a permutation that depends only on (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_blocks)


def iter_block_rows(num_rows: int, block: int, seed: int, epoch: int) -> Iterable[tuple[int, int]]:
    """Contiguous read ranges of ``block`` rows, shuffled per epoch: a read costs ~1 ms whatever
    its size, so training reads whole runs of rows and shuffles at the block level."""
    nb = max(1, -(-num_rows // block))
    for b in block_order(nb, epoch, seed):
        yield int(b) * block, min((int(b) + 1) * block, num_rows)


def describe_codecs(arr) -> str:
    """A short text of an array's codec chain, for ``inspect``."""
    try:
        comps = arr.compressors
    except AttributeError:
        return "?"
    return "+".join(type(c).__name__.replace("Codec", "").lower() for c in comps) or "none"
