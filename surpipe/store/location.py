"""Where a feature store lives: a local folder, or an fsspec URL (``s3://``, ``gs://``, ...).

A local store is a :class:`pathlib.Path`, exactly as before URLs were accepted (``file://`` URLs
are local paths too). A store at a URL is a :class:`RemotePath`: the few path operations the
store code uses (``/``, ``name``, ``with_name``, ``exists``, ``is_file``, ``iterdir``,
``read_bytes``, ``write_text``, ...) on an fsspec filesystem, so the same code serves both, and
``str()`` of it is the URL that messages print. It has no ``__fspath__``: a local-file call
(``open``, ``os.replace``) on it fails loudly instead of writing a local folder named ``s3:``.

Credentials and endpoint come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) or from ``--storage-options JSON`` (kept in the environment variable
``SURPIPE_STORAGE_OPTIONS`` so DataLoader workers and launcher ranks see the same). Failures of
the object store (unreachable endpoint, missing bucket, refused credentials, missing fsspec
backend) are one SurpipeError each, never a botocore traceback (:func:`remote_failure`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from surpipe.errors import SurpipeError, first_line

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
OPTIONS_ENV = "SURPIPE_STORAGE_OPTIONS"
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


def parse_storage_options(value: Any, what: str = "--storage-options") -> dict:
    """``value`` (a JSON object as text, a mapping, or None/"") as a dict; anything else is one
    clear SurpipeError."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        out = json.loads(str(value))
    except ValueError as e:
        raise SurpipeError(f"{what}: not valid JSON ({e}); give a JSON object, e.g. "
                           "'{\"endpoint_url\": \"http://127.0.0.1:9000\", \"anon\": false}'") from None
    if not isinstance(out, dict):
        raise SurpipeError(f"{what}: expected a JSON object ({{\"key\": value, ...}}), got {type(out).__name__}")
    return out


def storage_options(extra: Any = None) -> dict:
    """The storage options in force: ``SURPIPE_STORAGE_OPTIONS`` overlaid with ``extra``."""
    env = parse_storage_options(os.environ.get(OPTIONS_ENV), f"environment variable {OPTIONS_ENV}")
    return {**env, **parse_storage_options(extra)}


def apply_store_options(cfg: Any) -> None:
    """Check and put in force a command's ``storage_options`` (and ``cache_dir`` / ``cache_gb``
    where it has them), before any work: invalid JSON is one clear error. Kept in the
    environment, so DataLoader workers and launcher ranks read the same."""
    so = getattr(cfg, "storage_options", None)
    if so not in (None, "", {}):
        opts = parse_storage_options(so)
        os.environ[OPTIONS_ENV] = json.dumps({**storage_options(), **opts})
    if getattr(cfg, "cache_dir", None):
        os.environ[CACHE_DIR_ENV] = str(Path(cfg.cache_dir).expanduser())
    if getattr(cfg, "cache_gb", None) is not None:
        os.environ[CACHE_GB_ENV] = str(float(cfg.cache_gb))


def store_path(path: Any, options: Any = None) -> "Path | RemotePath":
    """``path`` as a local :class:`Path` (also for ``file://`` URLs) or a :class:`RemotePath`.

    An unknown protocol (often a mistyped local path) or a protocol whose fsspec backend is not
    installed is a SurpipeError saying what to do."""
    if isinstance(path, RemotePath):
        return path
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    m = _URL.match(text)
    if not m:
        return Path(text)
    protocol = m.group(1).lower()
    if protocol in ("file", "local"):
        return Path(text[m.end():] or "/")
    _check_protocol(protocol, text)
    rest = text[m.end():].rstrip("/")
    if not rest or rest.startswith("/"):
        raise SurpipeError(f"feature store {text}: no bucket in the URL; give {protocol}://BUCKET/PREFIX/NAME.zarr")
    parts = rest.split("/")
    if any(p in ("", ".", "..") for p in parts):
        # object keys are plain strings: "a//b" or "a/./b" would be another store than "a/b", whose
        # objects listings then miss
        clean = "/".join(p for p in parts if p not in ("", "."))
        raise SurpipeError(f"feature store {text}: empty, '.' or '..' parts in the URL name other objects than "
                           f"they seem to; write it without them (e.g. {protocol}://{clean})")
    return RemotePath(protocol, rest, storage_options(options))


def _check_protocol(protocol: str, text: str) -> None:
    import fsspec
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


_FS_CACHE: dict = {}


def filesystem(protocol: str, options: dict, asynchronous: bool = False):
    """An fsspec filesystem for ``protocol`` (one per process and options). Listings are never
    cached: other processes (ranks, other jobs) change the store meanwhile."""
    import fsspec

    # the environment's credentials and endpoint are part of what the instance was made with
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "AZURE_")))
    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True, default=str), asynchronous, str(env))
    fs = _FS_CACHE.get(key)
    if fs is None:
        kw = dict(options)
        if protocol in ("s3", "s3a"):
            kw.setdefault("use_listings_cache", False)
        try:
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, asynchronous=asynchronous, **kw)
        except TypeError as e:
            raise SurpipeError(f"storage options {sorted(options)} are not accepted by the {protocol}:// filesystem "
                               f"({first_line(e)[:160]}); fix --storage-options") from None
        _FS_CACHE[key] = fs
        if asynchronous:
            _close_at_exit()
    return fs


_CLOSER = []


def _close_at_exit() -> None:
    """Close the async filesystems' HTTP sessions (zarr's FsspecStore) at exit: s3fs closes only its
    synchronous instances itself, and an open aiohttp session prints "Unclosed client session"."""
    if _CLOSER:
        return
    import atexit

    def close():
        from zarr.core.sync import sync

        for k, fs in list(_FS_CACHE.items()):
            creator = getattr(fs, "_s3creator", None)
            if k[0] != os.getpid() or not k[3] or creator is None:
                continue
            try:
                sync(creator.__aexit__(None, None, None), timeout=2)
            except Exception:  # noqa: BLE001 - at exit: nothing left to tell the user
                pass

    atexit.register(close)  # runs before zarr's own exit cleanup (registered earlier) stops its loop
    _CLOSER.append(close)


def remote_failure(exc: BaseException, where: str) -> SurpipeError:
    """A failure of the object store as one clear line (what is wrong and what to check)."""
    if isinstance(exc, SurpipeError):
        return exc
    text = first_line(exc)[:200]
    names = {c.__name__ for c in type(exc).__mro__}
    low = text.lower()
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or storage_options().get("endpoint_url")
    ep = f" (endpoint {endpoint})" if endpoint else ""
    if "NoSuchBucket" in text or "bucket does not exist" in low:
        bucket = where.split("://", 1)[-1].split("/", 1)[0]
        why = f"bucket {bucket!r} does not exist{ep}; create it or fix the URL"
    elif names & {"EndpointConnectionError", "ConnectionError", "ClientConnectorError", "ConnectTimeoutError",
                  "ClientOSError", "ServerDisconnectedError", "ConnectionRefusedError", "TimeoutError"} \
            or "could not connect" in low or "cannot connect" in low:
        why = (f"cannot reach the object store{ep}: {text}; check AWS_ENDPOINT_URL / --storage-options "
               "'{\"endpoint_url\": ...}' and the network")
    elif names & {"NoCredentialsError", "PartialCredentialsError"} or "credentials" in low:
        why = ("no usable credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile), or pass "
               "--storage-options '{\"key\": ..., \"secret\": ...}'")
    elif isinstance(exc, PermissionError) or "accessdenied" in low.replace(" ", "") or "forbidden" in low \
            or "invalidaccesskeyid" in low or "signaturedoesnotmatch" in low:
        why = f"access denied{ep} ({text}); check the credentials and the bucket's permissions"
    elif isinstance(exc, TypeError) and "unexpected keyword argument" in low:  # s3fs checks options late
        why = f"storage options not accepted ({text}); fix --storage-options"
    else:
        why = f"{type(exc).__name__}: {text}"
    return SurpipeError(f"object storage {where}: {why}")


@contextlib.contextmanager
def remote_errors(where: Any):
    """Turn any failure of the object store inside the block into :func:`remote_failure`; a
    FileNotFoundError / FileExistsError about a key passes unchanged (callers expect them)."""
    try:
        yield
    except SurpipeError:
        raise
    except (FileNotFoundError, FileExistsError) as e:
        if "bucket" in str(e).lower():
            raise remote_failure(e, str(where)) from None
        raise
    except Exception as e:
        raise remote_failure(e, str(where)) from None


class RemotePath:
    """A path on an fsspec filesystem with the few :class:`pathlib.Path` operations the store code
    uses. ``str()`` is the URL. Object stores have no folders: ``mkdir`` does nothing, a "folder"
    exists when an object lies under it."""

    def __init__(self, protocol: str, path: str, options: dict | None = None):
        self.protocol = protocol
        self.path = path.rstrip("/")
        self.options = dict(options or {})

    # -- naming --------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and (self.protocol, self.path) == (other.protocol, other.path)

    def __hash__(self) -> int:
        return hash((self.protocol, self.path))

    def __truediv__(self, other) -> "RemotePath":
        other = str(other).strip("/")
        return RemotePath(self.protocol, f"{self.path}/{other}" if other else self.path, self.options)

    joinpath = __truediv__

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.protocol, self.path.rsplit("/", 1)[0] if "/" in self.path else self.path, self.options)

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def expanduser(self) -> "RemotePath":
        return self

    def resolve(self) -> "RemotePath":
        return self

    # -- filesystem ----------------------------------------------------------------------
    @property
    def fs(self):
        return filesystem(self.protocol, self.options)

    def _do(self, fn, *args, **kw):
        with remote_errors(self):
            return fn(*args, **kw)

    def exists(self) -> bool:
        return self._info() is not None

    def _info(self) -> dict | None:
        # fsspec's isfile/isdir answer False on ANY error (an unreachable endpoint too): use info
        try:
            return self._do(self.fs.info, self.path)
        except FileNotFoundError:
            return None

    def is_file(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") == "file"

    def is_dir(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") == "directory"

    def iterdir(self) -> Iterator["RemotePath"]:
        try:
            names = self._do(self.fs.ls, self.path, detail=False)
        except FileNotFoundError:
            names = []
        for n in sorted(names):
            n = str(n).rstrip("/")
            if n != self.path:
                yield RemotePath(self.protocol, n, self.options)

    def glob(self, pattern: str) -> list["RemotePath"]:
        return [RemotePath(self.protocol, str(n), self.options)
                for n in sorted(self._do(self.fs.glob, f"{self.path}/{pattern}"))]

    def read_bytes(self) -> bytes:
        return self._do(self.fs.cat_file, self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        self._do(self.fs.pipe_file, self.path, bytes(data))  # one PUT: readers see all of it or none

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._do(self.fs.rm_file, self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, *args, **kw) -> None:
        return None

    def rmtree(self) -> None:
        """Delete every object under this prefix (and the object itself)."""
        try:
            self._do(self.fs.rm, self.path, recursive=True)
        except FileNotFoundError:
            pass

    def bucket_exists(self) -> bool:
        """Whether the URL's bucket (first path part) exists and is reachable."""
        try:  # fs.exists answers False on any error: info raises the endpoint's failures
            self._do(self.fs.info, self.path.split("/", 1)[0])
            return True
        except FileNotFoundError:
            return False


def zarr_store(path: "Path | RemotePath", read_only: bool):
    """What zarr opens for the store at ``path``: the folder's path for a local store (as always),
    zarr's own ``FsspecStore`` for a remote one."""
    if not isinstance(path, RemotePath):
        return str(path)
    from zarr.storage import FsspecStore

    fs = filesystem(path.protocol, path.options, asynchronous=True)
    with remote_errors(path):
        return FsspecStore(fs=fs, path=path.path, read_only=read_only)


def canonical(path: Any) -> str:
    """The store's identity for records (run folders, saved configs): the URL of a remote store,
    the resolved absolute path of a local one."""
    p = store_path(path)
    return str(p) if isinstance(p, RemotePath) else str(Path(p).expanduser().resolve())
