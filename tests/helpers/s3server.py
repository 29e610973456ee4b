"""A real S3-compatible server for the tests: moto's standalone server on 127.0.0.1 (never a mock of
the client), one per test session; a fresh bucket per test is cheap.

Use from a test module::

    from s3server import s3_server, s3_bucket  # noqa: F401  (pytest fixtures)

    def test_x(s3_server, s3_bucket):       # s3_bucket: "s3://<fresh bucket>"
        fs = s3_server.fs()                   # an s3fs filesystem on the server
        subprocess.run([...], env={**os.environ, **s3_server.env()})   # CLI runs, torchrun ranks

Nothing here reaches beyond 127.0.0.1: the endpoint is always given (``AWS_ENDPOINT_URL`` for
subprocesses, ``endpoint_url`` in-process), instance metadata lookups are off, and 127.0.0.1 bypasses
any proxy.
"""

from __future__ import annotations

import logging
import secrets
import threading

import pytest

KEY, SECRET, REGION = "testing", "testing", "us-east-1"
_LOCAL = "127.0.0.1,localhost"


def _atomic_conditional_puts() -> None:
    """Make moto's PutObject check-then-write one step, as on AWS S3: moto 5.2.5 checks
    ``If-None-Match: *`` (``S3Response.put_object``) and then writes, and its server answers
    requests on several threads, so two racing conditional creates could both succeed there,
    which AWS never allows. One lock around the handler restores S3's guarantee (idempotent)."""
    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "_surpipe_atomic", False):
        return
    lock = threading.Lock()
    orig = S3Response.put_object

    def put_object(self, *a, **kw):
        with lock:
            return orig(self, *a, **kw)

    put_object._surpipe_atomic = True
    S3Response.put_object = put_object


class S3Server:
    """A running moto S3 server on 127.0.0.1 (see :func:`start_server`)."""

    def __init__(self, server, endpoint: str):
        self._server = server
        self.endpoint = endpoint

    def env(self) -> dict[str, str]:
        """The environment a subprocess needs to use this server through s3fs / botocore."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": _LOCAL,
            "no_proxy": _LOCAL,
        }

    def storage_options(self) -> dict:
        """s3fs keyword arguments for this server (``--storage-options`` / ``fsspec.filesystem("s3", **...)``)."""
        return {"endpoint_url": self.endpoint, "key": KEY, "secret": SECRET}

    def fs(self, **kw):
        """A fresh s3fs filesystem on this server (not fsspec's shared instance)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options(), **kw)

    def make_bucket(self, name: str | None = None) -> str:
        """Create bucket ``name`` (default: a fresh random one); returns its name."""
        name = name or f"t-{secrets.token_hex(6)}"
        self.fs().mkdir(name)
        return name

    def stop(self) -> None:
        self._server.stop()


def start_server() -> S3Server:
    """Start moto's S3 server on 127.0.0.1 on a free port (in a thread of this process)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    _atomic_conditional_puts()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1", host
    return S3Server(server, f"http://{host}:{port}")


_shared: S3Server | None = None
_shared_lock = threading.Lock()


def shared_server() -> S3Server:
    """The one server of this process (started on first use, stopped at exit): the fixture's, so
    that several test modules importing the fixture still share one server."""
    global _shared
    with _shared_lock:
        if _shared is None:
            import atexit

            _shared = start_server()
            atexit.register(_shared.stop)
        return _shared


@pytest.fixture(scope="session")
def s3_server():
    """One S3 server on 127.0.0.1 for the whole test session."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    return shared_server()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket: yields ``"s3://<bucket>"``; emptied and deleted afterwards."""
    name = s3_server.make_bucket()
    yield f"s3://{name}"
    try:
        fs = s3_server.fs()
        fs.rm(name, recursive=True)
    except Exception:  # noqa: BLE001 - cleanup of a throwaway bucket on a throwaway server
        pass


def use_s3_env(server: S3Server, monkeypatch, cache_dir=None) -> None:
    """Point this process at ``server`` as a user would (the standard AWS variables), with no options
    left in force by an earlier command and, with ``cache_dir``, a 1 GB store cache there."""
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SURPIPE_STORAGE_OPTIONS", "")
    if cache_dir is not None:
        monkeypatch.setenv("SURPIPE_STORE_CACHE_DIR", str(cache_dir))
        monkeypatch.setenv("SURPIPE_STORE_CACHE_GB", "1")
