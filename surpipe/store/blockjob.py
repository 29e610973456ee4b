"""Resumable block jobs over a feature group, and the data-parallel ranks that share them.

Launchers (``torchrun``, ``accelerate launch``) set RANK / WORLD_SIZE / LOCAL_RANK; each rank then
writes only the blocks b with b % world_size == rank, so no two processes share a chunk file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.progress import progress_bar
from surpipe.store.locks import writer_lock
from surpipe.store.sharding import shard_runs


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a data-parallel job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Read the launcher's environment (torchrun / accelerate launch); single process otherwise."""

    def _int(name, default):
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise SurpipeError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None

    env = DistEnv(_int("RANK", 0), _int("WORLD_SIZE", 1), _int("LOCAL_RANK", 0))
    if not 0 <= env.rank < env.world_size:
        raise SurpipeError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
    return env


def init_distributed(env: DistEnv, device: str = "cpu") -> None:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA) when there is more than one rank."""
    if env.world_size == 1:
        return
    import torch.distributed as dist  # heavy (torch): this module serves torch-free stages too

    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op when alone)."""
    if env.world_size > 1:
        import torch.distributed as dist  # heavy (torch): only with several ranks

        if dist.is_initialized():
            dist.barrier()


@dataclass
class BlockJobResult:
    group_path: str
    blocks_done_now: int
    rows_done_now: int
    already_complete: bool
    seconds: float
    extra: dict


def run_block_job(*, store, kind: str, name: str, settings: Mapping[str, Any], arrays: Mapping[str, Any],
                  provenance: Mapping[str, Any], overwrite: bool, env: DistEnv,
                  compute_block: Callable[[int, int], Mapping[str, np.ndarray]], unit: str = "row", desc: str = "",
                  stats: Callable[[], Mapping[str, float]] | None = None, progress: bool = True,
                  shard_blocks: int = 1) -> BlockJobResult:
    """Compute and write every pending block this rank owns, resumably.

    Rank 0 creates (or checks) the group while the others wait; then each rank computes its own
    blocks with ``compute_block(start, stop) -> {array: values}`` and writes them whole, under its
    writer lock. A group that is already complete is left untouched. ``stats()`` may return
    running counters (e.g. tokens) shown in the progress bar as rates. ``shard_blocks``: blocks per
    stored object of a group this job creates (:mod:`surpipe.store.sharding`); a sharded group's
    ranks own whole shards, and each shard's pending blocks are written in one piece.
    """
    t0 = time.perf_counter()
    if env.is_main:
        group = store.require_group(kind, name, settings, arrays, provenance=provenance, overwrite=overwrite,
                                    shard_blocks=shard_blocks)
    barrier(env)
    if not env.is_main:
        group = store.require_group(kind, name, settings, arrays, provenance=provenance, overwrite=False)
    if group.is_complete():
        return BlockJobResult(group.path, 0, 0, True, time.perf_counter() - t0, {})

    with writer_lock(store.path, group.path, env.rank, env.world_size) as fence:
        blocks = group.pending_blocks(env.rank, env.world_size)
        kept = group.kept_rows()  # blocks completed before the store grew: their old rows stay bit for bit
        spans = [store.block_range(b) for b in blocks]
        done_rows = 0
        bar = progress_bar(total=sum(e - s for s, e in spans), unit=unit,
                           desc=desc + (f" [rank {env.rank}/{env.world_size}]" if env.world_size > 1 else ""),
                           disable=not progress)
        t_compute = time.perf_counter()
        for run in shard_runs(blocks, group.shard_blocks):  # one block each, unsharded
            values = []
            for b in run:
                start, stop = store.block_range(b)
                v = compute_block(start, stop)
                values.append(group.keep_stored_rows(b, kept[b], v) if b in kept else v)
                done_rows += stop - start
                bar.update(stop - start)
                if stats is not None:
                    el = max(time.perf_counter() - t_compute, 1e-9)
                    bar.set_postfix({k: f"{v / el:.1f}/s" for k, v in stats().items()}, refresh=False)
            group.write_blocks(run, values, fence=fence.check)  # a writer whose lease was taken over stops
        bar.close()
    barrier(env)
    return BlockJobResult(group.path, len(blocks), done_rows, False, time.perf_counter() - t0,
                          dict(stats()) if stats else {})
