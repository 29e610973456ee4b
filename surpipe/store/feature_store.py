"""The feature store object: one Zarr v3 group, row-aligned by sample key, holding feature groups
(layout: docs/store-format.md), and the steps that return one: :func:`create_store`,
:func:`open_or_create` (create, or open and match to a dataset) and :func:`grow_store`.

Their parts live below this module: building a new store's files (:mod:`surpipe.store.creation`),
matching rows (:mod:`surpipe.store.matching`), growing (:mod:`surpipe.store.growth`), a group's
blocks (:mod:`surpipe.store.group`) and layout (:mod:`surpipe.store.group_layout`)."""

from __future__ import annotations

import errno
import json
import os
from typing import Any, Mapping

import numpy as np

from surpipe.errors import SurpipeError, first_line
from surpipe.store.creation import build_local, build_remote, building_marker, check_writable
from surpipe.store.errors import HalfBuilt, StoreExists, StoreNotFound
from surpipe.store.core import (CATEGORY_ARRAY, DEFAULT_BLOCK_ROWS, KEYS_ARRAY, KINDS, PROMPT_ARRAYS,
                                  READABLE_FORMATS, parse_format)
from surpipe.store.group import FeatureGroup
from surpipe.store.group_layout import create_group
from surpipe.store.growth import grow_rows
from surpipe.store.location import is_remote, store_path
from surpipe.store.locks import creation_lock, group_lock, growth_lock
from surpipe.store.spec import ArraySpec, KindRules
from surpipe.store.matching import LeftOut, StoreMatch, has_rows_after, match_store, plan_rows
from surpipe.store.remote import remote_failure, zarr_store


def local_store_path(path: str | os.PathLike):
    """``path`` as the store's location: a local :class:`Path` as always, or for an fsspec URL
    (``s3://``, ``gs://``; ``file://`` is local) a :class:`~surpipe.store.remote.RemotePath`.
    An unknown protocol (a mistyped local path) or a missing fsspec backend is a clear error."""
    return store_path(path)


class FeatureStore:
    """A surpipe feature store (Zarr v3) opened for reading or writing."""

    def __init__(self, path: str | os.PathLike, mode: str = "r", allow_growing: bool = False):
        import zarr  # heavy: the store package stays zarr-free on import (surpipe --help)

        self.path = local_store_path(path)
        self.remote = is_remote(self.path)
        if self.remote:
            self._find_remote()
        else:
            if not self.path.exists():
                raise StoreNotFound(f"feature store not found: {self.path}")
            if not (self.path / "zarr.json").is_file():
                raise SurpipeError(f"{self.path} is not a Zarr v3 store (no zarr.json)")
            if mode != "r":
                if not os.access(self.path, os.W_OK):
                    raise SurpipeError(f"feature store {self.path} is read-only; cannot write to it")
                check_writable(self.path, f"feature store {self.path}")
        try:
            self.root = zarr.open_group(zarr_store(self.path, read_only=mode == "r"),
                                        mode="r" if mode == "r" else "r+")
        except Exception as e:  # zarr raises several types for broken metadata
            if self.remote and not isinstance(e, (ValueError, KeyError, TypeError)):
                raise remote_failure(e, self.path) from None
            raise SurpipeError(f"cannot open feature store {self.path}: {e}") from None
        # "<format>+growing" while rows are being appended (surpipe.store.growth): older surpipe
        # versions refuse that format, so a half-grown store is never misread
        fmt, growing = parse_format(self.root.attrs.get("surpipe_format"))
        if fmt is None and self.remote and self._building():
            # remote stores are built in place and marked a surpipe store last (surpipe.store.creation)
            raise HalfBuilt(f"feature store {self.path} was not completely created (its creation is running or "
                            "was interrupted: no surpipe_format yet); rerun `surpipe extract-llm` or "
                            "`surpipe encode-latents`: it rebuilds it")
        if fmt is None:
            raise SurpipeError(f"{self.path} is a Zarr group but not a surpipe feature store")
        if fmt not in READABLE_FORMATS:
            raise SurpipeError(f"{self.path} has store format {fmt!r}; this surpipe reads formats "
                               f"{', '.join(map(str, READABLE_FORMATS))}")
        self.format = fmt
        # {"from": rows, "to": rows} while a growth is in progress or was interrupted, else None
        self.growing = (dict(self.root.attrs.get("growing") or {}) or {"from": "?", "to": "?"}) if growing else None
        if self.growing and not allow_growing:
            g = self.growing
            raise SurpipeError(
                f"feature store {self.path} is growing from {g.get('from')} to {g.get('to')} rows (new dataset rows "
                "being appended): another job is doing it now, or it was interrupted. Wait for that job, or rerun "
                "`surpipe extract-llm` or `surpipe encode-latents` with the grown dataset to complete it")
        self._layout_ok: set[tuple[str, KindRules | None]] = set()  # (group, rules) checked
        self.created_now = False  # True when create_store made it in this process
        try:
            self.num_samples = int(self.root.attrs["num_samples"])
            self.block_rows = int(self.root.attrs["block_rows"])
            self.fingerprint = str(self.root.attrs["dataset_fingerprint"])
        except (KeyError, TypeError, ValueError) as e:
            raise SurpipeError(f"{self.path}: damaged store metadata (root attribute {e} missing or "
                               "invalid); run `surpipe verify` on it") from None

    def _find_remote(self) -> None:
        """A remote store's existence, with one clear error for an unreachable endpoint, a missing
        bucket or refused credentials."""
        if (self.path / "zarr.json").is_file():
            return
        if not self.path.bucket_exists():
            bucket = self.path.path.split("/", 1)[0]
            raise SurpipeError(f"feature store {self.path}: bucket {bucket!r} does not exist (or these credentials "
                               "cannot see it); create it or fix the URL / endpoint")
        if self._building():
            raise HalfBuilt(f"feature store {self.path} was not completely created (its creation is running or was "
                            "interrupted); rerun `surpipe extract-llm` or `surpipe encode-latents`: it rebuilds it")
        if self.path.exists():
            raise SurpipeError(f"{self.path} is not a Zarr v3 store (no zarr.json)")
        raise StoreNotFound(f"feature store not found: {self.path}")

    def _building(self) -> bool:
        return building_marker(self.path).is_file()

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
        text = first_line(exc)[:160]
        return SurpipeError(f"store {self.path}: the metadata of {where} is damaged ({type(exc).__name__}: {text}); "
                            f"run `surpipe verify {self.path}` for a full report")
    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path: str | os.PathLike, dataset, block_rows: int = DEFAULT_BLOCK_ROWS,
                       grow: bool = False) -> "FeatureStore":
        """Open the store for ``dataset`` at ``path``, creating it (keys and prompts) if absent; a
        store made from other rows raises :class:`~surpipe.store.errors.DatasetMismatch`
        (:func:`open_or_create`); with ``grow``, rows after its last row are appended
        (:mod:`surpipe.store.growth`)."""
        return open_or_create(path, dataset, block_rows, grow=grow)[0]

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
        """The sample key of every row, in row order."""
        return np.asarray(self.root[KEYS_ARRAY][: self.num_samples])  # a growing store's arrays may be longer

    def prompts(self, which: str) -> np.ndarray:
        """``which`` is ``simple`` or ``complex``."""
        return np.asarray(self.root[PROMPT_ARRAYS[which]][: self.num_samples])

    def categories(self) -> np.ndarray | None:
        """Each row's category label (str array, ``""`` for a row without one), in row order; None
        when the store keeps no categories (made before they were kept, or from a dataset
        without them: no array, or every label empty)."""
        if not (self.path / CATEGORY_ARRAY / "zarr.json").is_file():
            return None
        try:
            labels = np.array([str(c) for c in np.asarray(self.root[CATEGORY_ARRAY][:]).tolist()], dtype=str)
        except Exception as e:  # a damaged chunk or zarr.json: one clear message, not a traceback
            raise SurpipeError(f"store {self.path}: {CATEGORY_ARRAY} cannot be read ({type(e).__name__}: "
                               f"{first_line(e)[:160]}); run `surpipe verify {self.path}`") from None
        if labels.shape != (self.num_samples,):
            raise SurpipeError(f"store {self.path}: {CATEGORY_ARRAY} has shape {labels.shape}, expected "
                               f"({self.num_samples},); run `surpipe verify {self.path}`")
        return labels if (labels != "").any() else None

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
        """Whether group ``path`` exists and its creation finished: a group another process is
        still creating (its attributes not yet written) counts as absent, so it is never opened
        half-made."""
        try:
            if path not in self.root:
                return False
            g = self.root[path]
            return "settings" in g.attrs and "done" in g
        except Exception as e:
            raise self.damaged(path, e) from None

    def group(self, path: str, rules: KindRules | None = None) -> FeatureGroup:
        """Open feature group ``path`` for reading, after checking its metadata (arrays present and
        readable, row-aligned, chunked by block, dtypes and shapes as recorded at creation and, with
        the kinds' ``rules``, as the settings imply): a damaged or edited zarr.json is refused here,
        never misread. Readers call :func:`surpipe.features.open_group`, which passes the rules."""
        if not self.has_group(path):
            have = self.group_paths()
            raise SurpipeError(f"store {self.path} has no feature group {path!r} "
                               f"(it has: {', '.join(have) or 'none'})")
        g = FeatureGroup(self, path)
        if (path, rules) not in self._layout_ok:
            problems = g.layout_problems(rules)
            if problems:
                raise SurpipeError(f"store {self.path}: group {path} is damaged (its metadata was edited or "
                                   f"broken); run `surpipe verify {self.path}`:", problems)
            self._layout_ok.add((path, rules))
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
        shard_blocks: int = 1,
    ) -> FeatureGroup:
        """Create feature group ``kind/name`` or reopen it when its ``settings`` match.

        ``shard_blocks`` > 1 (a new group only: an existing group keeps its layout) stores its
        arrays with zarr's sharding codec, one shard object per ``shard_blocks`` blocks, each block
        still one inner chunk (:mod:`surpipe.store.sharding`).

        ``settings`` are what determines the stored values (model, revision, layers, dtype ...):
        reopening with different settings is refused unless ``overwrite`` deletes the group.
        Creating and deleting happen under the group's exclusive lock: a group another job is
        writing is never deleted, and of two jobs creating the same group, the second waits and
        opens the first's. Each creation draws a new ``generation`` id.
        """
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
                create_group(self, path, kind, settings, arrays, provenance, shard_blocks)
        except OSError as e:
            what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise SurpipeError(f"cannot create group {path} in store {self.path}: {what}"
                               + (f" ({e.filename})" if e.filename else "")
                               + "; free space (or fix the disk) and rerun the same command") from None
        self._layout_ok = {k for k in self._layout_ok if k[0] != path}
        return FeatureGroup(self, path)


def create_store(path: str | os.PathLike, dataset, block_rows: int = DEFAULT_BLOCK_ROWS) -> FeatureStore:
    """Create the store of ``dataset``'s rows at ``path`` and open it for writing (``created_now``).

    Atomic: built under a temporary name beside ``path``, then renamed, so data-parallel ranks may
    all call this; the losers get :class:`~surpipe.store.errors.StoreExists`. Full disk and
    unwritable folders raise SurpipeError naming the store; nothing is left behind. On object
    storage the store is built in place under a lease (:func:`surpipe.store.creation.build_remote`).
    """
    path = local_store_path(path)
    if block_rows < 1:
        raise SurpipeError(f"block_rows must be >= 1, got {block_rows}")
    if is_remote(path):
        build_remote(path, dataset, block_rows, open_now=lambda: FeatureStore(path, mode="a"))
    else:
        build_local(path, dataset, block_rows)
    store = FeatureStore(path, mode="a")
    store.created_now = True  # read by surpipe.store.opening.discard_new_store_on_error
    return store


def grow_store(path, dataset, left_out: LeftOut | None = None, new_rows: LeftOut | None = None) -> FeatureStore:
    """Append ``dataset``'s rows after the store's last row (those passing ``new_rows``) to the
    store at ``path``, or complete an interrupted growth (:mod:`surpipe.store.growth`); returns the
    store reopened. Changed or removed store rows raise
    :class:`~surpipe.store.errors.DatasetMismatch` (nothing is changed)."""
    with growth_lock(path):
        store = FeatureStore(path, mode="a", allow_growing=True)  # as on disk now, under the lock
        plan = plan_rows(store, dataset, left_out, new_rows)
        if plan.appended or store.growing:
            samples = list(dataset.samples)
            grow_rows(store, dataset, [samples[j] for j in plan.picked + plan.appended])
    return FeatureStore(path, mode="a")


def open_or_create(path: str | os.PathLike, dataset, block_rows: int = DEFAULT_BLOCK_ROWS,
                   left_out: LeftOut | None = None, grow: bool = False,
                   new_rows: LeftOut | None = None) -> tuple[FeatureStore, StoreMatch]:
    """The store of ``dataset`` at ``path``: created from the dataset's rows when absent, else
    opened for writing and matched (:func:`~surpipe.store.matching.match_store`).
    ``store.created_now`` says which.

    With ``grow``, a dataset that is the store's rows plus rows after its last row first appends
    those rows (:func:`grow_store`; ``new_rows`` is the check they pass, as a new store's rows do);
    ``StoreMatch.grown`` then says (rows before, rows after)."""
    try:
        store = FeatureStore(path, mode="a", allow_growing=grow)
    except StoreNotFound:
        try:
            return create_store(path, dataset, block_rows), StoreMatch(list(dataset.samples))
        except StoreExists:
            store = FeatureStore(path, mode="a", allow_growing=grow)
    grown = None
    if grow and (store.growing or has_rows_after(store, dataset)):
        before = store.num_samples
        store = grow_store(path, dataset, left_out, new_rows)
        if store.num_samples != before:
            grown = (before, store.num_samples)
    match = match_store(store, dataset, left_out)
    match.grown = grown
    return store, match
