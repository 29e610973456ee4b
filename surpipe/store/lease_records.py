"""Lease records: the JSON a lease object holds, whether its holder still holds it (TTL, and a dead
process of this machine), and the one-line description messages print (:mod:`surpipe.store.lease`)."""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time

from surpipe.errors import SurpipeError


def default_ttl() -> float:
    """The lease time-to-live in seconds: env ``SURPIPE_LEASE_TTL_S``, default 60."""
    raw = os.environ.get("SURPIPE_LEASE_TTL_S", "").strip()
    if not raw:
        return 60.0
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (v == v and 0 < v < float("inf")):
        raise SurpipeError(f"SURPIPE_LEASE_TTL_S={raw!r} is not a positive number of seconds")
    return v


# ---------------------------------------------------------------- this process, this machine

def _machine() -> str:
    """What makes two pids comparable: same kernel boot and same pid namespace (two containers
    sharing a host name but not their pids must not judge each other's pids)."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        pass
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "/".join(parts)


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot; None where unknown): tells a
    reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):  # killed, not yet reaped
            return False
    except (OSError, ValueError, IndexError):
        pass
    now_start = _proc_start(pid)
    return not (start and now_start and start != now_start)


def is_live(rec: dict, now: float | None = None) -> bool:
    """Whether lease record ``rec`` still holds: not released, not expired, and not a dead process
    of this machine."""
    if rec.get("unreadable"):
        return True  # cannot tell: the safe answer (the message says how to clear it)
    if rec.get("released"):
        return False
    now = time.time() if now is None else now
    try:
        if float(rec["renewed"]) + float(rec["ttl_s"]) <= now:
            return False
        if rec.get("machine") == _machine() and not _pid_alive(int(rec["pid"]), rec.get("start")):
            return False
    except (KeyError, TypeError, ValueError):
        return True
    return True


def _when(t) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(t), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def describe(rec: dict, what: str | None = None) -> str:
    """``pid P on HOST (W) since T, lease expires T2 unless renewed``: a holder, for messages (its
    ``what`` W left out when it is ``what``)."""
    if rec.get("unreadable"):
        return f"an unreadable lease object {rec.get('object')}"
    what = f" ({rec['what']})" if rec.get("what") and rec.get("what") != what else ""
    try:
        exp = _when(float(rec["renewed"]) + float(rec["ttl_s"]))
    except (KeyError, TypeError, ValueError):
        exp = "?"
    return (f"pid {rec.get('pid', '?')} on {rec.get('host', '?')}{what} since {_when(rec.get('acquired'))}, "
            f"lease expires {exp} unless renewed")
