"""The feature store: one Zarr v3 group, row-aligned by sample key (layout: docs/store-format.md).

Writers own whole row blocks: every array of a feature group is chunked by ``block_rows`` rows,
so a block is one chunk file per array and two writers never touch the same file. A block is
marked done (``<group>/done[b]``, one chunk file per block) only after every array of the group
has its rows written, so an interrupted job never leaves a half-written block that looks complete.

Integrity (format 2): every chunk ends with a crc32c checksum (zarr v3's ``crc32c`` codec, last in
the chain), so a flipped byte is a read error naming store, array and block; every group carries a
random ``generation`` id and ``done[b]`` records the generation that completed block b, so a block
written into a group that was since replaced (``--overwrite``) is never taken for valid data.
Groups are created and deleted only under the group's exclusive lock (``surpipe.parallel``).
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

FORMAT_VERSION = 2
# formats this surpipe opens: 1 (no checksums, no generations: reported as unchecked) and 2
READABLE_FORMATS = (1, 2)
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
    """The bytes-to-bytes codec chain of ``name``, always ending with the crc32c checksum (it must
    be last: it covers the stored bytes, so any flipped byte of a chunk file fails the read)."""
    import zarr.codecs as zc

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
    """The chunk files of ``arr`` (a zarr array of a local store) whose first index is ``first``."""
    import itertools

    grid = arr.shards or arr.chunks
    rest = [range(-(-s // max(c, 1))) for s, c in zip(arr.shape[1:], grid[1:])]
    enc = arr.metadata.chunk_key_encoding.encode_chunk_key
    return [Path(store_path) / arr.path / enc((first, *tail)) for tail in itertools.product(*rest)]


def read_failure(store_path, array_path: str, block: int, rows: tuple[int, int] | None,
                 exc: BaseException) -> SurpipeError:
    """A read of a block that failed in zarr (checksum mismatch, undecodable chunk) as a clear error."""
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    what = ("checksum mismatch (crc32c): the chunk file was altered after it was written"
            if "checksum" in text.lower() else
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


def _fresh_attrs(store_path, group_path: str) -> dict | None:
    """The group's attributes as on disk now (zarr objects cache them); None when it is gone."""
    try:
        meta = json.loads((Path(store_path) / group_path / "zarr.json").read_text())
        return dict(meta.get("attributes") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def implied_layout(kind: str, settings: Mapping[str, Any], present: Mapping[str, Any],
                   listed: Iterable[str]) -> list[tuple[str | None, str]]:
    """Problems of a group's arrays against what its ``settings`` imply (row shapes, dtypes) and
    the settings a reader relies on (VAE ``scaling_factor``): [(array name or None, message)]."""
    s = settings
    out: list[tuple[str | None, str]] = []

    def want(name, shape=None, dtype=None):
        if name not in present:
            return
        a = present[name]
        if shape is not None and tuple(a.shape[1:]) != tuple(shape):
            out.append((name, f"row shape {tuple(a.shape[1:])}, but the settings say {tuple(shape)}"))
        if dtype is not None and a.dtype != np.dtype(dtype):
            out.append((name, f"dtype {a.dtype}, but the settings say {dtype}"))

    sd = s.get("store_dtype")
    if isinstance(sd, str):
        try:
            np.dtype(sd)
        except TypeError:
            out.append((None, f"settings store_dtype {sd!r} is not a dtype"))
        else:
            for name, a in present.items():
                if a.dtype.kind in "fc":
                    want(name, dtype=sd)
    if kind == "llm":
        hs = s.get("hidden_size")
        layers = s.get("layers")
        if layers is None and isinstance(s.get("layer"), int):
            layers = [s["layer"]]
        for name in present:
            if name.startswith("layer_") and "/" in name and isinstance(hs, int):
                want(name, shape=(hs,))
        for name in ("token_counts", "token_offsets", "matched"):
            want(name, shape=())
        want("token_counts", dtype="int32")
        want("token_offsets", dtype="int64")
        want("matched", dtype="bool")
        if isinstance(layers, list):
            have = {name.split("/")[0] for name in listed if name.startswith("layer_")}
            for L in layers:
                if f"layer_{L}" not in have:
                    out.append((None, f"settings list layer {L} but no array layer_{L}/... is stored"))
            for h in sorted(have - {f"layer_{L}" for L in layers}):
                out.append((None, f"arrays {h}/... are stored but layer {h[6:]} is not in the settings"))
    elif kind == "clip":
        L, D = s.get("max_length"), s.get("hidden_size")
        if isinstance(L, int) and isinstance(D, int):
            for name in ("simple", "complex"):
                want(name, shape=(L, D))
        for name in ("simple_len", "complex_len"):
            want(name, shape=(), dtype="int32")
    elif kind == "vae":
        C, R, f = s.get("latent_channels"), s.get("resolution"), s.get("downsample_factor")
        names = ["mean", "std"] + (["flip_mean", "flip_std"] if s.get("flip") else [])
        if isinstance(C, int) and isinstance(R, int) and isinstance(f, int) and f > 0:
            for name in names:
                want(name, shape=(C, R // f, R // f))
        if s.get("flip") is True:
            for name in ("flip_mean", "flip_std"):
                if name not in listed:
                    out.append((None, f"settings say flip but array {name} is not stored"))
        for key in ("scaling_factor", "shift_factor"):
            if key in s and not (s[key] is None and key == "shift_factor") and not _finite_number(s[key]):
                out.append((None, f"settings {key} is {s[key]!r}, not a finite number: latents cannot be scaled"))
    return out


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
        if list(a.shape) != spec.get("shape"):
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
        try:
            self.group = store.root[path]
            attrs = dict(self.group.attrs)
        except Exception as e:  # garbage zarr.json: zarr raises JSONDecodeError, TypeError, ...
            raise store.damaged(path, e) from None
        # the generation this object was opened in: its blocks are done only with this id
        self.generation = attrs.get("generation")
        self.gen_id = generation_id(self.generation)

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

    def done_record(self) -> np.ndarray:
        """The raw ``done`` array: bool (format 1) or, per block, the generation id that completed it."""
        try:
            return np.asarray(self.group["done"][:])
        except Exception as e:
            raise self.store.damaged(f"{self.path}/done", e) from None

    def done_mask(self) -> np.ndarray:
        """Blocks complete in this group's generation (a block recorded by another generation of
        the group, i.e. before an ``--overwrite``, is not done)."""
        d = self.done_record()
        if self.gen_id is None:
            return d.astype(bool)
        return d == self.gen_id

    def foreign_blocks(self) -> list[int]:
        """Blocks marked done by another generation of this group (never valid data)."""
        if self.gen_id is None:
            return []
        d = self.done_record()
        return np.flatnonzero((d != 0) & (d != self.gen_id)).tolist()

    def check_generation(self, block: int | None = None) -> None:
        """Refuse to go on when the group on disk is no longer the one this object opened (another
        job replaced it with ``--overwrite``): its blocks must not land in the new group."""
        now = _fresh_attrs(self.store.path, self.path)
        if now is None or now.get("generation") != self.generation:
            at = f" before block {block} was marked done" if block is not None else ""
            raise SurpipeError(
                f"store {self.store.path}: group {self.path} was replaced or deleted by another job "
                f"(--overwrite) while this job was writing it{at}; this job's blocks are not valid in the "
                "new group. Rerun the command to write the group as it is now")

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
        self.check_generation(block)
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
        self.check_generation(block)  # a job that lost its group never marks a block of the new one
        self.group["done"][block] = self.gen_id if self.gen_id is not None else True

    def mark_incomplete(self, block: int) -> None:
        self.group["done"][block] = 0 if self.gen_id is not None else False

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of array ``name``. Every done block it touches must have its chunk
        files (a missing one would read as zeros) and pass its checksum; otherwise SurpipeError."""
        arr = self.array(name)
        n = arr.shape[0]
        start, stop, _ = slice(start, stop).indices(n)
        if stop > start:
            c = int(arr.chunks[0])
            done = self.done_mask()
            for b in range(start // c, -(-stop // c)):
                if b < len(done) and done[b]:
                    for f in chunk_files(self.store.path, arr, b):
                        if not f.is_file():
                            raise missing_chunk(self.store.path, f"{self.path}/{name}", b,
                                                (b * c, min((b + 1) * c, n)), f)
        try:
            return arr[start:stop]
        except Exception as e:
            c = max(int(arr.chunks[0]), 1)
            for b in range(start // c, -(-stop // c)):  # find the block that fails, to name it
                try:
                    arr[b * c:min((b + 1) * c, n)]
                except Exception as eb:
                    raise read_failure(self.store.path, f"{self.path}/{name}", b, (b * c, min((b + 1) * c, n)),
                                       eb) from None
            raise read_failure(self.store.path, f"{self.path}/{name}", start // c, None, e) from None

    def layout_problems(self) -> list[str]:
        """Problems of the group's metadata that make its data unreadable or misread: arrays
        missing or unreadable, rows not aligned with the store, chunks that are not blocks, a
        dtype or shape other than what the settings imply or what was recorded at creation."""
        st = self.store
        problems = []
        attrs = self.attrs
        kind = self.path.split("/")[0]
        settings, listed = attrs.get("settings"), attrs.get("arrays")
        if attrs.get("kind") != kind:
            problems.append(f"attribute kind is {attrs.get('kind')!r}, expected {kind!r}")
        if not isinstance(settings, dict):
            problems.append("attribute settings missing or not a mapping")
            settings = {}
        if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
            problems.append("attribute arrays missing or not a list of names")
            listed = []
        present = {}
        for name in listed:
            try:
                a = self.group[name]
            except KeyError:
                problems.append(f"array {name} is missing")
                continue
            except Exception as e:
                problems.append(f"array {name}: metadata (zarr.json) cannot be read ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:120]})")
                continue
            if not hasattr(a, "dtype"):
                problems.append(f"{name} is a group, expected an array")
                continue
            present[name] = a
            cap = a.attrs.get("block_capacity")
            if cap:
                rows, chunk = st.num_blocks * int(cap), int(cap)
            else:
                rows, chunk = st.num_samples, min(st.block_rows, max(st.num_samples, 1))
            if a.shape[0] != rows:
                problems.append(f"array {name} has {a.shape[0]} rows, expected {rows}")
            elif a.chunks[0] != chunk:
                problems.append(f"array {name} is chunked by {a.chunks[0]} rows, expected {chunk}")
        try:
            d = self.group["done"]
            want = np.dtype(bool) if self.gen_id is None else np.dtype("int64")
            if tuple(d.shape) != (st.num_blocks,) or d.dtype != want or tuple(d.chunks) != (1,):
                problems.append(f"done record has shape {tuple(d.shape)} dtype {d.dtype} chunks {tuple(d.chunks)}; "
                                f"expected ({st.num_blocks},) {want} chunks (1,)")
        except Exception as e:
            problems.append(f"done record unreadable ({type(e).__name__})")
        for name, msg in recorded_layout(attrs, present) + implied_layout(kind, settings, present, listed):
            problems.append(f"{name}: {msg}" if name else msg)
        return problems

    def require_complete(self) -> None:
        foreign = self.foreign_blocks()
        if foreign:
            raise SurpipeError(
                f"store {self.store.path}: group {self.path} blocks {foreign[:10]} were completed by another "
                "generation of the group (it was replaced with --overwrite since); run "
                f"`surpipe verify --repair {self.store.path}` and rerun the stage that writes it")
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
        if fmt not in READABLE_FORMATS:
            raise SurpipeError(f"{self.path} has store format {fmt!r}; this surpipe reads formats "
                               f"{', '.join(map(str, READABLE_FORMATS))}")
        self.format = fmt
        self._layout_ok: set[str] = set()
        try:
            self.num_samples = int(self.root.attrs["num_samples"])
            self.block_rows = int(self.root.attrs["block_rows"])
            self.fingerprint = str(self.root.attrs["dataset_fingerprint"])
        except (KeyError, TypeError, ValueError) as e:
            raise SurpipeError(f"{self.path}: damaged store metadata (root attribute {e} missing or "
                               "invalid); run `surpipe verify` on it") from None

    @property
    def checked(self) -> bool:
        """False for a format-1 store: its chunks carry no checksums (flipped bytes go unnoticed)."""
        return self.format >= 2

    def damaged(self, where: str, exc: BaseException) -> BaseException:
        """A zarr failure to read metadata (garbage or edited zarr.json) as one clear error.

        A DataLoader worker's death is reported by torch's SIGCHLD handler wherever the main
        process happens to be, possibly inside a metadata read: that is passed through unchanged
        so the loader's own message names it, not disguised as store damage."""
        if isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):
            return exc
        text = (str(exc).strip().splitlines() or [""])[0][:160]
        return SurpipeError(f"store {self.path}: the metadata of {where} is damaged ({type(exc).__name__}: {text}); "
                            f"run `surpipe verify {self.path}` for a full report")

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path: str | os.PathLike, dataset, block_rows: int = DEFAULT_BLOCK_ROWS) -> "FeatureStore":
        """Open the store for ``dataset`` at ``path``, creating it (keys and prompts) if absent.

        A store made from another dataset is refused. Creation is atomic (built under a temporary
        name, then renamed), so concurrent ranks may all call this.
        """
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
            try:
                cls._build(tmp, dataset, block_rows)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
                raise SurpipeError(f"cannot create feature store {path}: {what}"
                                   + (f" ({e.filename})" if e.filename else "")) from None
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

    @staticmethod
    def _build(tmp: Path, dataset, block_rows: int) -> None:
        import zarr

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
            arr = root.create_array(name, shape=(n,), dtype=str, chunks=(chunk,),
                                    compressors=_codecs("zstd"))
            arr[:] = np.array(values, dtype=object)

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
            try:
                if k in self.root:
                    out += [f"{k}/{name}" for name in sorted(self.root[k].group_keys())]
            except Exception as e:
                # name the member whose zarr.json is broken, not just its kind folder
                for child in sorted((self.path / k).iterdir()) if (self.path / k).is_dir() else []:
                    try:
                        self.root[f"{k}/{child.name}"]
                    except KeyError:
                        pass
                    except Exception as e2:
                        raise self.damaged(f"{k}/{child.name}", e2) from None
                raise self.damaged(k, e) from None
        return out

    def _exists(self, path: str) -> bool:
        try:
            return path in self.root
        except Exception as e:
            raise self.damaged(path, e) from None

    def has_group(self, path: str) -> bool:
        try:
            return path in self.root and "done" in self.root[path]
        except Exception as e:
            raise self.damaged(path, e) from None

    def group(self, path: str) -> FeatureGroup:
        """Open feature group ``path`` for reading, after checking its metadata (arrays present and
        readable, row-aligned, chunked by block, dtypes and shapes as the settings imply and as
        recorded at creation): a damaged or edited zarr.json is refused here, never misread."""
        if not self.has_group(path):
            have = self.group_paths()
            raise SurpipeError(f"store {self.path} has no feature group {path!r} "
                               f"(it has: {', '.join(have) or 'none'})")
        g = FeatureGroup(self, path)
        if path not in self._layout_ok:
            problems = g.layout_problems()
            if problems:
                raise SurpipeError(f"store {self.path}: group {path} is damaged (its metadata was edited or "
                                   f"broken); run `surpipe verify {self.path}`:", problems)
            self._layout_ok.add(path)
        return g

    def _half_created(self, path: str) -> bool:
        try:
            return path in self.root and "settings" not in self.root[path].attrs
        except Exception as e:
            raise self.damaged(path, e) from None

    def check_settings(self, kind: str, name: str, settings: Mapping[str, Any]) -> None:
        """Refuse when group ``kind/name`` exists with settings other than ``settings``, listing
        each difference (cheap: stages call it before loading any model)."""
        path = f"{kind}/{name}"
        if not self._exists(path) or self._half_created(path):
            return
        settings = json.loads(json.dumps(dict(settings), default=str))
        try:
            old = self.root[path].attrs.get("settings", {})
        except Exception as e:
            raise self.damaged(path, e) from None
        old = dict(old) if isinstance(old, Mapping) else {}
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
        Creating and deleting happen under the group's exclusive lock: a group another job is
        writing is never deleted, and of two jobs creating the same group, the second waits and
        opens the first's. Each creation draws a new ``generation`` id.
        """
        from surpipe.parallel import creation_lock, group_lock

        if kind not in KINDS:
            raise SurpipeError(f"unknown feature kind {kind!r}; valid choices: {', '.join(KINDS)}")
        if not name or "/" in name or name.startswith("."):
            raise SurpipeError(f"invalid group name {name!r}: use a plain name without '/'")
        path = f"{kind}/{name}"
        settings = json.loads(json.dumps(dict(settings), default=str))
        if not overwrite and self._exists(path) and not self._half_created(path):
            self.check_settings(kind, name, settings)  # the common case: no lock needed to reopen
            return FeatureGroup(self, path)
        try:
            with creation_lock(self.path, path):
                # decide again under the lock: another job may have created the group meanwhile
                if self._half_created(path) or (overwrite and self._exists(path)):
                    # a group without settings had its creation interrupted (attrs are written
                    # last, under this lock): nothing computed is lost. Never delete a group
                    # a job is writing: its writers hold the group lock shared
                    with group_lock(self.path, path, exclusive=True):
                        del self.root[path]
                if self._exists(path):
                    self.check_settings(kind, name, settings)
                    return FeatureGroup(self, path)
                self._create_group(path, kind, settings, arrays, provenance)
        except OSError as e:
            what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise SurpipeError(f"cannot create group {path} in store {self.path}: {what}"
                               + (f" ({e.filename})" if e.filename else "")
                               + "; free space (or fix the disk) and rerun the same command") from None
        self._layout_ok.discard(path)
        return FeatureGroup(self, path)

    def _create_group(self, path, kind, settings, arrays, provenance) -> None:
        g = self.root.require_group(path)
        n, b = self.num_samples, self.block_rows
        specs = {}
        for aname, spec in arrays.items():
            if spec.block_capacity:
                cap = int(spec.block_capacity)
                a = g.create_array(aname, shape=(self.num_blocks * cap, *spec.row_shape), dtype=spec.dtype,
                                   chunks=(cap, *spec.row_shape), compressors=_codecs(spec.codec),
                                   fill_value=0, attributes={"block_capacity": cap})
            else:
                a = g.create_array(aname, shape=(n, *spec.row_shape), dtype=spec.dtype,
                                   chunks=(min(b, max(n, 1)), *spec.row_shape),
                                   compressors=_codecs(spec.codec), fill_value=0)
            specs[aname] = {"dtype": str(a.dtype), "shape": list(a.shape), "chunks": list(a.chunks),
                            "checksum": "crc32c"}
        # done[b] holds the generation id that completed block b (0: not done)
        g.create_array("done", shape=(self.num_blocks,), dtype="int64", chunks=(1,), fill_value=0,
                       compressors=_codecs("none"))
        g.update_attributes({  # one metadata write: a kill leaves all of these or none
            "kind": kind,
            "settings": settings,
            "settings_hash": settings_hash(settings),
            "arrays": list(arrays),
            "array_specs": specs,
            "generation": uuid.uuid4().hex,
            "provenance": {**dict(provenance or {}), "library_versions": library_versions(),
                           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        })


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
