"""Leases (surpipe/store/lease.py): the locks of a store on object storage. Every behaviour is run
against moto's real S3 server on 127.0.0.1 (tests/helpers/s3server.py) and against a local folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import child_env
from helpers.s3server import s3_bucket, s3_server  # noqa: F401  (fixtures)

from surpipe.errors import SurpipeError
from surpipe.store.lease import (Lease, default_ttl, ensure_conditional_create, exclusive_lease, live_holders,
                                 shared_lease)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["s3", "file"])
def where(request, tmp_path):
    """(fsspec filesystem, lock folder, protocol) on the S3 server or in a local folder."""
    if request.param == "s3":
        srv = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        return srv.fs(), f"{bucket}/s.zarr.locks", "s3"  # an s3:// URL, as the stores are named
    import fsspec

    return fsspec.filesystem("file"), str(tmp_path / "s.zarr.locks"), "file"


def _objects(fs, folder):
    fs.invalidate_cache(folder)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))


def test_s3_server_honours_if_none_match(s3_server, s3_bucket):
    """The server itself refuses a conditional create over an existing object (HTTP 412), through
    botocore directly and through s3fs's pipe_file(mode="create")."""
    import botocore.session
    from botocore.exceptions import ClientError

    bucket = s3_bucket[len("s3://"):]
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=s3_server.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        client.put_object(Bucket=bucket, Key="k", Body=b"second", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    fs = s3_server.fs()
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{bucket}/k", b"third", mode="create")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"first"
    fs.pipe_file(f"{bucket}/k2", b"new", mode="create")  # absent: created
    assert fs.cat_file(f"{bucket}/k2") == b"new"


def test_s3fs_takes_endpoint_from_environment(s3_server, s3_bucket):
    """A subprocess given only s3_server.env() reaches the test server (s3fs/botocore read
    AWS_ENDPOINT_URL), so CLI runs and torchrun ranks can use it."""
    bucket = s3_bucket[len("s3://"):]
    code = f"import fsspec; fs = fsspec.filesystem('s3'); fs.pipe_file('{bucket}/from-env', b'ok'); print(fs.ls('{bucket}'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    r = subprocess.run([sys.executable, "-c", code], env={**env, **s3_server.env()}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert s3_server.fs().cat_file(f"{bucket}/from-env") == b"ok"


def _plant_holder(fs, path, *, pid=1, host="node-b", machine=None, token="t", acquired=0.0, ttl_s=1.0, **extra):
    """Write lease ``path``'s first record as a holder on another machine would (its pid cannot be
    checked from here; it expires ``ttl_s`` after ``acquired`` unless renewed)."""
    fs.pipe_file(f"{path}.lease.00000000", json.dumps(
        {"pid": pid, "host": host, "machine": machine or host, "token": token, "what": "w",
         "acquired": acquired, "renewed": acquired, "ttl_s": ttl_s, **extra}).encode())


def test_second_holder_refused_then_released(where):
    fs, folder, _ = where
    a = Lease(fs, f"{folder}/llm__x.rank0", "group llm/x of store s.zarr", ttl_s=30)
    with a:
        assert a.holder["pid"] == os.getpid()
        with pytest.raises(SurpipeError) as e:
            Lease(fs, f"{folder}/llm__x.rank0", "group llm/x of store s.zarr", ttl_s=30).acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()} on {os.uname().nodename}" in msg and "group llm/x of store s.zarr" in msg
        assert "expires" in msg and "wait for it to finish" in msg
        # another name is independent
        with Lease(fs, f"{folder}/llm__x.rank1", "rank 1", ttl_s=30):
            pass
        assert [h["name"] for h in live_holders(fs, folder, "llm__x.rank*")] == ["llm__x.rank0"]
    assert live_holders(fs, folder) == []
    with Lease(fs, f"{folder}/llm__x.rank0", "again", ttl_s=30) as b:
        assert b.index == 1  # the released .0 is a tombstone; the new holder takes .1
    assert _objects(fs, folder) == ["llm__x.rank0.lease.00000001", "llm__x.rank1.lease.00000000"]
    rec = json.loads(fs.cat_file(f"{folder}/llm__x.rank0.lease.00000001"))
    assert rec["released"] is True and rec["what"] == "again"


def test_wait_s_waits_for_the_holder(where):
    fs, folder, _ = where
    a = Lease(fs, f"{folder}/g", "g", ttl_s=30)
    a.acquire()
    threading.Timer(0.6, a.release).start()
    t0 = time.monotonic()
    with Lease(fs, f"{folder}/g", "g", ttl_s=30, wait_s=10):
        assert 0.5 < time.monotonic() - t0 < 5


def test_racing_acquirers_exactly_one_wins(where):
    fs, folder, proto = where
    rounds, n = (10, 4) if proto == "s3" else (20, 4)
    for r in range(rounds):
        barrier = threading.Barrier(n)
        won, refused, errors = [], [], []

        def go(i):
            lease = Lease(fs, f"{folder}/race{r}", f"round {r}", ttl_s=30)
            barrier.wait()
            try:
                lease.acquire()
                won.append(lease)
            except SurpipeError:
                refused.append(i)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert not errors and len(won) == 1 and len(refused) == n - 1, (r, won, refused, errors)
        won[0].release()
    # and the same on a taken-over (stale) lease: racing takers of .n+1
    fs2 = fs
    for r in range(4):
        name = f"{folder}/stale{r}"
        _plant_holder(fs2, name, host="elsewhere", token="x")
        barrier = threading.Barrier(n)
        won = []

        def take():
            lease = Lease(fs, name, "w", ttl_s=30)
            barrier.wait()
            try:
                lease.acquire()
                won.append(lease)
            except SurpipeError:
                pass

        ts = [threading.Thread(target=take) for _ in range(n)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert len(won) == 1 and won[0].index == 1
        won[0].release()


_RACER = """
import sys, time, fsspec
from surpipe.errors import SurpipeError
from surpipe.store.lease import Lease
fs = fsspec.filesystem(sys.argv[1])
lease = Lease(fs, sys.argv[2], "racer", ttl_s=30)
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
try:
    lease.acquire()
    print("won", flush=True)
    time.sleep(0.5)  # still holding while the others decide
    lease.release()
except SurpipeError as e:
    print("refused", flush=True)
"""


def test_racing_processes_exactly_one_wins(s3_server, s3_bucket):
    """Separate processes (as data-parallel ranks or two jobs are) on the S3 server."""
    folder, proto = f"{s3_bucket[len('s3://'):]}/s.zarr.locks", "s3"
    env = child_env(**s3_server.env())
    start = time.time() + 1.5  # all three are imported and waiting by then
    ps = [subprocess.Popen([sys.executable, "-c", _RACER, proto, f"{folder}/p", str(start)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in ps]
    assert sorted(o.strip() for o, _ in outs) == ["refused", "refused", "won"], outs


_HOLDER = """
import sys, time, fsspec
from surpipe.store.lease import Lease
fs = fsspec.filesystem(sys.argv[1])
with Lease(fs, sys.argv[2], "held by a child", ttl_s=float(sys.argv[3])):
    print("held", flush=True)
    time.sleep(120)
"""


def _child_holder(proto, path, ttl, env):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, proto, path, str(ttl)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    line = p.stdout.readline()
    assert line.strip() == "held", p.stderr.read() if p.poll() is not None else line
    return p


def _env(where, request):
    env = child_env()
    if where[2] == "s3":
        env.update(request.getfixturevalue("s3_server").env())
    return env


def test_sigkilled_holder_on_this_host_taken_over_at_once(where, request):
    fs, folder, proto = where
    path = f"{folder}/llm__x.rank0"
    p = _child_holder(proto, path, 60, _env(where, request))
    try:
        with pytest.raises(SurpipeError, match=f"pid {p.pid} on"):
            Lease(fs, path, "w", ttl_s=60).acquire()  # alive in another process: refused
        os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.1)  # not reaped yet on purpose: a zombie counts as dead
        t0 = time.monotonic()
        with Lease(fs, path, "w", ttl_s=60) as lease:  # no TTL (60 s) wait
            assert lease.index == 1 and time.monotonic() - t0 < 5
    finally:
        p.kill()
        p.wait()


def test_holder_dead_on_another_host_taken_over_after_expiry_not_before(where):
    fs, folder, _ = where
    path = f"{folder}/llm__x.rank0"
    now = time.time()
    # a holder on another machine (its pid cannot be checked from here) that stopped renewing
    fs.makedirs(folder, exist_ok=True)
    _plant_holder(fs, path, pid=os.getpid(), machine="node-b/boot/1", acquired=now, ttl_s=1.5, released=False)
    with pytest.raises(SurpipeError, match="pid .* on node-b .* lease expires"):
        Lease(fs, path, "w", ttl_s=30).acquire()
    time.sleep(max(0.0, now + 1.6 - time.time()))
    with Lease(fs, path, "w", ttl_s=30) as lease:
        assert lease.index == 1
    assert _objects(fs, folder) == ["llm__x.rank0.lease.00000001"]  # the old object was garbage


def _pause(lease):
    """Simulate a holder frozen past its TTL: its renewal thread stops."""
    lease._stop.set()
    lease._thread.join()


def test_fencing_after_takeover(where, monkeypatch):
    fs, folder, _ = where
    path = f"{folder}/llm__x.rank0"
    import surpipe.store.lease_records as lease_mod

    old = Lease(fs, path, "w", ttl_s=1.0)
    old.acquire()
    old.check()
    _pause(old)
    # the old holder looks like one on another machine (else its live pid here would keep it)
    monkeypatch.setattr(lease_mod, "_machine", lambda: "another machine")
    time.sleep(1.1)
    new = Lease(fs, path, "w", ttl_s=30)
    new.acquire()
    assert new.index == 1
    with pytest.raises(SurpipeError, match="was taken over by pid"):
        old.check()
    new.check()
    new.release()
    # still fenced after the taker released: the higher tombstone stays
    old._lost = None
    with pytest.raises(SurpipeError, match="taken over"):
        old.check()
    # a late renewal PUT of the old holder lands after all that (its object comes back): the
    # tombstone above it still fences it; a lease deleted on release would now look held by it
    fs.pipe_file(old.holder["object"], json.dumps(old._record()).encode())
    old._lost = None
    with pytest.raises(SurpipeError, match="taken over"):
        old.check()
    old.release()  # leaves the others' objects alone
    assert live_holders(fs, folder) == []
    assert _objects(fs, folder)[-1] == "llm__x.rank0.lease.00000001"


def test_slow_acquirer_recreating_a_collected_number_backs_off(where, monkeypatch):
    """A party that listed before a takeover, and then creates a number that the taker since
    deleted as garbage, finds the higher number on its second look and does not hold."""
    fs, folder, _ = where
    import surpipe.store.lease as lease_mod

    path = f"{folder}/g"
    fs.makedirs(folder, exist_ok=True)
    _plant_holder(fs, path)
    holder = Lease(fs, path, "w", ttl_s=30)
    holder.acquire()  # took .1 over the expired .0 and deleted .0
    assert holder.index == 1 and _objects(fs, folder) == ["g.lease.00000001"]
    real, calls = lease_mod._listing, []

    def slow_first_look(fs_, d):
        calls.append(d)
        return {} if len(calls) == 1 else real(fs_, d)  # its first listing predates everything

    monkeypatch.setattr(lease_mod, "_listing", slow_first_look)
    with pytest.raises(SurpipeError, match=f"being written by pid {os.getpid()}"):
        Lease(fs, path, "w", ttl_s=30).acquire()
    assert _objects(fs, folder) == ["g.lease.00000001"]  # its .0 was removed again
    holder.check()
    holder.release()


def test_renewal_keeps_the_lease_alive_past_ttl(where):
    fs, folder, _ = where
    path = f"{folder}/g"
    with Lease(fs, path, "w", ttl_s=0.5) as a:
        for _ in range(3):  # 1.5 s: three TTLs
            time.sleep(0.5)
            a.check()
            with pytest.raises(SurpipeError, match="being written by"):
                Lease(fs, path, "w", ttl_s=0.5).acquire()
        rec = json.loads(fs.cat_file(a.holder["object"]))
        assert rec["renewed"] > rec["acquired"] + 0.9 and rec["token"] == a.holder["token"]


def test_unrenewed_lease_fails_check(where):
    fs, folder, _ = where
    a = Lease(fs, f"{folder}/g", "w", ttl_s=0.5)
    a.acquire()
    _pause(a)
    time.sleep(0.6)
    with pytest.raises(SurpipeError, match="could not be renewed"):
        a.check()
    a.release()


def test_shared_writers_exclusive_deleter(where):
    fs, folder, _ = where
    with shared_lease(fs, folder, "llm__x", "rank0", "group llm/x", ttl_s=30):
        with shared_lease(fs, folder, "llm__x", "rank1", "group llm/x", ttl_s=30):
            pass  # writers share the group
        with pytest.raises(SurpipeError, match=f"being written by pid {os.getpid()}.*cannot be replaced"):
            with exclusive_lease(fs, folder, "llm__x", "group llm/x", ttl_s=30):
                pass
        assert live_holders(fs, folder, "llm__x.delete") == []  # the refused deleter let go
    with exclusive_lease(fs, folder, "llm__x", "group llm/x", ttl_s=30):
        with pytest.raises(SurpipeError, match="being replaced by"):
            with shared_lease(fs, folder, "llm__x", "rank0", "group llm/x", ttl_s=30):
                pass
        with shared_lease(fs, folder, "llm__y", "rank0", "group llm/y", ttl_s=30):
            pass  # another group is not affected
    with shared_lease(fs, folder, "llm__x", "rank0", "group llm/x", ttl_s=30):
        pass


def test_waiting_writer_and_deleter_take_turns(where):
    """A deleter waits (holding its lease) for the running writer; a writer arriving meanwhile
    lets go and waits for the deleter: no deadlock, and each runs alone."""
    fs, folder, _ = where
    order, errors = [], []
    w1 = shared_lease(fs, folder, "g", "rank0", "group g", ttl_s=30)
    w1.__enter__()

    def deleter():
        try:
            with exclusive_lease(fs, folder, "g", "group g", ttl_s=30, wait_s=10):
                order.append("delete")
                assert live_holders(fs, folder, "g.rank*") == []
                time.sleep(0.3)
                order.append("delete done")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def writer():
        try:
            with shared_lease(fs, folder, "g", "rank1", "group g", ttl_s=30, wait_s=10):
                order.append("write")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    td = threading.Thread(target=deleter)
    td.start()
    while not live_holders(fs, folder, "g.delete"):
        time.sleep(0.02)
    tw = threading.Thread(target=writer)
    tw.start()
    time.sleep(0.4)
    assert order == []  # both wait: the deleter for rank0, the writer for the deleter
    w1.__exit__(None, None, None)
    td.join(15)
    tw.join(15)
    assert not errors and order == ["delete", "delete done", "write"], (order, errors)


def test_unreadable_lease_object_refused_with_advice(where):
    fs, folder, _ = where
    fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(f"{folder}/g.lease.00000000", b"not json")
    with pytest.raises(SurpipeError, match="not a lease record.*delete that object"):
        Lease(fs, f"{folder}/g", "w", ttl_s=30).acquire()


def test_storage_ignoring_conditional_create_is_refused(tmp_path):
    """A filesystem whose create-if-absent silently overwrites is refused, never trusted."""
    from fsspec.implementations.memory import MemoryFileSystem

    class Careless(MemoryFileSystem):
        protocol = "careless"

        def pipe_file(self, path, value, mode="overwrite", **kw):
            return super().pipe_file(path, value, **kw)  # drops mode="create", like an old server

    fs = Careless(skip_instance_cache=True)
    with pytest.raises(SurpipeError, match="ignores conditional writes"):
        ensure_conditional_create(fs, "/bkt/s.zarr.locks")

    from fsspec.spec import AbstractFileSystem

    class Generic(AbstractFileSystem):  # fsspec's exists-then-write fallback: not atomic
        protocol = "generic"

    with pytest.raises(SurpipeError, match="no atomic create-if-absent"):
        ensure_conditional_create(Generic(skip_instance_cache=True), "/bkt/s.zarr.locks")


def test_default_ttl(monkeypatch):
    monkeypatch.delenv("SURPIPE_LEASE_TTL_S", raising=False)
    assert default_ttl() == 60.0
    monkeypatch.setenv("SURPIPE_LEASE_TTL_S", "5")
    assert default_ttl() == 5.0
    for bad in ("0", "-1", "nan", "inf", "x"):
        monkeypatch.setenv("SURPIPE_LEASE_TTL_S", bad)
        with pytest.raises(SurpipeError, match="SURPIPE_LEASE_TTL_S"):
            default_ttl()
