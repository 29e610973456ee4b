"""The check of a store's root and rows for ``surpipe verify`` (:mod:`surpipe.store.verify`): a
:class:`Checker` collects findings into a :class:`~surpipe.store.verify_report.VerifyReport`."""

from __future__ import annotations

import numpy as np

from surpipe.errors import SurpipeError, first_line
from surpipe.store.errors import ChecksumError
from surpipe.store.core import CATEGORY_ARRAY, KEYS_ARRAY, READABLE_FORMATS, ROW_ARRAYS, parse_format
from surpipe.store.integrity import chunk_keys, has_checksums, missing_block, read_rows
from surpipe.store.location import is_remote
from surpipe.store.remote import zarr_store
from surpipe.store.verify_report import Finding, VerifyReport


class Checker:
    """Collects the findings of one store's check into ``rep`` (a :class:`VerifyReport`); the root
    and its rows here, feature groups in :mod:`surpipe.store.verify_groups`."""

    def __init__(self, path, rules=None):  # a local Path, or a RemotePath (surpipe.store.remote)
        self.path = path
        self.rules = rules  # the feature kinds' checks (a KindRules), or None: the store's own only
        self.rep = VerifyReport(str(path))

    def problem(self, where, message, **kw):
        self.rep.problems.append(Finding("problem", where, message, **kw))

    def warning(self, where, message, **kw):
        self.rep.warnings.append(Finding("warning", where, message, **kw))

    # ------------------------------------------------------------------ helpers
    def open(self, parent, name: str, where: str):
        """``parent[name]``, or None (with a problem) when it is missing or its zarr.json is garbage."""
        try:
            return parent[name]
        except KeyError:
            self.problem(where, "missing")
        except Exception as e:
            self.problem(where, f"metadata (zarr.json) cannot be read ({type(e).__name__}: "
                         f"{first_line(e, '')[:160]})")
        return None

    def read(self, arr, where, sel, **loc):
        """``arr[sel]``, or None (with a problem) when a chunk cannot be decoded."""
        try:
            out = read_rows(arr, sel)
            self.rep.chunks_read += 1
            return out
        except ChecksumError:
            self.problem(where, "chunk cannot be decoded: checksum mismatch (crc32c): the chunk file was "
                         "altered, truncated or overwritten after it was written", **loc)
        except Exception as e:  # zarr surfaces codec failures as RuntimeError, ValueError, EOFError, OSError ...
            self.problem(where, f"chunk cannot be decoded ({type(e).__name__}: {first_line(e, '')[:200]}); "
                         "the chunk file is truncated or overwritten", **loc)
        return None

    # ------------------------------------------------------------------ root
    def root(self):
        """The root group (None when it cannot be opened), after checking its attributes."""
        import zarr  # heavy: the store package stays zarr-free on import (surpipe --help)

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
        """``keys`` and the prompts (and category labels where present): N rows, every chunk decodes,
        keys unique and non-empty."""
        n = self.rep.num_samples
        # the category labels are optional (stores made before them have none): checked when present
        optional = [CATEGORY_ARRAY] if (self.path / CATEGORY_ARRAY / "zarr.json").is_file() else []
        for name in (*ROW_ARRAYS, *optional):
            arr = self.open(root, name, name)
            if arr is None:
                continue
            self.note_checksums(arr, name)
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
                key = chunk_keys(arr, ci)[0]
                if missing_block(self.path, arr, ci) is not None:
                    self.problem(name, "chunk file missing (it would read back as empty strings)",
                                 rows=(s, e), chunk=f"{arr.path}/{key}")
                    vals = None
                    continue
                v = self.read(arr, name, slice(s, e), rows=(s, e), chunk=f"{arr.path}/{key}")
                if v is None or vals is None:
                    vals = None
                    continue
                vals.append(np.asarray(v))
            if name == KEYS_ARRAY and vals is not None and vals:
                self._keys([str(k) for v in vals for k in v.tolist()])

    def _keys(self, keys: list[str]) -> None:
        """Every sample key non-empty and unique."""
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

    def note_checksums(self, arr, where: str) -> None:
        """Record ``arr`` as unchecked when its chunks carry no crc32c checksum (format 1)."""
        if hasattr(arr, "dtype") and not has_checksums(arr):
            self.rep.unchecked.append(where)

