"""Leases: the locks of a store on object storage (S3, GCS, ...), where no file lock exists.

A lease named ``NAME`` (a path on an fsspec filesystem, e.g. ``bucket/surd.zarr.locks/llm__x.rank0``)
is a series of objects ``NAME.lease.<n>`` (n = 00000000, 00000001, ...). Each holds a JSON record:
the holder (pid, host, a random token), ``what`` it protects, ``acquired`` / ``renewed`` (UTC epoch
seconds) and ``ttl_s``. The object with the highest n is the lease's state; its holder holds the
lease while it is *live*: not released, ``renewed + ttl_s > now``, and not a process of this same
machine that is dead (a SIGKILLed writer on this machine is taken over at once, without waiting).

The one atomic step is a **conditional create**: an object is created only if no object of that name
exists (S3 ``PutObject`` with ``If-None-Match: *``, which s3fs sends for ``pipe_file(mode="create")``
and maps the 412 answer to ``FileExistsError``; a local folder uses ``os.link``, which fails when the
name exists). So of several processes that find the same state, exactly one creates ``.n+1`` and
wins; the others get ``FileExistsError``, look again, and find the winner live.

- acquire: list; if the highest ``.n`` is live, refuse naming its holder (or poll until ``wait_s``);
  else create ``.n+1`` (``.0`` when none), then list again: if a higher object already exists (a slow
  party re-created a deleted low number) the create lost and the loop starts over. Objects below the
  winner's are deleted (garbage).
- while held, a daemon thread renews (rewrites its own object's ``renewed``) every ``ttl_s/3``.
  Before each renewal and on :meth:`Lease.check` (writers call it before they mark a block done) the
  holder lists: a higher object means the lease was taken over (it looked expired: the holder was
  paused or cut off past its TTL) and the holder must stop (*fencing*); ``check`` then raises.
- release: stop the thread and overwrite the holder's own object with ``released: true`` (a
  tombstone). The highest number never goes down and no one deletes the highest object, so a
  holder that was taken over always sees a higher number, even after the taker released; deleting
  the object instead would let a late renewal of the old holder bring its object back as the top.
  One small tombstone per lease name stays behind.

Clocks: expiry compares the holder's ``renewed`` (its clock) with the reader's clock, so ``ttl_s``
(``SURPIPE_LEASE_TTL_S``, default 60 s) must exceed the clock skew between hosts plus the longest
pause of a holder (GC, swap, a suspended VM). Fencing catches a holder that was paused past its TTL
at its next renewal or ``check``, so it never marks a block done after a takeover. What fencing on a
store without compare-and-swap cannot stop is a write the old holder had already sent when it
paused and that lands later: it targets a block the old holder owned and not yet marked done, with
the same rows' values; ``verify`` (checksums, chunk presence) is the check of record. A long TTL
makes this need a pause of over a minute.

Wiring (surpipe/store/locks.py on a remote store; ``L`` = ``<store>.locks`` on the store's filesystem):
``writer_lock(store, group, rank)`` = ``shared_lease(fs, L, group.replace("/", "__"), f"rank{rank}",
what)`` (yields the Lease: call ``check()`` before marking a block done);
``group_lock(..., exclusive=True, wait_s)`` = ``exclusive_lease(fs, L, g, what, wait_s=wait_s)``;
``creation_lock`` / ``growth_lock`` / ``exclusive_lock`` = ``Lease(fs, f"{L}/{g}.create", what,
wait_s=...)`` (a plain exclusive lease); the holders for a message = ``live_holders(fs, L,
f"{g}.rank*")``.

Shared/exclusive (the group lock: writers shared, ``--overwrite`` / deletion exclusive), emulated
with two kinds of leases under the same folder, see :func:`shared_lease` and :func:`exclusive_lease`:
a writer takes its rank lease ``G.rank<r>`` and then checks that no live ``G.delete`` lease exists; a
deleter takes ``G.delete`` and then checks that no live ``G.rank*`` lease exists. Each writes first
and reads second, and S3 lists are strongly consistent after a write (since December 2020), so of a
writer and a deleter racing, at least one sees the other and backs off (both may: then both retry or
refuse, never both proceed).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import secrets
import socket
import threading
import time
from typing import Callable

from surpipe.errors import SurpipeError, first_line
from surpipe.store.lease_objects import _create, _listing, _obj, _overwrite, _read, _split, ensure_conditional_create
from surpipe.store.lease_records import _machine, _proc_start, _when, default_ttl, describe, is_live

_POLL_S = 0.25



class Lease:
    """A lease on ``path`` (``<folder>/<name>`` on fsspec filesystem ``fs``) held by this process:
    a context manager. A second holder is refused while the first is live (see the module's
    docstring). ``what`` names what it protects, for messages; ``wait_s``: how long to wait for a
    live holder before refusing; ``refuse(holder_record)`` builds the refusal (default: names the
    holder and says what to do)."""

    def __init__(self, fs, path: str, what: str, *, ttl_s: float | None = None, wait_s: float = 0.0,
                 refuse: Callable[[dict], SurpipeError] | None = None):
        self.fs = fs
        self.dir, self.name = _split(fs, path)
        self.path = f"{self.dir}/{self.name}"
        self.what = what
        self.ttl_s = float(default_ttl() if ttl_s is None else ttl_s)
        if not (self.ttl_s > 0 and self.ttl_s < float("inf")):
            raise SurpipeError(f"lease ttl {ttl_s!r} is not a positive number of seconds")
        self.wait_s = float(wait_s)
        self._refuse = refuse
        self.holder: dict = {}
        self.index: int | None = None
        self._lost: str | None = None
        self._last_error: str | None = None
        self._renewed_mono = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()  # renewal thread vs check()/release()

    # -- acquire / release
    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _refusal(self, rec: dict) -> SurpipeError:
        if self._refuse is not None:
            return self._refuse(rec)
        if rec.get("unreadable"):
            return SurpipeError(
                f"{self.what} is locked by {rec.get('object')}, which is not a lease record; if no other "
                "job runs on it, delete that object and retry")
        return SurpipeError(
            f"{self.what} is being written by {describe(rec, self.what)}; wait for it to finish (or stop it) before "
            f"starting another job on it. If that job is dead on another machine, its lease expires at "
            f"{_when(float(rec.get('renewed', 0)) + float(rec.get('ttl_s', 0)))} and a new job may then "
            "take over")

    def acquire(self) -> None:
        """Take the lease, or raise the refusal (after polling up to ``wait_s``)."""
        if self.index is not None:
            raise RuntimeError("lease already held")
        try:
            self._acquire()
        except (SurpipeError, RuntimeError):
            raise
        except Exception as e:  # noqa: BLE001 - the storage failed: one clear line, not a traceback
            raise SurpipeError(f"cannot take the lease on {self.what} ({self.path}): {first_line(e)}") from None

    def _acquire(self) -> None:
        ensure_conditional_create(self.fs, self.dir)
        self._lost = None
        deadline = time.monotonic() + self.wait_s
        token = secrets.token_hex(16)
        while True:
            objs = _listing(self.fs, self.dir).get(self.name, [])
            n = 0
            if objs:
                top_n, top_p = objs[-1]
                rec = _read(self.fs, top_p)
                if rec is None:
                    time.sleep(0.01)
                    continue  # deleted between list and read (garbage of a newer winner): look again
                if is_live(rec):
                    if time.monotonic() >= deadline:
                        raise self._refusal(rec)
                    time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())) or 0.01)
                    continue
                n = top_n + 1
            now, t_mono = time.time(), time.monotonic()
            me = {"pid": os.getpid(), "host": socket.gethostname(), "machine": _machine(),
                  "start": _proc_start(os.getpid()), "token": token, "what": self.what,
                  "acquired": now, "renewed": now, "ttl_s": self.ttl_s, "released": False}
            try:
                _create(self.fs, _obj(self.dir, self.name, n), json.dumps(me).encode())
            except FileExistsError:
                continue  # another party took .n first: it is live now, the next round says so
            after = _listing(self.fs, self.dir).get(self.name, [])
            if after and after[-1][0] > n:
                # a low number re-created after garbage collection: the lease moved on without us
                with contextlib.suppress(Exception):
                    self.fs.rm_file(_obj(self.dir, self.name, n))
                continue
            break
        self.index = n
        self.holder = dict(me, object=_obj(self.dir, self.name, n), name=self.name)
        self._renewed_mono = t_mono
        for k, p in after:
            if k < n:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(p)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {self.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and leave a tombstone (``released: true``) in this holder's object."""
        if self.index is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._io:
            try:
                if self._verify() is None:
                    rec = dict(self._record(), released=True, renewed=time.time())
                    _overwrite(self.fs, self.holder["object"], json.dumps(rec).encode())
            except Exception:  # noqa: BLE001 - cannot reach the storage: the lease expires by itself
                pass
        self.index = None

    # -- while held
    def _record(self) -> dict:
        return {k: v for k, v in self.holder.items() if k not in ("object", "name")}

    def _verify(self) -> str | None:
        """None while this holder still holds; else why not (taken over, or its object gone)."""
        objs = _listing(self.fs, self.dir).get(self.name, [])
        if objs and objs[-1][0] > self.index:
            rec = _read(self.fs, objs[-1][1]) or {}
            return f"taken over by {describe(rec)}" if rec else "taken over by another job"
        cur = _read(self.fs, self.holder["object"])
        if cur is None:
            return "its lease object was deleted"
        if cur.get("token") != self.holder["token"]:
            return f"taken over by {describe(cur)}"
        return None

    def _renew_once(self) -> None:
        with self._io:
            if self._lost or self.index is None:
                return
            why = self._verify()
            if why:
                self._lost = why
                return
            t = time.monotonic()  # taken with the stamp: the PUT's latency counts against us, not others
            self.holder["renewed"] = time.time()
            _overwrite(self.fs, self.holder["object"], json.dumps(self._record()).encode())
            self._renewed_mono = t
            self._last_error = None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._renew_once()
            except Exception as e:  # noqa: BLE001 - transient storage errors: retried; check() reports
                self._last_error = first_line(e)
            if self._lost:
                return

    def check(self) -> None:
        """Fencing: raise SurpipeError if this lease was taken over (or could not be renewed for
        longer than its TTL, so others may take it over any moment). Writers call it before
        marking work done."""
        if self.index is None:
            raise SurpipeError(f"the lease on {self.what} is not held")
        if not self._lost:
            with self._io:
                try:
                    why = self._verify()
                except Exception as e:  # noqa: BLE001 - the storage cannot be reached
                    why = None
                    self._last_error = first_line(e)
                if why:
                    self._lost = why
        if self._lost:
            raise SurpipeError(
                f"the lease on {self.what} ({self.path}) was {self._lost}: this job was paused or cut off "
                f"longer than the lease TTL ({self.ttl_s:g} s) and another job took over; stopping so "
                "that two jobs never write it at once")
        # half the TTL: a taker may act at renewed + TTL by its own clock; the other half covers the
        # time until the caller's next write lands and the clocks' skew
        idle = time.monotonic() - self._renewed_mono
        if idle > self.ttl_s / 2:
            raise SurpipeError(
                f"the lease on {self.what} ({self.path}) could not be renewed for {idle:.0f} s (TTL "
                f"{self.ttl_s:g} s; last error: {self._last_error or 'none'}); another job may take it "
                "over: stopping")


def live_holders(fs, prefix: str, pattern: str = "*") -> list[dict]:
    """The live leases in folder ``prefix`` whose name matches glob ``pattern`` (e.g.
    ``"llm__x.rank*"``): their records, each with ``name`` and ``object`` added."""
    d = fs._strip_protocol(str(prefix)).rstrip("/")
    out = []
    now = time.time()
    try:
        for name, objs in sorted(_listing(fs, d).items()):
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            rec = _read(fs, objs[-1][1])
            if rec is not None and is_live(rec, now):
                out.append(dict(rec, name=name))
    except Exception as e:  # noqa: BLE001 - the storage failed: one clear line, not a traceback
        raise SurpipeError(f"cannot read the leases in {d}: {first_line(e)}") from None
    return out


# ---------------------------------------------------------------- shared / exclusive

def _pause_or_refuse(deadline: float, refusal: str) -> None:
    """Wait one poll before looking again, or refuse with ``refusal`` once ``deadline`` has passed."""
    if time.monotonic() >= deadline:
        raise SurpipeError(refusal)
    time.sleep(_POLL_S)


@contextlib.contextmanager
def shared_lease(fs, folder: str, group: str, member: str, what: str, *, ttl_s: float | None = None,
                 wait_s: float = 0.0, exclusive_name: str = "delete"):
    """A shared hold of ``group`` by ``member`` (e.g. writer ``rank0``): takes the lease
    ``<folder>/<group>.<member>`` (refusing a second holder of that member), then checks that no
    live ``<group>.<exclusive_name>`` lease (a deleter) exists; if one does, lets go and waits up to
    ``wait_s`` for it to end, then refuses naming it. Yields the member's :class:`Lease`."""
    deadline = time.monotonic() + wait_s
    while True:
        lease = Lease(fs, f"{folder}/{group}.{member}", what, ttl_s=ttl_s,
                      wait_s=max(0.0, deadline - time.monotonic()))
        lease.acquire()
        try:
            others = live_holders(fs, folder, f"{group}.{exclusive_name}")
        except BaseException:
            lease.release()
            raise
        if not others:
            break
        # a deleter holds the group: let go while waiting (never wait holding: no deadlock with
        # a deleter that waits for the writers), then take the member lease again
        lease.release()
        _pause_or_refuse(deadline, f"{what} is being replaced by {describe(others[0])}: wait for it to finish "
                         "(or stop it) and retry")
    try:
        yield lease
    finally:
        lease.release()


@contextlib.contextmanager
def exclusive_lease(fs, folder: str, group: str, what: str, *, ttl_s: float | None = None,
                    wait_s: float = 0.0, exclusive_name: str = "delete", shared_pattern: str = "rank*"):
    """An exclusive hold of ``group`` (e.g. to delete it): takes ``<folder>/<group>.<exclusive_name>``,
    then waits up to ``wait_s`` (holding it, so new writers back off) while any live
    ``<group>.<shared_pattern>`` lease (a writer) exists, then refuses naming them. Yields the
    :class:`Lease`."""
    lease = Lease(fs, f"{folder}/{group}.{exclusive_name}", what, ttl_s=ttl_s, wait_s=wait_s)
    with lease:
        deadline = time.monotonic() + wait_s
        while True:
            others = live_holders(fs, folder, f"{group}.{shared_pattern}")
            if not others:
                break
            _pause_or_refuse(deadline, f"{what} is being written by {', '.join(describe(o) for o in others)}; it "
                             "cannot be replaced (--overwrite) while that job runs: wait for it to finish (or stop "
                             "it) and retry")
        yield lease
