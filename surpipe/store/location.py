"""Where a feature store lives: a local folder, or an fsspec URL (``s3://``, ``gs://``, ...).

A local store is a :class:`pathlib.Path`, exactly as before URLs were accepted (``file://`` URLs
are local paths too). A store at a URL is a :class:`~surpipe.store.remote.RemotePath`: the few path
operations the store code uses on an fsspec filesystem, so the same code serves both, and ``str()``
of it is the URL that messages print. It has no ``__fspath__``: a local-file call (``open``,
``os.replace``) on it fails loudly instead of writing a local folder named ``s3:``.

This module parses what a user gives (:func:`store_path`: URLs that would name other objects than
they seem to are refused before anything is read or written) and puts a command's
``--storage-options`` / cache settings in force (:func:`apply_store_options`); the object store
itself (filesystems, credentials, one-line failures) is :mod:`surpipe.store.remote`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from surpipe.errors import SurpipeError, first_line
from surpipe.store.remote import OPTIONS_ENV, RemotePath, parse_storage_options, storage_options

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CACHE_DIR_ENV = "SURPIPE_STORE_CACHE_DIR"
CACHE_GB_ENV = "SURPIPE_STORE_CACHE_GB"
DEFAULT_CACHE_GB = 20.0
# the fsspec implementation each protocol needs, for the "pip install" hint
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "adl": "adlfs", "oss": "ossfs", "hf": "huggingface_hub"}


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, RemotePath) or bool(_URL.match(os.fspath(path) if isinstance(path, os.PathLike)
                                                            else str(path)))


def is_remote(path: Any) -> bool:
    """Whether ``path`` (as :func:`store_path` gives it) is on object storage."""
    return isinstance(path, RemotePath)


def apply_store_options(cfg: Any) -> None:
    """Check and put in force a command's ``storage_options`` (and ``cache_dir`` / ``cache_gb``
    where it has them), before any work: invalid JSON is one clear error. Kept in the
    environment, so DataLoader workers and launcher ranks read the same."""
    so = getattr(cfg, "storage_options", None)
    if so not in (None, "", {}):
        opts = parse_storage_options(so)
        os.environ[OPTIONS_ENV] = json.dumps({**storage_options(), **opts})
    store = getattr(cfg, "store", None)
    if isinstance(store, (str, os.PathLike)) and is_url(store):
        store_path(store)  # a refused URL is refused now, before models load or anything is written
    if getattr(cfg, "cache_dir", None):
        os.environ[CACHE_DIR_ENV] = str(Path(cfg.cache_dir).expanduser())
    if getattr(cfg, "cache_gb", None) is not None:
        os.environ[CACHE_GB_ENV] = str(float(cfg.cache_gb))


def store_path(path: Any, options: Any = None) -> "Path | RemotePath":
    """``path`` as a local :class:`Path` (also for ``file://`` URLs) or a :class:`RemotePath`.

    An unknown protocol (often a mistyped local path), a protocol whose fsspec backend is not
    installed, or a URL that would name other objects than it seems to (a query, a password,
    ``..``) is a SurpipeError saying what to do, before anything is read or written."""
    if isinstance(path, RemotePath):
        return path
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    m = _URL.match(text)
    if not m:
        return Path(text)
    protocol = m.group(1).lower()
    rest = text[m.end():]
    if "?" in rest or "#" in rest:
        # fsspec reads a query as options (s3fs: "?versionId=" is an object version, and every write
        # then goes to the one key before the "?"); a URL's query or fragment is no part of a store's
        # name, and may hold a signature: never shown
        name, mark, _ = re.split("([?#])", rest, maxsplit=1)
        clean = f"{protocol}://{name}"
        store_path(clean, options)  # its own refusal first, so that the advice below works
        raise SurpipeError(f"feature store {clean}{mark}...: a query ('?...') or fragment ('#...') in a store URL "
                           "is refused (fsspec would read it as options, e.g. an object version, and write "
                           f"elsewhere); give the URL without it: {clean}")
    host, sep, tail = rest.partition("/")
    if "@" in host:
        _refuse_userinfo(protocol, host, sep + tail)
    if protocol in ("file", "local"):
        return _file_url_path(protocol, host, sep, tail)
    shown = f"{protocol}://{rest}"
    _check_protocol(protocol, shown)
    rest = rest.rstrip("/")
    if not rest or rest.startswith("/"):
        raise SurpipeError(f"feature store {shown}: no bucket in the URL; give {protocol}://BUCKET/PREFIX/NAME.zarr")
    parts = rest.split("/")
    if any(p in ("", ".", "..") for p in parts):
        # object keys are plain strings: "a//b", "a/./b" or "a/x/../b" would be another store than
        # "a/b", whose object listings then miss
        clean = _normalised(parts)
        advice = (f"write it as {protocol}://{'/'.join(clean)}" if clean
                  else "write the URL without them (its '..' parts climb above the bucket)")
        raise SurpipeError(f"feature store {shown}: empty, '.' or '..' parts in the URL name other objects "
                           f"than they seem to; {advice}")
    return RemotePath(protocol, rest, storage_options(options))


def _normalised(parts: list[str]) -> list[str]:
    """URL path ``parts`` without empty and ``.`` parts, each ``..`` taking away the part before it;
    empty when a ``..`` would climb above the first part (the bucket)."""
    out: list[str] = []
    for p in parts:
        if p == "..":
            if len(out) < 2:  # above the bucket: no store URL means that
                return []
            out.pop()
        elif p not in ("", "."):
            out.append(p)
    return out


# fsspec protocols whose URLs put a container before "@" (abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/...)
_AT_IN_HOST = {"az", "abfs", "abfss", "adl"}


def _refuse_userinfo(protocol: str, host: str, path: str) -> None:
    """A user name or password in a store URL (``s3://user:pass@bucket/...``): object storage takes
    credentials from the environment or ``--storage-options``, never the URL, and the URL is printed
    and saved everywhere. The message shows neither the user nor the password."""
    user, _, place = host.rpartition("@")
    if protocol in _AT_IN_HOST and ":" not in user:
        return  # abfs://container@account...: not credentials
    raise SurpipeError(f"feature store {protocol}://***@{place}{path}: a user name or password in a store URL is "
                       "refused (it would be printed and saved with the URL); give the credentials in the "
                       f"environment or --storage-options, and the URL as {protocol}://{place}{path}")


def _file_url_path(protocol: str, host: str, sep: str, tail: str) -> Path:
    """The local path of a ``file://HOST/PATH`` URL, as the URL standard reads it: an empty host or
    ``localhost`` is this machine (``file:///data/s.zarr``, ``file://localhost/data/s.zarr``); another
    host is refused, not taken as the relative folder ``HOST/PATH``."""
    if host == "" or host.lower() == "localhost":
        return Path("/" + tail)
    raise SurpipeError(f"feature store {protocol}://{host}{sep}{tail}: a {protocol}:// URL on host {host!r} "
                       f"cannot be opened here (only {protocol}:///PATH or {protocol}://localhost/PATH are this "
                       f"machine's); for a folder relative to here give the plain path {host}{sep}{tail}")


def _check_protocol(protocol: str, text: str) -> None:
    import fsspec  # heavy (~120 ms): only a URL's protocol needs it
    from fsspec.registry import known_implementations, registry

    if protocol not in registry and protocol not in known_implementations:
        raise SurpipeError(f"feature store {text}: unknown storage protocol {protocol!r} (not an fsspec protocol); "
                           "for a local folder give a plain path, for object storage s3://, gs://, az:// ...")
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        pkg = _PACKAGES.get(protocol)
        hint = (f"pip install {pkg}" + (" (or pip install 'surpipe[s3]')" if pkg == "s3fs" else "")
                if pkg else f"install the fsspec backend for {protocol}:// ({first_line(e)[:120]})")
        raise SurpipeError(f"feature store {text}: {protocol}:// stores need a package that is not installed: "
                           f"{hint}") from None


def canonical(path: Any) -> str:
    """The store's identity for records (run folders, saved configs): the URL of a remote store,
    the resolved absolute path of a local one."""
    p = store_path(path)
    return str(p) if isinstance(p, RemotePath) else str(Path(p).expanduser().resolve())
