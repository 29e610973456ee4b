"""Lease objects on a filesystem: listing a folder's lease series, reading a record, and the one
atomic step, a conditional create (:mod:`surpipe.store.lease` explains the protocol)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading

from surpipe.errors import SurpipeError, first_line

_SUFFIX = re.compile(r"^(?P<name>.+)\.lease\.(?P<n>\d{8,})$")
_DIGITS = 8


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem  # heavy (fsspec): only stores on object storage

    return isinstance(fs, LocalFileSystem)


def _split(fs, path: str) -> tuple[str, str]:
    path = fs._strip_protocol(str(path)).rstrip("/")
    if "/" not in path:
        raise SurpipeError(f"lease path {path!r} has no folder (expected <folder>/<name>)")
    d, name = path.rsplit("/", 1)
    return d, name


def _obj(d: str, name: str, n: int) -> str:
    return f"{d}/{name}.lease.{n:0{_DIGITS}d}"


def _listing(fs, d: str) -> dict[str, list[tuple[int, str]]]:
    """{lease name: [(n, object path), ...] ascending} in folder ``d``, listed afresh (no cache)."""
    try:
        fs.invalidate_cache(d)
    except Exception:  # noqa: BLE001 - a filesystem without a listing cache
        pass
    try:
        entries = fs.ls(d, detail=False)
    except FileNotFoundError:
        return {}
    out: dict[str, list[tuple[int, str]]] = {}
    for e in entries:
        base = str(e).rstrip("/").rsplit("/", 1)[-1]
        m = _SUFFIX.match(base)
        if m:
            out.setdefault(m["name"], []).append((int(m["n"]), f"{d}/{base}"))
    for v in out.values():
        v.sort()
    return out


def _read(fs, p: str) -> dict | None:
    """The record in object ``p``; None when it is gone; ``{"unreadable": True}`` when not JSON."""
    try:
        raw = fs.cat_file(p)
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(raw)
        if not isinstance(rec, dict):
            raise ValueError
    except ValueError:
        rec = {"unreadable": True}
    rec["object"] = p
    return rec


def _local_tmp(p: str, data: bytes, durable: bool) -> str:
    """A temporary file beside local ``p`` holding ``data`` (fsynced when ``durable``), to publish
    by a link or rename: readers never see a half-written record."""
    tmp = f"{os.path.dirname(p)}/.{os.path.basename(p)}.{secrets.token_hex(6)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return tmp


def _create(fs, p: str, data: bytes) -> None:
    """Create object ``p`` holding ``data`` only if no object ``p`` exists (FileExistsError)."""
    if not _is_local(fs):
        fs.pipe_file(p, data, mode="create")
        return
    tmp = _local_tmp(p, data, durable=True)
    try:
        os.link(tmp, p)  # atomic, fails if p exists
    finally:
        os.unlink(tmp)


def _overwrite(fs, p: str, data: bytes) -> None:
    if _is_local(fs):
        os.replace(_local_tmp(p, data, durable=False), p)
    else:
        fs.pipe_file(p, data)


_checked: dict[tuple, bool] = {}
_checked_lock = threading.Lock()


def ensure_conditional_create(fs, d: str) -> None:
    """Refuse a filesystem on which leases would not be safe: one whose ``pipe_file(mode="create")``
    is fsspec's generic exists-then-write (not atomic), or a server that ignores the condition
    (some S3-compatible servers accept ``If-None-Match: *`` and overwrite anyway): probed once per
    filesystem and bucket by creating an object twice."""
    if _is_local(fs):
        os.makedirs(d, exist_ok=True)
        return
    from fsspec.asyn import AsyncFileSystem  # heavy (~120 ms): only stores on object storage use leases
    from fsspec.spec import AbstractFileSystem

    def owner(attr):
        return next((c for c in type(fs).__mro__ if attr in c.__dict__), None)

    if owner("pipe_file") is AbstractFileSystem and owner("_pipe_file") in (None, AsyncFileSystem):
        raise SurpipeError(
            f"{type(fs).__name__} offers no atomic create-if-absent, which the locks of a store on it need "
            "(a lease object written with a conditional put); use S3 or a local folder")
    key = (getattr(fs, "_fs_token", id(fs)), d.split("/", 1)[0])
    with _checked_lock:
        if _checked.get(key):
            return
    probe = f"{d}/.lease-probe.{secrets.token_hex(8)}"
    try:
        fs.pipe_file(probe, b"1", mode="create")
        try:
            fs.pipe_file(probe, b"2", mode="create")
        except FileExistsError:
            ok = True
        else:
            ok = False
    except FileExistsError:
        ok = True  # a (vanishingly unlikely) collision: the condition was honoured
    except Exception as e:  # noqa: BLE001 - say what the storage answered
        raise SurpipeError(f"cannot write the lock objects of {d}: {first_line(e)}") from None
    finally:
        with contextlib.suppress(Exception):
            fs.rm_file(probe)
    if not ok:
        raise SurpipeError(
            f"the object storage of {d} ignores conditional writes (PutObject with If-None-Match: *): "
            "a second writer could not be refused there; use a server that supports them "
            "(AWS S3 does since 2024; MinIO, Ceph RGW and others in recent versions)")
    with _checked_lock:
        _checked[key] = True
