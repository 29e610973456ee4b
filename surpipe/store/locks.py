"""File locks: one job per run folder, one writer per (group, rank) of a store, and the group locks
that keep a group from being deleted while it is written.

Hand-written on ``fcntl.flock`` rather than a lock library: the refusal must name the process that
holds the lock (its pid and host are written into the lock file), and the kernel releases a flock
when its holder dies, so a killed job never leaves a stale lock behind. A store's lock files live
beside it, in ``<store>.locks/`` (docs/store-format.md, "Locks"), never inside the Zarr hierarchy.

A store on object storage (:class:`~surpipe.store.remote.RemotePath`) has no file locks: the same
functions hold leases there instead (:mod:`surpipe.store.lease`: objects written with a conditional
put, renewed while held, taken over when their holder died or expired). ``writer_lock`` yields an
object whose ``check()`` a writer calls before marking a block done (fencing: a writer whose lease
was taken over stops instead of marking blocks); for a local store it never fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
from pathlib import Path
from typing import Callable

from surpipe.errors import SurpipeError
from surpipe.store.lease import Lease, describe, exclusive_lease, live_holders, shared_lease
from surpipe.store.location import is_remote, is_url, store_path as _sp
from surpipe.store.sidecar import sidecar_dir


@contextlib.contextmanager
def exclusive_lock(lock_file: str | os.PathLike, what: str, note: str = ""):
    """Hold an exclusive, non-blocking lock on ``lock_file``; a second holder is refused with a
    message naming ``what`` and the process that holds it (with ``note`` after it). Released when
    the process dies."""
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
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}{note}")
        fh.flush()
        yield
    finally:
        fh.close()


def lock_dir(store_path: str | os.PathLike) -> Path:
    """The folder of a store's lock files, ``<store>.locks`` beside it (created when absent)."""
    d = sidecar_dir(store_path, "locks")
    d.mkdir(exist_ok=True)
    return d


def _remote(store_path) -> bool:
    return is_remote(store_path) or is_url(store_path)


def _lease_dir(store_path):
    """(fs, folder path) of a remote store's lease objects, ``<store>.locks``."""
    d = sidecar_dir(_sp(store_path), "locks")
    return d.fs, d.path


def _lease_name(group_path: str) -> str:
    return group_path.replace("/", "__")


class _NoFence:
    """What ``writer_lock`` yields for a local store: the kernel's flock cannot be taken over."""

    def check(self) -> None:
        return None


def _lock_file(store_path, group_path: str, what: str) -> Path:
    return lock_dir(store_path) / f"{group_path.replace('/', '__')}.{what}.lock"


def _holders(store_path, group_path: str) -> str:
    """Who writes ``group_path`` now, from the rank lock files' contents (best effort)."""
    if _remote(store_path):
        try:
            fs, d = _lease_dir(store_path)
            return ", ".join(describe(r) for r in live_holders(fs, d, f"{_lease_name(group_path)}.rank*")) \
                or "another job"
        except Exception:  # noqa: BLE001 - a message helper: never fail because of it
            return "another job"
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

    if _remote(store_path):
        fs, d = _lease_dir(store_path)
        what = f"group {group_path} of store {store_path}"
        if exclusive:
            ctx = exclusive_lease(fs, d, _lease_name(group_path), what, wait_s=wait_s)
        else:  # a shared holder that is no writer: named like one, so a deleter sees it
            ctx = shared_lease(fs, d, _lease_name(group_path), f"rank-shared-{os.getpid()}-{secrets.token_hex(4)}",
                               what, wait_s=wait_s)
        with ctx:  # the leases' refusals name the holders (lease.describe)
            yield
        return

    with _flock(_lock_file(store_path, group_path, "group"), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH,
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
                            f"{_lock_file(store_path, group_path, 'create')} and retry")

    if _remote(store_path):
        fs, d = _lease_dir(store_path)
        with Lease(fs, f"{d}/{_lease_name(group_path)}.create", f"creation of group {group_path} of store {store_path}",
                   wait_s=wait_s):
            yield
        return

    with _flock(_lock_file(store_path, group_path, "create"), fcntl.LOCK_EX, wait_s, refuse):
        yield


@contextlib.contextmanager
def growth_lock(store_path, wait_s: float = 600.0):
    """The store-level lock of growths (:mod:`surpipe.store.growth`): of several processes
    (data-parallel ranks) growing one store, one grows it while the others wait, then find it grown."""
    if _remote(store_path):
        fs, d = _lease_dir(store_path)
        with Lease(fs, f"{d}/store.grow", f"growth of feature store {store_path}", wait_s=wait_s):
            yield
        return
    f = lock_dir(store_path) / "store.grow.lock"

    def refuse():
        return SurpipeError(f"feature store {store_path} has been being grown by another job for over "
                            f"{wait_s:.0f} s; if no other job runs, delete {f} and retry")

    with _flock(f, fcntl.LOCK_EX, wait_s, refuse):
        yield


_RANKS = re.compile(r"\(rank \d+ of (\d+)\)")


def _other_job(holders: list[str], world_size: int) -> str | None:
    """The first holder of a rank lock whose job has another number of ranks (its record ends
    ``(rank r of W)``): rank locks alone cannot tell two such jobs apart, and their ranks would
    share shard objects (block ownership depends on the world size)."""
    for h in holders:
        m = _RANKS.search(h)
        if m and int(m.group(1)) != world_size:
            return h
    return None


def _refuse_other_job(what: str, holder: str, world_size: int) -> SurpipeError:
    return SurpipeError(f"{what} is being written by another job ({holder}) with another number of ranks than "
                        f"this one's {world_size}; wait for it to finish (or stop it) before starting another job on it")


@contextlib.contextmanager
def writer_lock(store_path: str | os.PathLike, group_path: str, rank: int, world_size: int = 1):
    """Hold an exclusive lock for (group, rank): a second job writing the same group is refused,
    also one with another number of ranks (each rank's record names its job's world size, and a
    rank refuses when a live rank lock of the group names another). Also holds the group's lock
    shared, so nobody deletes (``--overwrite``) the group meanwhile. Yields a fence: call its
    ``check()`` before marking a block done (a remote lease taken over raises there)."""
    note = f" (rank {rank} of {world_size})"
    if _remote(store_path):
        fs, d = _lease_dir(store_path)
        what = f"group {group_path} of store {store_path}"
        name = _lease_name(group_path)
        with Lease(fs, f"{d}/{name}.rank{rank}", what + note) as lease:
            other = _other_job([describe(r) for r in live_holders(fs, d, f"{name}.rank*")], world_size)
            if other:  # written, then read: of two racing jobs at least one sees the other
                raise _refuse_other_job(what, other, world_size)
            deadline = time.monotonic() + 30.0
            while True:  # shared vs a deleter: the rank lease is written, then no live delete lease may exist
                deleting = live_holders(fs, d, f"{name}.delete")
                if not deleting:
                    break
                if time.monotonic() >= deadline:
                    raise SurpipeError(f"{what} is being replaced by {describe(deleting[0])}: wait for it to "
                                       "finish (or stop it) and retry")
                time.sleep(0.25)
            yield lease
        return
    what = f"group {group_path} of store {store_path}"
    with exclusive_lock(_lock_file(store_path, group_path, f"rank{rank}"), what, note):
        other = _other_job(_holders(store_path, group_path).split(", "), world_size)
        if other:
            raise _refuse_other_job(what, other, world_size)
        with group_lock(store_path, group_path, exclusive=False, wait_s=30.0):
            yield _NoFence()
