"""Training data from the feature store: block-shuffled reads, resumable position.

A read call costs about the same whatever its size, so the loader reads whole blocks of
contiguous rows (one call per array) and shuffles at two levels: the block order per epoch and
the row order inside each block, both from (seed, epoch) only. The sample sequence is therefore a
pure function of (seed, epoch, position), which makes resume exact: a checkpoint stores the
position and the reader restarts there, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import google_crc32c
import numpy as np

from surpipe.errors import SurpipeError
from surpipe.features import LLMFeatures, VaeFeatures, clip_features, open_group
from surpipe.store import FeatureStore, chunk_files, missing_chunk, read_failure
from surpipe.store.integrity import chunk_keys, missing_block_file
from surpipe.store.location import store_path
from surpipe.store.sharding import index_bytes, inner_chunk_missing
from surpipe.train.validation.split import keep_mask

if TYPE_CHECKING:
    from surpipe.train.groups import StoreGroups


class BlockReader:
    """Reads whole row blocks of the training arrays (picklable: safe in DataLoader workers).

    Nothing it returns can be silently wrong: the groups' metadata is checked when it opens (dtype,
    shape and chunks against the settings and the layout recorded at creation), and every block
    read checks that the block is done in the group's current generation, that every chunk file
    exists (a deleted one would read as zeros), that the chunks pass their crc32c checksums, and
    that the float values are finite. Any failure is a SurpipeError naming store, array and rows;
    with a remote store's local cache, a cached copy that fails is fetched again first (only the
    store's own object failing is store damage).
    """

    def __init__(self, store_path: str, groups: StoreGroups, block_rows: int):
        self.store_path, self.groups, self.block_rows = str(store_path), groups, block_rows
        self._arrays = self._done = self._keys = None  # opened lazily, in each process
        self._cache = None  # a remote store's chunk cache (surpipe.store.cache), None for a local store
        self._pid = None
        self.num_rows = None
        self._open()

    def _open(self):
        store = FeatureStore(self.store_path)  # format, root attributes: clear errors
        g = self.groups
        llm, clip, vae = open_group(store, g.llm_group), open_group(store, g.clip_group), open_group(store, g.vae_group)
        wanted = {}  # batch key -> (group, array), as each kind says training reads it
        for gpath, names in ((g.llm_group, LLMFeatures.train_arrays(llm, g.llm_layer)),
                             (g.clip_group, clip_features(clip.settings).train_arrays()),
                             (g.vae_group, VaeFeatures.train_arrays(g.use_flip, vae))):
            wanted |= {key: (gpath, name) for key, name in names.items()}
        groups = {}
        arrays = {}
        for key, (gpath, name) in wanted.items():
            if gpath not in groups:
                groups[gpath] = {g.llm_group: llm, g.clip_group: clip, g.vae_group: vae}[gpath]
            arrays[key] = (gpath, name, groups[gpath].array(name))
        # (done array, generation id) per group: a block counts only when done in this generation
        self._done = {p: (fg.group["done"], fg.gen_id) for p, fg in groups.items()}
        self._cache = None
        if store.remote:
            # chunks of a store on object storage are read through a bounded local cache, so later
            # epochs read no chunk data remotely (the done records are always read fresh)
            from surpipe.store.cache import cached_root  # heavy: zarr

            names: dict[str, list[str]] = {}
            for gpath, name, _ in arrays.values():
                names.setdefault(gpath, []).append(name)
            root, self._cache = cached_root(store, groups, names)
            if root is not None:
                arrays = {key: (gpath, name, root[gpath][name]) for key, (gpath, name, _) in arrays.items()}
        self._arrays = arrays
        self._keys = store.root["keys"]
        self.num_rows = store.num_samples
        self._pid = os.getpid()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = state["_done"] = state["_keys"] = state["_cache"] = None  # reopened in each worker
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    @property
    def store_location(self):
        """The store's location (a local Path or a RemotePath)."""

        return store_path(self.store_path)

    @property
    def num_blocks(self) -> int:
        return max(1, -(-self.num_rows // self.block_rows))

    def __len__(self) -> int:
        return self.num_blocks

    def _refuse_if_grown(self) -> None:
        """A store that stage one grew while this reader used it (its last block reopened for the new
        rows) is no damage: say so, instead of pointing at verify --repair."""

        try:
            now = FeatureStore(self.store_path, allow_growing=True).num_samples
        except SurpipeError:
            return
        if now != self.num_rows:
            raise SurpipeError(f"store {self.store_path} grew from {self.num_rows} to {now} rows while this run read "
                               "it (stage one appended rows): nothing is damaged, but a run is tied to the rows it "
                               "started with; start a new run (another --out) on the grown store once stage one "
                               "has finished")

    def _fail(self, msg: str) -> SurpipeError:
        return SurpipeError(f"store {self.store_path}: {msg}; run `surpipe verify --repair {self.store_path}` "
                            "to mark the damaged block for recomputation, then rerun the stage that wrote it")

    def __getitem__(self, block: int) -> dict[str, np.ndarray]:
        if self._pid != os.getpid() and getattr(self.store_location, "protocol", None):
            self._open()  # a forked DataLoader worker: the parent's object-store connections are not usable here
        start = block * self.block_rows
        stop = min(start + self.block_rows, self.num_rows)
        rows = f"rows {start}-{stop - 1}"
        for gpath, (done, gen) in self._done.items():
            try:
                v = _done_value(self.store_path, done, block, gen)
            except Exception as e:
                raise read_failure(self.store_path, f"{gpath}/done", block, (start, stop), e) from None
            if gen is None:
                ok = bool(v)
            else:
                ok = int(v) == gen
            if not ok:
                self._refuse_if_grown()
                why = ("was completed by another generation of the group (it was replaced with --overwrite)"
                       if v else "is not marked done")
                raise self._fail(f"{gpath} block {block} ({rows}) {why}")
        out = {}
        for key, (gpath, name, arr) in self._arrays.items():
            where = f"{gpath}/{name}"
            x = self._read_array(gpath, name, arr, block, start, stop)
            if x.dtype.kind in "fc":
                finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1) if x.size else np.ones(len(x), bool)
                if not finite.all():
                    bad = (np.flatnonzero(~finite) + start).tolist()
                    try:
                        keys = [str(k) for k in self._keys[start:stop][np.asarray(bad) - start][:5]]
                    except Exception:
                        keys = []
                    raise self._fail(
                        f"{where} holds NaN or Inf in {len(bad)} rows of block {block}: rows {bad[:10]}"
                        + (" ..." if len(bad) > 10 else "") + (f" (keys {keys})" if keys else ""))
            out[key] = x
        return out

    def _read_array(self, gpath: str, name: str, arr, block: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``arr`` (block ``block``), after checking its chunk objects exist.

        With a cache, a copy that fails its checks (a shard index or chunk checksum, a decode: a copy
        cut short or overwritten by a crash or a bad disk) is the cache's damage, not the store's:
        it is dropped and fetched once more, and only a failure of the freshly fetched object is
        reported as store damage (else every rerun fails the same way while verify finds nothing)."""

        where, span = f"{gpath}/{name}", (start, stop)
        if self._cache is None:
            try:
                f = missing_block_file(self.store_path, arr, block)
            except ValueError as e:  # a damaged shard index
                raise read_failure(self.store_path, where, block, span, e) from None
            if f is not None:
                raise missing_chunk(self.store_path, where, block, span, f)
            try:
                return np.asarray(arr[start:stop])
            except Exception as e:
                raise read_failure(self.store_path, where, block, span, e) from None
        objs = [f"{arr.path}/{ck}" for ck in chunk_keys(arr, block)]
        x, err = self._read_cached(arr, block, where, span, objs)
        if err is not None and any([self._cache.drop(o) for o in objs]):
            x, err = self._read_cached(arr, block, where, span, objs)  # now the store's own objects
        if err is not None:
            raise read_failure(self.store_path, where, block, span, err) from None
        return x

    def _read_cached(self, arr, block: int, where: str, span: tuple[int, int], objs: list[str]):
        """(rows of ``span``, None) read through the cache, or (None, the error) when a copy fails."""
        try:
            self._check_cached(arr, block, where, span, objs)
        except ValueError as e:  # a shard index that fails its checksum
            return None, e
        try:
            return np.asarray(arr[span[0]:span[1]]), None
        except Exception as e:  # a chunk that fails its checksum or does not decode
            return None, e

    def _check_cached(self, arr, block: int, where: str, span: tuple[int, int], objs: list[str]) -> None:
        """Fetch ``objs`` into the cache (if not there) and refuse a chunk the store does not hold; a
        damaged shard index raises ValueError."""

        for obj in objs:
            gone = not self._cache.ensure(obj)  # present = fetched into the cache (no extra request)
            if not gone and arr.shards:  # an object over the cache's cap is not kept: ask the store
                data = self._cache.cached_bytes(obj)
                gone = (inner_chunk_missing(data[-index_bytes(arr):], arr, block) if data else
                        missing_block_file(self.store_path, arr, block) is not None)
            if gone:
                raise missing_chunk(self.store_path, where, block, span, f"{self.store_path.rstrip('/')}/{obj}")


def _done_value(store_path: str, done, block: int, gen: int | None):
    """``done[block]``, read from its chunk file directly when the layout is format 2's (8 bytes of
    little-endian int64, then the crc32c): a zarr read costs ~2 ms, this ~50 us, for every block."""
    if gen is not None and done.shards is None and len(done.compressors) == 1 \
            and getattr(done.serializer, "endian", None) is not None \
            and str(done.serializer.endian.value) == "little":
        f = chunk_files(store_path, done, block)[0]
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            return 0  # fill value: not done
        if len(raw) != 12 or google_crc32c.value(raw[:8]) != int.from_bytes(raw[8:], "little"):
            raise ValueError("Stored and computed checksum do not match")
        return int.from_bytes(raw[:8], "little", signed=True)
    return done[block]


def epoch_plan(num_rows: int, block_rows: int, seed: int, epoch: int,
               keep: np.ndarray | None = None) -> list[tuple[int, np.ndarray]]:
    """The visiting plan of one epoch: [(block, row order inside the block)], from (seed, epoch).

    ``keep`` (bool per store row; None: every row) removes the rows it marks False, the held-out
    validation rows, from each block's order AFTER all the random draws, so the rows kept are
    visited in the same relative order as without a split; a block left empty is dropped.
    """
    nb = max(1, -(-num_rows // block_rows))
    rng = np.random.default_rng([seed, epoch, 7])
    plan = []
    for b in rng.permutation(nb):
        n = min(block_rows, num_rows - int(b) * block_rows)
        plan.append((int(b), rng.permutation(n)))
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
        if len(keep) != num_rows:
            raise SurpipeError(f"training row mask has {len(keep)} rows, the store {num_rows}")
        plan = [(b, order[keep[b * block_rows + order]]) for b, order in plan]
        plan = [(b, order) for b, order in plan if len(order)]
    return plan


@dataclass
class Position:
    """Where the sample stream stands: epoch, block index in the epoch plan, row inside it."""

    epoch: int = 0
    block_idx: int = 0
    row_idx: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "block_idx": self.block_idx, "row_idx": self.row_idx}


class SampleStream:
    """Yields training batches (dicts of numpy arrays) in a deterministic, resumable order.

    Blocks come from a DataLoader (``workers`` processes prefetch whole blocks); the main process
    slices them into batches following the epoch plan, so ``position`` is exact at any step.
    ``keep`` (bool per store row) leaves out held-out rows: see :func:`epoch_plan`; ``position``
    then counts in the filtered plan.
    """

    def __init__(self, reader: BlockReader, batch_size: int, seed: int, workers: int = 0,
                 position: Position | None = None, prefetch: int = 2, keep: np.ndarray | None = None):
        if batch_size < 1:
            raise SurpipeError(f"batch size must be >= 1, got {batch_size}")
        if keep is not None and not np.asarray(keep, dtype=bool).any():
            raise SurpipeError("no training rows: every row of the store is held out")
        self.keep = keep  # bool per store row: False rows (held out for validation) are never read
        self.reader = reader
        self.batch_size = batch_size
        self.seed = seed
        self.workers = workers
        self.prefetch = prefetch
        self.position = position or Position()

    def _blocks(self, epoch: int, first: int) -> Iterator[tuple[int, dict]]:
        # heavy: torch (the DataLoader that reads blocks in workers)
        import torch
        import torch.utils.data as tud

        plan = epoch_plan(self.reader.num_rows, self.reader.block_rows, self.seed, epoch, self.keep)
        order = [b for b, _ in plan[first:]]
        loader = tud.DataLoader(
            _Subset(self.reader, order), batch_size=None, shuffle=False, num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers else None,
            persistent_workers=False, collate_fn=_identity,
            # its own generator: creating an iterator must not draw from the global RNG, which
            # dropout uses, or a resumed run would diverge from a straight one
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )
        for i, block in enumerate(loader):
            if isinstance(block, _ReadError):
                raise SurpipeError(block.message)
            yield first + i, block, plan[first + i][1]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches; a batch may span an epoch boundary (no sample is dropped)."""
        pending: list[dict] = []
        while True:
            pos = self.position
            for bidx, block, rows in self._blocks(pos.epoch, pos.block_idx):
                start = pos.row_idx if bidx == pos.block_idx else 0
                for r in range(start, len(rows)):
                    pending.append({k: v[rows[r]] for k, v in block.items()})
                    if len(pending) == self.batch_size:
                        last = r + 1 == len(rows)
                        self.position = Position(pos.epoch, bidx + 1 if last else bidx, 0 if last else r + 1)
                        yield {k: np.stack([p[k] for p in pending]) for k in pending[0]}
                        pending = []
            self.position = Position(pos.epoch + 1, 0, 0)


class _Subset:
    def __init__(self, reader, order):
        self.reader, self.order = reader, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        # a SurpipeError in a DataLoader worker would reach the main process wrapped with the
        # worker's traceback in its message: hand it over as data, raised again in _blocks
        try:
            return self.reader[self.order[i]]
        except SurpipeError as e:
            return _ReadError(str(e))


class _ReadError:
    def __init__(self, message: str):
        self.message = message


def _identity(x):
    return x


def training_stream(cfg, inputs, position: dict | None, world: int, on_gpu: bool) -> SampleStream:
    """The sample stream of a training run (``cfg`` a TrainConfig, ``inputs`` its TrainingInputs)
    from ``position`` (a checkpoint's; None: the start): one global batch of world x batch_size rows
    per micro-step, in the order of a single process with that batch (each rank keeps its rows:
    :func:`rank_rows`), the held-out rows left out."""
    workers = cfg.workers
    if workers is None:
        # a block read costs ~0.2 ms against steps of hundreds of ms: on CPU, forked loader processes
        # only compete with the step for cores (bench/store_io.py); a GPU run reads blocks in 2 of them
        workers = max(0, min(2, (os.cpu_count() or 1) - 1)) if on_gpu else 0
    reader = BlockReader(cfg.store, inputs.groups, inputs.store.block_rows)
    return SampleStream(reader, cfg.batch_size * world, cfg.seed, workers=workers,
                        position=Position(**position) if position else None,
                        keep=keep_mask(inputs.store.num_samples, inputs.held_out))


def rank_rows(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s rows of a global batch of ``world`` equal parts (data-parallel training: the
    ranks together train on exactly the batch one process would)."""
    if world == 1:
        return batch
    n = len(next(iter(batch.values())))
    if n % world:
        raise SurpipeError(f"a global batch of {n} rows does not split into {world} equal parts")
    b = n // world
    return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
