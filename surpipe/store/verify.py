"""Check a whole feature store against its contract (docs/store-format.md), and optionally mark
damaged blocks incomplete so the stage that wrote them redoes exactly those blocks.

What is checked:
- root attributes: ``surpipe_format`` (known; ``"<n>+growing"``: a growth that did not finish is a
  problem), ``num_samples``, ``block_rows``, ``dataset_fingerprint``;
- ``keys`` and ``prompts/simple``, ``prompts/complex`` (and the optional ``prompts/category`` where
  present): N rows, every chunk decodes, keys unique and non-empty;
- each feature group ``<kind>/<name>``: provenance attributes (``kind``, ``settings``,
  ``settings_hash`` equal to ``settings_hash(settings)``, ``arrays`` equal to the arrays present),
  the ``done`` record (one chunk per block), every array's row count, chunking, dtype and row shape
  (against the settings that imply them: ``hidden_size``, ``layers``, ``max_length``,
  ``latent_channels``, ``resolution``, ``downsample_factor``, ``store_dtype``, ``flip``);
- each array's metadata against the layout recorded at creation (attribute ``array_specs``: an
  edited ``data_type``, shape or chunk shape in a zarr.json), and the VAE ``scaling_factor``;
- for every block marked done: it was completed by the group's current ``generation`` (not by a
  job writing a group since replaced with ``--overwrite``), each array's chunk file exists (a
  deleted chunk would read back as zeros), passes its crc32c checksum, decodes, and holds no NaN
  or Inf.

Arrays without checksums (stores of format 1) are reported as unchecked (a warning): a flipped
byte that still decodes cannot be found in them. Garbage or unreadable metadata is a problem,
never a traceback.

Blocks not marked done are not valid data: they are reported as warnings (the stage has not
finished), never read. A problem tied to a done block is *repairable*: ``repair=True`` sets
``done[b] = False`` for it (nothing is recomputed), so rerunning the stage redoes only that block.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np

from surpipe.errors import SurpipeError, first_line
from surpipe.store.verify_report import Finding, VerifyReport  # noqa: F401  (re-exported)

_FLOAT_KINDS = "fc"


class _Checker:
    def __init__(self, path):  # a local Path, or a RemotePath (surpipe.store.location)
        self.path = path
        self.rep = VerifyReport(str(path))

    def problem(self, where, message, **kw):
        self.rep.problems.append(Finding("problem", where, message, **kw))

    def warning(self, where, message, **kw):
        self.rep.warnings.append(Finding("warning", where, message, **kw))

    # ------------------------------------------------------------------ helpers
    def _open(self, parent, name: str, where: str):
        """``parent[name]``, or None (with a problem) when it is missing or its zarr.json is garbage."""
        try:
            return parent[name]
        except KeyError:
            self.problem(where, "missing")
        except Exception as e:
            self.problem(where, f"metadata (zarr.json) cannot be read ({type(e).__name__}: "
                         f"{first_line(e, '')[:160]})")
        return None

    def _chunk_file(self, arr, coords: tuple[int, ...]):
        key = arr.metadata.chunk_key_encoding.encode_chunk_key(coords)
        return self.path / arr.path / key

    def _chunk_coords(self, arr, first: int):
        """Every chunk coordinate whose first index is ``first`` (in a sharded array: of the shards
        holding those chunks)."""
        grid_chunks = arr.shards or arr.chunks
        first //= max(1, grid_chunks[0] // max(1, arr.chunks[0]))
        rest = [range(-(-s // max(c, 1))) for s, c in zip(arr.shape[1:], grid_chunks[1:])]
        for tail in itertools.product(*rest):
            yield (first, *tail)

    def _read(self, arr, where, sel, **loc):
        """``arr[sel]``, or None (with a problem) when a chunk cannot be decoded."""
        try:
            out = arr[sel]
            self.rep.chunks_read += 1
            return out
        except Exception as e:  # zarr surfaces codec failures as RuntimeError, ValueError, EOFError, OSError ...
            first = first_line(e, "")[:200]
            if "checksum" in first.lower():
                self.problem(where, "chunk cannot be decoded: checksum mismatch (crc32c): the chunk file was "
                             "altered, truncated or overwritten after it was written", **loc)
            else:
                self.problem(where, f"chunk cannot be decoded ({type(e).__name__}: {first}); "
                             "the chunk file is truncated or overwritten", **loc)
            return None

    # ------------------------------------------------------------------ root
    def root(self):
        import zarr

        from surpipe.store import READABLE_FORMATS

        from surpipe.store.location import is_remote, zarr_store

        if is_remote(self.path) and not (self.path / "zarr.json").is_file() and not self.path.bucket_exists():
            raise SurpipeError(f"feature store {self.path}: bucket {self.path.path.split('/', 1)[0]!r} does not exist "
                               "(or these credentials cannot see it); fix the URL / endpoint")
        if not self.path.exists():
            raise SurpipeError(f"feature store not found: {self.path}")
        if not (self.path / "zarr.json").is_file():
            raise SurpipeError(f"{self.path} is not a Zarr v3 store (no zarr.json)")
        try:
            root = zarr.open_group(zarr_store(self.path, read_only=True), mode="r")
        except Exception as e:
            self.problem("root", f"cannot open the store's root group: {e}")
            return None
        try:
            attrs = dict(root.attrs)
        except Exception as e:
            self.problem("root", f"cannot read the root attributes: {e}")
            return None
        from surpipe.store.growth import parse_format

        fmt, growing = parse_format(attrs.get("surpipe_format"))
        if growing:
            g = attrs.get("growing") if isinstance(attrs.get("growing"), dict) else {}
            self.problem("root", f"a growth from {g.get('from')} to {g.get('to')} rows (appending dataset rows) is "
                         "running or was interrupted: its arrays may not match num_samples yet; rerun "
                         "`surpipe extract-llm` or `surpipe encode-latents` with the grown dataset to complete it")
        if fmt is None:
            self.problem("root", "attribute surpipe_format missing: not a surpipe feature store")
        elif fmt not in READABLE_FORMATS:
            self.problem("root", f"store format {fmt!r}; this surpipe reads formats "
                         f"{', '.join(map(str, READABLE_FORMATS))}")
        elif fmt == 1:
            self.warning("root", "store format 1: written before chunk checksums, so it is UNCHECKED (a flipped "
                         "byte that still decodes cannot be found); rewrite it with this surpipe for crc32c "
                         "checksums")
        self.rep.format = fmt
        n, br = attrs.get("num_samples"), attrs.get("block_rows")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            self.problem("root", f"attribute num_samples missing or invalid ({n!r})")
            n = None
        if not isinstance(br, int) or isinstance(br, bool) or br < 1:
            self.problem("root", f"attribute block_rows missing or invalid ({br!r})")
            br = None
        fp = attrs.get("dataset_fingerprint")
        if not isinstance(fp, str) or not fp:
            self.problem("root", f"attribute dataset_fingerprint missing or invalid ({fp!r})")
        self.rep.num_samples, self.rep.block_rows = n, br
        if n is not None and br is not None:
            self.rep.num_blocks = max(1, -(-n // br))
        return root

    def rows_arrays(self, root):
        from surpipe.store.core import CATEGORY_ARRAY, KEYS_ARRAY, ROW_ARRAYS

        n = self.rep.num_samples
        # the category labels are optional (stores made before them have none): checked when present
        optional = [CATEGORY_ARRAY] if (self.path / CATEGORY_ARRAY / "zarr.json").is_file() else []
        for name in (*ROW_ARRAYS, *optional):
            arr = self._open(root, name, name)
            if arr is None:
                continue
            self._note_checksums(arr, name)
            if not hasattr(arr, "shape"):
                self.problem(name, "is a group, expected an array")
                continue
            if n is not None and tuple(arr.shape) != (n,):
                self.problem(name, f"shape {tuple(arr.shape)}, expected ({n},): rows are not aligned with num_samples")
                continue
            c = arr.chunks[0]
            vals = []
            for ci, s in enumerate(range(0, arr.shape[0], c)):
                e = min(s + c, arr.shape[0])
                if not self._chunk_file(arr, (ci,)).is_file():
                    self.problem(name, "chunk file missing (it would read back as empty strings)",
                                 rows=(s, e), chunk=f"{arr.path}/{self._key(arr, (ci,))}")
                    vals = None
                    continue
                v = self._read(arr, name, slice(s, e), rows=(s, e), chunk=f"{arr.path}/{self._key(arr, (ci,))}")
                if v is None or vals is None:
                    vals = None
                    continue
                vals.append(np.asarray(v))
            if name == KEYS_ARRAY and vals is not None and vals:
                keys = [str(k) for v in vals for k in v.tolist()]
                empty = [i for i, k in enumerate(keys) if not k]
                if empty:
                    self.problem("keys", f"{len(empty)} empty sample keys (first at row {empty[0]})")
                seen: dict[str, int] = {}
                dups = []
                for i, k in enumerate(keys):
                    if k in seen:
                        dups.append((k, seen[k], i))
                    else:
                        seen[k] = i
                if dups:
                    k, a, b = dups[0]
                    self.problem("keys", f"{len(dups)} duplicate sample keys, e.g. {k!r} at rows {a} and {b}")

    def _note_checksums(self, arr, where: str) -> None:
        from surpipe.store import has_checksums

        if hasattr(arr, "dtype") and not has_checksums(arr):
            self.rep.unchecked.append(where)

    @staticmethod
    def _key(arr, coords) -> str:
        return arr.metadata.chunk_key_encoding.encode_chunk_key(coords)

    # ------------------------------------------------------------------ groups
    def groups(self, root):
        from surpipe.store import KINDS

        for kind in KINDS:
            try:
                if kind not in root:
                    continue
                kg = root[kind]
            except Exception as e:
                self.problem(kind, f"metadata (zarr.json) cannot be read ({type(e).__name__}: "
                             f"{first_line(e, '')[:160]})")
                continue
            try:
                names = sorted(kg.group_keys())
            except Exception:  # a member's zarr.json is broken: list the folders, report each below
                names = sorted(c.name for c in (self.path / kind).iterdir() if (c / "zarr.json").exists())
            try:
                for name, _ in sorted(kg.arrays()):
                    self.problem(f"{kind}/{name}", f"an array directly under {kind}/; feature groups are {kind}/<name>/")
            except Exception:
                pass  # an unreadable member: reported below, by the group it belongs to
            for name in names:
                path = f"{kind}/{name}"
                g = self._open(root, path, path)
                if g is None or not hasattr(g, "group_keys"):
                    continue
                self.group(root, kind, path, g)

    def group(self, root, kind: str, path: str, g):
        from surpipe.features import feature_kind, layout_problems
        from surpipe.store import generation_id, recorded_layout, settings_hash

        try:
            attrs = dict(g.attrs)
        except Exception as e:
            self.problem(path, f"attributes cannot be read: {e}")
            return
        n, br, nb = self.rep.num_samples, self.rep.block_rows, self.rep.num_blocks
        info: dict[str, Any] = {"blocks_done": 0, "num_blocks": nb, "incomplete_blocks": [], "arrays": []}
        self.rep.groups[path] = info

        # provenance
        if attrs.get("kind") != kind:
            self.problem(path, f"attribute kind is {attrs.get('kind')!r}, expected {kind!r}")
        settings = attrs.get("settings")
        if not isinstance(settings, dict):
            self.problem(path, "attribute settings missing or not a mapping")
            settings = {}
        elif attrs.get("settings_hash") != settings_hash(settings):
            self.problem(path, f"attribute settings_hash {attrs.get('settings_hash')!r} does not match its "
                         f"settings ({settings_hash(settings)}): settings were edited after writing")
        listed = attrs.get("arrays")
        if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
            self.problem(path, "attribute arrays missing or not a list of names")
            listed = []
        if not isinstance(attrs.get("provenance"), dict):
            self.warning(path, "attribute provenance missing (model, revision, library versions)")
        present = {}
        for name in listed:
            try:
                obj = g[name]
            except KeyError:
                self.problem(f"{path}/{name}", "array listed in the group's attribute arrays is missing")
                continue
            except Exception as e:
                self.problem(f"{path}/{name}", f"metadata (zarr.json) cannot be read ({type(e).__name__}: "
                             f"{first_line(e, '')[:160]})")
                continue
            if not hasattr(obj, "shape"):
                self.problem(f"{path}/{name}", "is a group, expected an array")
                continue
            present[name] = obj
        try:
            unlisted = sorted(name for name, obj in g.members(max_depth=None)
                              if hasattr(obj, "shape") and name != "done" and name not in listed)
        except Exception:
            unlisted = []  # an unreadable member; listed ones are reported above
        for name in unlisted:
            self.problem(f"{path}/{name}", "array present but not listed in the group's attribute arrays")
        info["arrays"] = sorted(present)
        for name in sorted(present):
            self._note_checksums(present[name], f"{path}/{name}")
        for name, msg in recorded_layout(attrs, present):
            self.problem(f"{path}/{name}", msg)
        generation = attrs.get("generation")
        gen_id = generation_id(generation)
        if generation is not None and gen_id is None:
            self.problem(path, f"attribute generation {generation!r} is not a generation id")

        # the done record
        done = None
        d = self._open(g, "done", f"{path}/done")
        if d is None or not hasattr(d, "shape"):
            self.problem(path, "no done record (array done): its blocks cannot be trusted")
        elif nb is not None:
            self._note_checksums(d, f"{path}/done")
            # format 1: bool; format 2: the generation id that completed each block (0: not done)
            want = np.dtype(bool) if gen_id is None else np.dtype("int64")
            if tuple(d.shape) != (nb,) or d.dtype != want or tuple(d.chunks) != (1,):
                self.problem(f"{path}/done", f"shape {tuple(d.shape)} dtype {d.dtype} chunks {tuple(d.chunks)}; "
                             f"expected ({nb},) {want} chunks (1,)")
            else:
                done = np.zeros(nb, dtype=bool)
                for b in range(nb):
                    v = self._read(d, f"{path}/done", slice(b, b + 1), group=path, block=b,
                                   chunk=f"{d.path}/{self._key(d, (b,))}")
                    if v is None:
                        continue
                    if gen_id is None:
                        done[b] = bool(v[0])
                    elif int(v[0]) == gen_id:
                        done[b] = True
                    elif int(v[0]) != 0:
                        self.problem(f"{path}/done", "block completed by another generation of the group (a job "
                                     "that was writing it before it was replaced with --overwrite): its data "
                                     "is not valid in this group", group=path, block=b,
                                     rows=(b * br, min((b + 1) * br, n)) if br and n is not None else None)
        if n is None or nb is None:
            return
        for name, msg in layout_problems(kind, settings, present, listed):
            self.problem(f"{path}/{name}" if name else path, msg)
        # per array: layout, then the done blocks' chunks
        for name in info["arrays"]:
            arr = present[name]
            where = f"{path}/{name}"
            cap = arr.attrs.get("block_capacity")
            if cap:
                cap = int(cap)
                exp_rows, exp_chunk = nb * cap, cap
            else:
                exp_rows, exp_chunk = n, min(br, max(n, 1))
            if arr.shape[0] != exp_rows:
                self.problem(where, f"{arr.shape[0]} rows, expected {exp_rows}"
                             + ("" if cap else f" (= len(keys)): not row-aligned"))
                continue
            if arr.chunks[0] != exp_chunk:
                self.problem(where, f"chunked by {arr.chunks[0]} rows, expected {exp_chunk} (block_rows): "
                             "a block is not one chunk file")
                continue
            if done is None:
                continue
            is_float = arr.dtype.kind in _FLOAT_KINDS
            for b in np.flatnonzero(done).tolist():
                s, e = (b * cap, (b + 1) * cap) if cap else (b * br, min((b + 1) * br, n))
                rows = None if cap else (s, e)
                coords = list(self._chunk_coords(arr, b))
                # the object named in messages: the block's (first) chunk file, or the shard holding it
                chunk = f"{arr.path}/{self._key(arr, coords[0] if coords else (b, *([0] * (arr.ndim - 1))))}"
                missing = [c for c in coords if not self._chunk_file(arr, c).is_file()]
                if missing:
                    self.problem(where, "chunk file missing although done[{}] is true (it would read back "
                                 "as zeros)".format(b), group=path, block=b, rows=rows,
                                 chunk=f"{arr.path}/{self._key(arr, missing[0])}")
                    continue
                if arr.shards:
                    from surpipe.store.sharding import index_bytes, inner_chunk_missing, read_tail

                    shard = self._chunk_file(arr, coords[0])
                    try:
                        gone = inner_chunk_missing(read_tail(shard, index_bytes(arr)), arr, b)
                    except (ValueError, OSError) as e:
                        self.problem(where, f"shard index cannot be read ({first_line(e, '')[:120]}): the shard "
                                     "object was altered or truncated", group=path, block=b, rows=rows,
                                     chunk=chunk)
                        continue
                    if gone:
                        self.problem(where, f"chunk missing from its shard although done[{b}] is true (it would "
                                     "read back as zeros)", group=path, block=b, rows=rows,
                                     chunk=chunk)
                        continue
                v = self._read(arr, where, slice(s, e), group=path, block=b, rows=rows,
                               chunk=chunk)
                if v is None or not is_float:
                    continue
                v = np.asarray(v)
                if v.size == 0:  # zero-length rows (e.g. an imported file of empty vectors): nothing to check
                    continue
                bad = ~np.isfinite(v.reshape(v.shape[0], -1)).all(axis=1) if v.ndim > 1 else ~np.isfinite(v)
                if bad.any():
                    idx = (np.flatnonzero(bad) + s).tolist()
                    what = f"rows {idx[:10]}" + (" ..." if len(idx) > 10 else "") if not cap else \
                        f"flat rows {idx[:10]}" + (" ..." if len(idx) > 10 else "")
                    self.problem(where, f"{len(idx)} rows hold NaN or Inf ({what})", group=path, block=b, rows=rows)
        if done is not None:
            pend = np.flatnonzero(~done).tolist()
            info["blocks_done"] = int(done.sum())
            info["incomplete_blocks"] = pend
            if pend:
                spans = ", ".join(f"{b} (rows {b * br}-{min((b + 1) * br, n) - 1})" for b in pend[:10])
                self.warning(path, f"{len(pend)} of {nb} blocks incomplete: {spans}"
                             + (" ..." if len(pend) > 10 else "")
                             + f"; rerun `surpipe {feature_kind(kind).stage}` to finish them",
                             group=path)


def check_store(path) -> VerifyReport:
    """Check the store at ``path`` (read-only); see the module docstring for what is checked."""
    t0 = time.perf_counter()
    from surpipe.store.core import local_store_path

    c = _Checker(local_store_path(path))
    root = c.root()
    if root is not None:
        c.rows_arrays(root)
        c.groups(root)
        u = c.rep.unchecked
        if u:
            c.warning("checksums", f"{len(u)} arrays carry no crc32c checksums (UNCHECKED: a flipped byte that "
                      f"still decodes cannot be found in them): {', '.join(u[:8])}" + (" ..." if len(u) > 8 else ""))
    c.rep.seconds = time.perf_counter() - t0
    return c.rep


def _drop_damaged_shards(store, g, blocks: list[int]) -> list[int]:
    """For a sharded group: delete the shard objects holding damaged ``blocks`` (zarr re-reads a shard
    before writing into it, so a damaged one could never be rewritten) and return every block they
    held, all to be recomputed; unsharded: ``blocks``."""
    from surpipe.store.integrity import chunk_files

    k = g.shard_blocks
    if k <= 1:
        return list(blocks)
    out = sorted({x for b in blocks for x in range((b // k) * k, min((b // k + 1) * k, store.num_blocks))})
    for name in [*g.array_names, "done"]:  # the done shard too: its marks for these blocks are void
        arr = g.group[name]
        for s in sorted({b // k for b in blocks}):
            for f in chunk_files(store.path, arr, s * k):
                f.unlink(missing_ok=True)
    return out


def verify_store(path, repair: bool = False) -> VerifyReport:
    """Check the store; with ``repair``, mark every damaged done block incomplete (``done[b] = False``,
    nothing recomputed) and check again. The returned report's ``repaired`` lists what was marked;
    problems that no rerun can fix (root attributes, keys, layout) stay problems."""
    rep = check_store(path)
    damaged = rep.damaged_blocks()
    if not repair or not damaged:
        return rep
    from surpipe.store import FeatureGroup, FeatureStore

    from surpipe.store.locks import group_lock

    store = FeatureStore(path, mode="a")  # refuses a read-only store with a clear message
    for gpath, blocks in damaged.items():
        # exclusively: a writer marking blocks of the same done object meanwhile could undo a mark
        with group_lock(store.path, gpath, exclusive=True):
            g = FeatureGroup(store, gpath)
            for b in _drop_damaged_shards(store, g, blocks):
                g.mark_incomplete(b)
    fixed = [p for p in rep.problems if p.group is not None and p.block is not None]
    t = rep.seconds
    rep = check_store(path)
    rep.repaired = fixed
    rep.seconds += t
    return rep
