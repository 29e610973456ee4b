"""Shared machinery of the stage-one commands (extract-llm, encode-latents): data-parallel ranks,
a lock per writer, resumable block loops with a progress bar.

Launchers (``torchrun``, ``accelerate launch``) set RANK / WORLD_SIZE / LOCAL_RANK; each rank then
writes only the blocks b with b % world_size == rank, so no two processes share a chunk file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from surpipe.errors import SurpipeError


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
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def resolve_device(device: str, env: DistEnv) -> str:
    """``auto`` -> this rank's GPU when CUDA is available, else CPU; explicit names pass through."""
    import torch

    if device == "auto":
        return f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SurpipeError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def device_problem(device: str) -> str | None:
    """A config-validation message when ``device`` is not auto, cpu, cuda or cuda:<index>."""
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return None
    return f"device: {device!r}; use auto, cpu, cuda or cuda:<index>"


@contextlib.contextmanager
def exclusive_lock(lock_file: str | os.PathLike, what: str):
    """Hold an exclusive, non-blocking lock on ``lock_file``; a second holder is refused with a
    message naming ``what`` and the process that holds it. Released when the process dies."""
    fh = open(lock_file, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise SurpipeError(
                f"{what} is being written by {holder}; wait for it to finish (or stop it) "
                "before starting another job on it"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        yield
    finally:
        fh.close()


def lock_dir(store_path: str | os.PathLike) -> Path:
    """Where the lock files of a store live: the folder ``.locks`` inside it (docs/store-format.md)."""
    d = Path(store_path) / ".locks"
    d.mkdir(exist_ok=True)
    return d


def _group_lock_file(store_path, group_path: str, what: str = "group") -> Path:
    return lock_dir(store_path) / f"{group_path.replace('/', '__')}.{what}.lock"


def _holders(store_path, group_path: str) -> str:
    """Who writes ``group_path`` now, from the rank lock files' contents (best effort)."""
    out = []
    for f in sorted(lock_dir(store_path).glob(f"{group_path.replace('/', '__')}.rank*.lock")):
        try:
            with open(f, "a+") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    continue  # nobody holds it
                except BlockingIOError:
                    fh.seek(0)
                    out.append(fh.read().strip() or "another process")
        except OSError:
            pass
    return ", ".join(out) or "another job"


@contextlib.contextmanager
def _flock(path: Path, mode: int, wait_s: float, refuse: Callable[[], SurpipeError]):
    fh = open(path, "a+")
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise refuse() from None
                time.sleep(0.05)
        yield
    finally:
        fh.close()


@contextlib.contextmanager
def group_lock(store_path: str | os.PathLike, group_path: str, *, exclusive: bool, wait_s: float = 0.0):
    """Lock a whole group. Writers hold it shared while they write blocks (``writer_lock``);
    deleting the group (``--overwrite``, or the leftovers of an interrupted creation) needs it
    exclusively, so a group is never deleted while a job writes it. Waits up to ``wait_s``
    seconds, then refuses naming the writers."""

    def refuse():
        return SurpipeError(
            f"group {group_path} of store {store_path} is being written by {_holders(store_path, group_path)}; "
            + ("it cannot be replaced (--overwrite) while that job runs: " if exclusive
               else "it is being replaced: ")
            + "wait for it to finish (or stop it) and retry")

    with _flock(_group_lock_file(store_path, group_path), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH,
                wait_s, refuse):
        yield


@contextlib.contextmanager
def creation_lock(store_path: str | os.PathLike, group_path: str, wait_s: float = 120.0):
    """Serialise creating (and deleting) group ``group_path``: two jobs creating the same new group
    at once take turns, and the second then finds and opens the first's group. Held only for
    the few metadata writes of a creation, so waiting is short."""

    def refuse():
        return SurpipeError(f"group {group_path} of store {store_path} has been being created by another job for "
                            f"over {wait_s:.0f} s; if no other job runs, delete "
                            f"{_group_lock_file(store_path, group_path, 'create')} and retry")

    with _flock(_group_lock_file(store_path, group_path, "create"), fcntl.LOCK_EX, wait_s, refuse):
        yield


@contextlib.contextmanager
def writer_lock(store_path: str | os.PathLike, group_path: str, rank: int):
    """Hold an exclusive lock for (group, rank): a second job writing the same group is refused.
    Also holds the group's lock shared, so nobody deletes (``--overwrite``) the group meanwhile."""
    lock_file = lock_dir(store_path) / f"{group_path.replace('/', '__')}.rank{rank}.lock"
    with exclusive_lock(lock_file, f"group {group_path} of store {store_path}"):
        with group_lock(store_path, group_path, exclusive=False, wait_s=30.0):
            yield


@dataclass
class BlockJobResult:
    group_path: str
    blocks_done_now: int
    rows_done_now: int
    already_complete: bool
    seconds: float
    extra: dict


def run_block_job(
    *,
    store,
    kind: str,
    name: str,
    settings: Mapping[str, Any],
    arrays: Mapping[str, Any],
    provenance: Mapping[str, Any],
    overwrite: bool,
    env: DistEnv,
    compute_block: Callable[[int, int], Mapping[str, np.ndarray]],
    unit: str = "row",
    desc: str = "",
    stats: Callable[[], Mapping[str, float]] | None = None,
    progress: bool = True,
) -> BlockJobResult:
    """Compute and write every pending block this rank owns, resumably.

    Rank 0 creates (or checks) the group while the others wait; then each rank computes its own
    blocks with ``compute_block(start, stop) -> {array: values}`` and writes them whole. A group
    that is already complete is left untouched. ``stats()`` may return running counters (e.g.
    tokens) shown in the progress bar as rates.
    """
    from surpipe.progress import progress_bar

    t0 = time.perf_counter()
    if env.is_main:
        group = store.require_group(kind, name, settings, arrays, provenance=provenance, overwrite=overwrite)
    barrier(env)
    if not env.is_main:
        group = store.require_group(kind, name, settings, arrays, provenance=provenance, overwrite=False)
    if group.is_complete():
        return BlockJobResult(group.path, 0, 0, True, time.perf_counter() - t0, {})

    with writer_lock(store.path, group.path, env.rank):
        blocks = group.pending_blocks(env.rank, env.world_size)
        total_rows = sum(store.block_range(b)[1] - store.block_range(b)[0] for b in blocks)
        done_rows = 0
        bar = progress_bar(total=total_rows, unit=unit,
                   desc=desc + (f" [rank {env.rank}/{env.world_size}]" if env.world_size > 1 else ""),
                   disable=not progress)
        t_compute = time.perf_counter()
        for b in blocks:
            start, stop = store.block_range(b)
            group.write_block(b, compute_block(start, stop))
            done_rows += stop - start
            bar.update(stop - start)
            if stats is not None:
                el = max(time.perf_counter() - t_compute, 1e-9)
                bar.set_postfix({k: f"{v / el:.1f}/s" for k, v in stats().items()}, refresh=False)
        bar.close()
    barrier(env)
    return BlockJobResult(group.path, len(blocks), done_rows, False, time.perf_counter() - t0,
                          dict(stats()) if stats else {})


def log(msg: str, env: DistEnv) -> None:
    """A status line on stderr, from rank 0 only."""
    if env.is_main:
        print(f"surpipe: {msg}", file=sys.stderr, flush=True)


def open_store(data: str, store_path: str, block_rows: int | None, check_images: str, progress: bool,
               env: DistEnv, simple_field: str = "text", complex_field: str = "prompt"):
    """Open the dataset and the store made from it (created when absent); returns (dataset, store).

    The row set of a store is fixed when it is created. A new store is made from a dataset opened
    with a full decode of every image, so every row can be encoded later whichever stage-one
    command runs first. An existing store is matched with a cheap header check first, then, if the
    row set differs (a corrupt image only a full decode finds was dropped at creation), with a full
    decode; a store made from another dataset is refused. ``simple_field`` / ``complex_field``
    name the metadata fields of the two prompts. The store gets ``created_now`` (True when this
    call made it) for :func:`discard_new_store_on_error`.
    """
    from surpipe.data import open_dataset
    from surpipe.errors import SurpipeError
    from surpipe.store import DEFAULT_BLOCK_ROWS, FeatureStore

    exists = Path(store_path, "zarr.json").is_file()
    if check_images == "auto":
        ladder = ["header", "full"] if exists else ["full"]
    else:
        ladder = [check_images]
    last_err = None
    for level in ladder:
        ds = open_dataset(data, strict=False, check_images=level, progress=progress and env.is_main,
                          simple_field=simple_field, complex_field=complex_field)
        if len(ds) == 0:
            raise SurpipeError(f"dataset {data} has no usable rows")
        try:
            store = FeatureStore.create_or_open(store_path, ds, block_rows or DEFAULT_BLOCK_ROWS)
        except SurpipeError as e:
            if "different dataset" not in str(e):
                raise
            last_err = e
            continue
        store.created_now = not exists  # read by discard_new_store_on_error
        rep = getattr(ds, "report", None)
        if rep is not None and getattr(rep, "skipped", None):
            log(f"dataset scan skipped {len(rep.skipped)} rows (not in the store):\n{rep.summary()}", env)
        if block_rows is not None and store.block_rows != block_rows:
            log(f"note: store {store_path} exists with block_rows={store.block_rows}; "
                f"--block-rows {block_rows} only applies when a store is created", env)
        return ds, store
    raise last_err


def _any_block_done(store) -> bool:
    """Whether any group of ``store`` has a block marked done (in any generation). Read raw: the
    failure may have interrupted a group's creation, leaving it without its attributes."""
    for p in store.group_paths():
        g = store.root[p]
        if "done" in g and np.asarray(g["done"][:]).any():
            return True
    return False


@contextlib.contextmanager
def discard_new_store_on_error(store, env: DistEnv):
    """Remove the store this command created (``open_store``) when the command fails before any
    block of any group is done, so a failed first command leaves no empty store behind."""
    try:
        yield
    except Exception:
        if env.is_main and getattr(store, "created_now", False):
            try:
                used = _any_block_done(store)
            except Exception:
                used = True  # cannot tell: keep it
            if not used:
                import shutil

                shutil.rmtree(store.path, ignore_errors=True)
                log(f"removed the store {store.path} this command had just created (nothing was written to it)", env)
        raise
