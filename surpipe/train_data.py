"""Training data from the feature store: block-shuffled reads, resumable position.

A read call costs about the same whatever its size, so the loader reads whole blocks of
contiguous rows (one call per array) and shuffles at two levels: the block order per epoch and
the row order inside each block, both from (seed, epoch) only. The sample sequence is therefore a
pure function of (seed, epoch, position), which makes resume exact: a checkpoint stores the
position and the reader restarts there, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from surpipe.errors import SurpipeError


@dataclass(frozen=True)
class StoreGroups:
    """Which groups and arrays of a store feed training."""

    llm_group: str | None  # e.g. "llm/tiny"
    llm_layer: int
    clip_group: str | None  # e.g. "clip/sd"
    vae_group: str | None  # e.g. "vae/sd-512"
    use_flip: bool = True


def _pick(store, kind: str, requested: str | None) -> tuple[str | None, str | None]:
    """Resolve a group name: the requested one, or the only group of that kind."""
    have = store.group_paths(kind)
    if requested:
        path = requested if requested.startswith(kind + "/") else f"{kind}/{requested}"
        if path not in have:
            return None, (f"store has no {kind} group {path!r}; "
                          f"available: {', '.join(have) or f'none (run the stage that writes {kind} features)'}")
        return path, None
    if len(have) == 1:
        return have[0], None
    if not have:
        stage = "extract-llm" if kind == "llm" else "encode-latents"
        return None, f"store has no {kind} group; run `surpipe {stage}` first"
    return None, f"store has several {kind} groups ({', '.join(have)}); choose one with --{kind}-group"


def resolve_groups(store, *, llm_layer: int, llm_group: str | None, clip_group: str | None,
                   vae_group: str | None, use_flip: bool) -> tuple[StoreGroups | None, list[str]]:
    """Find and check the groups training needs; returns (groups, problems) with every problem.

    A group that could not be resolved is None in the returned StoreGroups."""
    problems: list[str] = []
    paths = {}
    for kind, req in (("llm", llm_group), ("clip", clip_group), ("vae", vae_group)):
        path, err = _pick(store, kind, req)
        if err:
            problems.append(err)
        paths[kind] = path
    if paths["llm"]:
        g = store.group(paths["llm"])
        if f"layer_{llm_layer}/pooled" not in g.array_names:
            layers = sorted(int(n.split("/")[0][6:]) for n in g.array_names if n.endswith("/pooled"))
            problems.append(f"{paths['llm']} has no layer {llm_layer} (stored layers: {layers or 'none'}); "
                            "re-run extract-llm with that layer or choose --llm-layer from the list")
    for kind in ("llm", "clip", "vae"):
        if paths[kind]:
            g = store.group(paths[kind])
            done, n = g.completed_blocks(), store.num_blocks
            if done < n:
                problems.append(f"{paths[kind]} is incomplete: {done}/{n} blocks done; rerun its stage to finish it")
    for arr in ("simple", "complex"):
        if paths["clip"] and arr not in store.group(paths["clip"]).array_names:
            problems.append(f"{paths['clip']} has no {arr!r} array")
    flip = False
    if paths["vae"]:
        names = store.group(paths["vae"]).array_names
        for arr in ("mean", "std"):
            if arr not in names:
                problems.append(f"{paths['vae']} has no {arr!r} array")
        flip = use_flip and "flip_mean" in names and "flip_std" in names
    # groups that were found are returned even with problems, so callers can check more at once
    return StoreGroups(paths["llm"], llm_layer, paths["clip"], paths["vae"], flip), problems


class BlockReader:
    """Reads whole row blocks of the training arrays (picklable: safe in DataLoader workers)."""

    def __init__(self, store_path: str, groups: StoreGroups, block_rows: int):
        self.store_path = str(store_path)
        self.groups = groups
        self.block_rows = block_rows
        self._arrays = None
        self.num_rows = None
        self._open()

    def _open(self):
        import zarr

        root = zarr.open_group(self.store_path, mode="r")
        g = self.groups
        arrays = {
            "llm": root[f"{g.llm_group}/layer_{g.llm_layer}/pooled"],
            "clip_simple": root[f"{g.clip_group}/simple"],
            "clip_complex": root[f"{g.clip_group}/complex"],
            "lat_mean": root[f"{g.vae_group}/mean"],
            "lat_std": root[f"{g.vae_group}/std"],
        }
        if g.use_flip:
            arrays["flip_mean"] = root[f"{g.vae_group}/flip_mean"]
            arrays["flip_std"] = root[f"{g.vae_group}/flip_std"]
        self._arrays = arrays
        self.num_rows = int(root.attrs["num_samples"])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None  # zarr handles are reopened in each worker
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    @property
    def num_blocks(self) -> int:
        return max(1, -(-self.num_rows // self.block_rows))

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, block: int) -> dict[str, np.ndarray]:
        start = block * self.block_rows
        stop = min(start + self.block_rows, self.num_rows)
        return {k: np.asarray(a[start:stop]) for k, a in self._arrays.items()}


def epoch_plan(num_rows: int, block_rows: int, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """The visiting plan of one epoch: [(block, row order inside the block)], from (seed, epoch)."""
    nb = max(1, -(-num_rows // block_rows))
    rng = np.random.default_rng([seed, epoch, 7])
    plan = []
    for b in rng.permutation(nb):
        n = min(block_rows, num_rows - int(b) * block_rows)
        plan.append((int(b), rng.permutation(n)))
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
    """

    def __init__(self, reader: BlockReader, batch_size: int, seed: int, workers: int = 0,
                 position: Position | None = None, prefetch: int = 2):
        if batch_size < 1:
            raise SurpipeError(f"batch size must be >= 1, got {batch_size}")
        self.reader = reader
        self.batch_size = batch_size
        self.seed = seed
        self.workers = workers
        self.prefetch = prefetch
        self.position = position or Position()

    def _blocks(self, epoch: int, first: int) -> Iterator[tuple[int, dict]]:
        import torch
        import torch.utils.data as tud

        plan = epoch_plan(self.reader.num_rows, self.reader.block_rows, self.seed, epoch)
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
        return self.reader[self.order[i]]


def _identity(x):
    return x
