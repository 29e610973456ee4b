"""A store on object storage: :class:`RemotePath` (the few :class:`pathlib.Path` operations the store
code uses, on an fsspec filesystem), the filesystems themselves (bounded S3 timeouts and retries),
the storage options in force (``--storage-options``, kept in ``SURPIPE_STORAGE_OPTIONS`` so DataLoader
workers and launcher ranks see the same), and one clear line for each failure of the object store
(:func:`remote_failure`: unreachable endpoint, missing bucket, refused credentials), never a botocore
traceback. Parsing a store URL into a RemotePath is :mod:`surpipe.store.location`."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from surpipe.config import secret_texts
from surpipe.errors import SurpipeError, first_line


OPTIONS_ENV = "SURPIPE_STORAGE_OPTIONS"


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


_FS_CACHE: dict = {}


def filesystem(protocol: str, options: dict, asynchronous: bool = False):
    """An fsspec filesystem for ``protocol`` (one per process and options). Listings are never
    cached: other processes (ranks, other jobs) change the store meanwhile."""
    import fsspec  # heavy (~120 ms with its async parts): loaded for a store on object storage only

    # the environment's credentials and endpoint are part of what the instance was made with
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "AZURE_")))
    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True, default=str), asynchronous, str(env))
    fs = _FS_CACHE.get(key)
    if fs is None:
        kw, retries = s3_settings(options) if protocol in ("s3", "s3a") else (dict(options), None)
        try:
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, asynchronous=asynchronous, **kw)
        except (TypeError, ValueError, KeyError) as e:
            raise SurpipeError(f"storage options {sorted(options)} are not accepted by the {protocol}:// filesystem "
                               f"({_scrub(first_line(e), options)[:200]}); fix --storage-options") from None
        if retries is not None:
            fs.retries = retries
        _FS_CACHE[key] = fs
        if asynchronous:
            _close_at_exit()
    return fs


# Against an endpoint that accepts connections and never answers, s3fs's defaults (15 s read timeout,
# botocore's 5 attempts inside s3fs's own 5) block for about 7 minutes without a word. Bounded by
# default: at most S3_RETRIES x 2 attempts of S3_READ_TIMEOUT each (about 40 s), overridable in
# --storage-options (config_kwargs.connect_timeout / read_timeout / retries; "retries" for s3fs's own).
S3_CONNECT_TIMEOUT = 5


S3_READ_TIMEOUT = 10  # seconds without a byte from the server (aiohttp's sock_read), not a whole transfer


S3_ATTEMPTS = 2  # botocore's total attempts per request ("standard" mode: throttling and 5xx too)


S3_RETRIES = 2  # s3fs's own attempts around botocore's (it also retries a body cut short)


def s3_settings(options: dict) -> tuple[dict, int]:
    """(s3fs keyword arguments, s3fs's own retry count) for storage ``options``: the bounded
    defaults above where the options (or AWS_MAX_ATTEMPTS / AWS_RETRY_MODE) do not say otherwise."""
    kw = dict(options)
    kw.setdefault("use_listings_cache", False)
    retries = kw.pop("retries", S3_RETRIES)  # s3fs takes it as an attribute, not an argument
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
        raise SurpipeError("storage option 'retries' (s3fs's own attempts) must be a whole number >= 1, got "
                           f"{retries if isinstance(retries, int) else type(retries).__name__}; fix --storage-options")
    ck = kw.get("config_kwargs") or {}
    if not isinstance(ck, dict):
        raise SurpipeError(f"storage option 'config_kwargs' must be a JSON object, got {type(ck).__name__}; "
                           "fix --storage-options")
    ck = dict(ck)
    ck.setdefault("connect_timeout", S3_CONNECT_TIMEOUT)
    ck.setdefault("read_timeout", S3_READ_TIMEOUT)
    if "retries" not in ck:
        r = {} if os.environ.get("AWS_MAX_ATTEMPTS") else {"total_max_attempts": S3_ATTEMPTS}
        if not os.environ.get("AWS_RETRY_MODE"):
            r["mode"] = "standard"
        ck["retries"] = r
    kw["config_kwargs"] = ck
    return kw, retries


_CLOSER = []


def _close_at_exit() -> None:
    """Close the async filesystems' HTTP sessions (zarr's FsspecStore) at exit: s3fs closes only its
    synchronous instances itself, and an open aiohttp session prints "Unclosed client session"."""
    if _CLOSER:
        return
    def close():
        from zarr.core.sync import sync  # heavy (zarr): the store package itself stays zarr-free on import

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


def endpoint_in_use(protocol: str, options: dict) -> str | None:
    """The endpoint a filesystem with ``options`` talks to, as botocore picks it: ``endpoint_url``
    in the options, then ``client_kwargs.endpoint_url``, then AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL;
    None for the default (AWS) or a protocol without one. Any user name or password is left out."""
    ep = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if not ep and protocol in ("s3", "s3a"):
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return re.sub(r"//[^/@]*@", "//", str(ep)) if ep else None


def _scrub(text: str, options: dict) -> str:
    """``text`` (a library's message) with every storage option value not known to be safe blanked
    out, in case the library echoed one."""
    for t in secret_texts(options):
        text = text.replace(t, "***")
    return text


def remote_failure(exc: BaseException, where: Any) -> SurpipeError:
    """A failure of the object store at ``where`` (a :class:`RemotePath` or its URL) as one clear
    line: what is wrong, which endpoint (the one in use) and what to check."""
    if isinstance(exc, SurpipeError):
        return exc
    protocol, options = ((where.protocol, where.options) if isinstance(where, RemotePath)
                         else (str(where).split("://", 1)[0].lower(), storage_options()))
    # the whole message on one line (its reason is often on the second), no option value in it
    text = _scrub(" ".join(str(exc).split()) or type(exc).__name__, options)[:300]
    names = {c.__name__ for c in type(exc).__mro__}
    low = text.lower()
    endpoint = endpoint_in_use(protocol, options)
    ep = f" (endpoint {endpoint})" if endpoint else ""
    if "NoSuchBucket" in text or "bucket does not exist" in low:
        bucket = str(where).split("://", 1)[-1].split("/", 1)[0]
        why = f"bucket {bucket!r} does not exist{ep}; create it or fix the URL"
    elif names & {"ReadTimeoutError", "ConnectTimeoutError", "ServerTimeoutError", "FSTimeoutError"} \
            or type(exc) is TimeoutError:
        why = _timeout_advice(protocol, options, endpoint, "ConnectTimeoutError" in names)
    elif names & {"EndpointConnectionError", "ConnectionError", "ClientConnectorError", "ClientOSError",
                  "ServerDisconnectedError", "ConnectionRefusedError", "TimeoutError"} \
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


def _timeout_advice(protocol: str, options: dict, endpoint: str | None, connecting: bool) -> str:
    """Why an endpoint that never answered failed, naming it and the timeout that ran out."""
    where = endpoint or "the default endpoint"
    if protocol not in ("s3", "s3a"):
        return f"the object store at {where} did not answer in time; check the endpoint and the network"
    kw, retries = s3_settings(options)
    ck = kw["config_kwargs"]
    which = "connect_timeout" if connecting else "read_timeout"
    r = ck["retries"]
    attempts = r.get("total_max_attempts") or (r["max_attempts"] + 1 if "max_attempts" in r
                                               else os.environ.get("AWS_MAX_ATTEMPTS", "?"))
    return (f"the object store at {where} did not answer within {which} {ck[which]} s ({retries} x {attempts} "
            f"attempts); check that the endpoint is right and up, or allow longer: add "
            f"\"config_kwargs\": {{\"{which}\": 60}} to --storage-options")


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
            raise remote_failure(e, where) from None
        raise
    except Exception as e:
        raise remote_failure(e, where) from None


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
    from zarr.storage import FsspecStore  # heavy (zarr): kept out of `surpipe --help`

    fs = filesystem(path.protocol, path.options, asynchronous=True)
    with remote_errors(path):
        return FsspecStore(fs=fs, path=path.path, read_only=read_only)
