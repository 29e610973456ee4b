"""Feature stores on object storage: every store command against a real S3 server (moto's, started
by the tests on 127.0.0.1; never a mock of the client).

What must hold there as on a local disk: stage one data-parallel (2 gloo ranks) writes the same
values as one local process; a SIGKILL mid-write then a rerun completes the store and recomputes
only unfinished blocks; verify and inspect read it; train reads it through a bounded local cache
(the second epoch fetches no chunk data); a second writer of a group is refused naming the holder;
credentials from the environment or --storage-options; a bad endpoint or a missing bucket is one
clear line (exit 1), never a traceback.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, SyntheticDataset, child_env, run_cli, run_cli_err, sigkill_when
from helpers.s3server import s3_bucket, s3_server, use_s3_env  # noqa: F401  (pytest fixtures)

pytest.importorskip("s3fs")


@pytest.fixture(autouse=True)
def _s3_env(s3_server, monkeypatch, tmp_path):
    """This process talks to the test server as a user would: the standard AWS variables. Options
    put in force by a command (SURPIPE_STORAGE_OPTIONS) and the cache location are undone after."""
    use_s3_env(s3_server, monkeypatch, tmp_path / "cache")


def _env(server, **extra):
    env = child_env(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **server.env())
    env.pop("SURPIPE_STORAGE_OPTIONS", None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zarr_group(url: str, path: str, server):
    import zarr
    from zarr.storage import FsspecStore

    st = FsspecStore.from_url(url, storage_options={**server.storage_options(), "use_listings_cache": False},
                              read_only=True)
    return zarr.open_group(st, mode="r")[path]


def _extract_args(url, llm, name="t", block_rows=8, layers="1,3"):
    return ["extract-llm", "--data", str(REPO / "data" / "sample"), "--store", url, "--model", str(llm),
            "--layers", layers, "--block-rows", str(block_rows), "--batch-size", "4", "--no-progress",
            "--device", "cpu", "--store-dtype", "float32", "--name", name]


# ------------------------------------------------------------------------------------------------
def test_stage_one_two_gloo_ranks_on_s3_equal_one_local_process_then_verify_inspect(
        s3_server, s3_bucket, tiny_models, tmp_path):
    url = f"{s3_bucket}/prefix/surd.zarr"
    args = _extract_args(url, tiny_models / "llm", name="dp")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "stages", *args], cwd=REPO,
                              env=_env(s3_server, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "Traceback" not in "".join(outs)
    # nothing landed on the local disk under a folder named after the URL
    assert not (REPO / "s3:").exists() and not (tmp_path / "s3:").exists()
    fs = s3_server.fs()
    bucket = s3_bucket[len("s3://"):]
    locks = fs.ls(f"{bucket}/prefix/surd.zarr.locks")
    assert any(".rank1.lease." in p for p in locks), locks  # rank 1 held its own writer lease

    # the same values as one local process (float32 storage, one thread per rank)
    import torch
    import zarr

    from stages.extract_llm import ExtractLLMConfig, run

    ref = tmp_path / "one.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(ExtractLLMConfig(data=str(REPO / "data" / "sample"), store=str(ref), model=str(tiny_models / "llm"),
                             layers=[1, 3], block_rows=8, batch_size=4, store_dtype="float32", name="dp",
                             progress=False, check_images="none", device="cpu"))
    finally:
        torch.set_num_threads(threads)
    a = _zarr_group(url, "llm/dp", s3_server)
    b = zarr.open_group(str(ref), mode="r")["llm/dp"]
    assert (a["done"][:] != 0).all() and a.attrs["provenance"]["world_size"] == 2
    # 8 blocks at the object-store default of 4 per shard: each rank wrote one whole shard object
    assert a.attrs["shard_blocks"] == 4 and len(fs.ls(f"{bucket}/prefix/surd.zarr/llm/dp/layer_1/pooled/c")) == 2
    for name in ("layer_1/pooled", "layer_3/pooled", "token_counts"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)

    # encode-latents (CLIP part) into the same remote store, then verify and inspect read it all
    rc, err = run_cli_err("encode-latents", "--data", REPO / "data" / "sample", "--store", url,
                          "--model", tiny_models / "sd", "--parts", "clip", "--no-progress", "--device", "cpu")
    assert rc == 0, err
    rc, out, err = run_cli("verify", url)
    assert rc == 0, err
    assert f"verify {url}: format 2, 64 samples, 2 feature groups" in out and "OK: no problems" in out
    rc, out, err = run_cli("inspect", url, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["path"] == url
    assert {g["path"]: g["complete_blocks"] for g in info["groups"]} == {"llm/dp": 8, "clip/sd": 8}
    # the configs are saved beside the store, on the object store
    assert fs.isfile(f"{bucket}/prefix/surd.zarr.configs/extract-llm-dp.json")


# The CLI, with every block slowed down (test-only monkeypatch), so a kill lands mid-run.
_SLOW_CLI = (
    "import sys, time; import surpipe.llm as L; _x = L.extract\n"
    "def slow(*a, **k):\n    time.sleep(0.3); return _x(*a, **k)\n"
    "L.extract = slow\nfrom stages.cli import main\nsys.exit(main(sys.argv[1:]))\n"
)


def test_sigkill_mid_write_then_resume_completes_and_rewrites_no_finished_block(s3_server, s3_bucket, tiny_models):
    url = f"{s3_bucket}/surd.zarr"
    args = _extract_args(url, tiny_models / "llm", name="k", block_rows=4, layers="1")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args], env=_env(s3_server), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fs = s3_server.fs()
    done_dir = f"{s3_bucket[5:]}/surd.zarr/llm/k/done/c"
    def three_marked():
        try:
            fs.invalidate_cache()
            return len(fs.ls(done_dir)) >= 3
        except FileNotFoundError:
            return None

    killed = sigkill_when(proc, three_marked, timeout=120)
    assert killed is not None, proc.stdout.read().decode()
    assert proc.returncode == -signal.SIGKILL
    g = _zarr_group(url, "llm/k", s3_server)
    done = (g["done"][:] != 0)
    assert 3 <= done.sum() < len(done)
    finished = np.flatnonzero(done).tolist()
    # an object store's default: 4 blocks per object (zarr sharding); a shard is written whole
    K = g.attrs["shard_blocks"]
    assert K == 4 and g["layer_1/pooled"].shards[0] == 4 * 4
    assert all(done[(b // K) * K:(b // K + 1) * K].all() for b in finished)  # whole shards done, never parts
    # the finished blocks' objects as they are now (content and modification time)
    before = {b // K: fs.info(f"{s3_bucket[5:]}/surd.zarr/llm/k/layer_1/pooled/c/{b // K}/0") for b in finished}

    t0 = time.time()
    rc, err = run_cli_err(*args)  # the killed writer's lease (a dead pid of this machine) is taken over at once
    assert rc == 0, err
    assert time.time() - t0 < 50  # never waited out the 60 s lease TTL
    line = [ln for ln in err.splitlines() if "extract-llm llm/k:" in ln][0]
    assert f"{(len(done) - len(finished)) * 4} prompts" in line  # only the unfinished blocks were computed
    g = _zarr_group(url, "llm/k", s3_server)
    assert (g["done"][:] != 0).all()
    for shard, info in before.items():
        now = fs.info(f"{s3_bucket[5:]}/surd.zarr/llm/k/layer_1/pooled/c/{shard}/0")
        assert (now["ETag"], now["LastModified"]) == (info["ETag"], info["LastModified"]), shard
    rc, out, err = run_cli("verify", url)
    assert rc == 0 and "OK: no problems" in out, out + err


_HOLDER = (
    "import sys, time\nfrom surpipe.store.locks import writer_lock\n"
    "with writer_lock(sys.argv[1], 'llm/g', 0):\n    print('held', flush=True)\n    time.sleep(60)\n"
)


def test_second_writer_of_a_group_is_refused_naming_the_holder(s3_server, s3_bucket):
    from surpipe.store.blockjob import DistEnv, run_block_job
    from surpipe.errors import SurpipeError
    from surpipe.store import ArraySpec, FeatureStore

    url = f"{s3_bucket}/w.zarr"
    st = FeatureStore.create_or_open(url, SyntheticDataset([(f"k{i}", f"s{i}", f"c{i}") for i in range(8)]),
                                     block_rows=4)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, url], env=_env(s3_server), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert holder.stdout.readline().decode().strip() == "held"
        with pytest.raises(SurpipeError) as e:
            run_block_job(store=st, kind="llm", name="g", settings={"a": 1},
                          arrays={"layer_0/pooled": ArraySpec((4,))}, provenance={}, overwrite=False,
                          env=DistEnv(), compute_block=lambda s, e: {"layer_0/pooled": np.ones((e - s, 4))},
                          progress=False)
        msg = str(e.value)
        assert f"group llm/g of store {url} (rank 0 of 1) is being written by pid {holder.pid} on " \
               f"{socket.gethostname()}" in msg
        assert st.group("llm/g").completed_blocks() == 0  # the refused job wrote nothing
        # --overwrite cannot delete the group while its writer runs
        with pytest.raises(SurpipeError, match="cannot be\\s+replaced"):
            st.require_group("llm", "g", {"a": 2}, {"layer_0/pooled": ArraySpec((4,))}, overwrite=True)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # the holder died: its lease is taken over at once (same machine, dead pid) and the job runs
    run_block_job(store=st, kind="llm", name="g", settings={"a": 1}, arrays={"layer_0/pooled": ArraySpec((4,))},
                  provenance={}, overwrite=False, env=DistEnv(),
                  compute_block=lambda s, e: {"layer_0/pooled": np.ones((e - s, 4))}, progress=False)
    assert st.group("llm/g").is_complete()


def test_fencing_a_writer_whose_lease_was_taken_over_marks_no_block(s3_server, s3_bucket):
    from surpipe.errors import SurpipeError
    from surpipe.store.locks import _lease_dir, writer_lock
    from surpipe.store import ArraySpec, FeatureStore

    url = f"{s3_bucket}/f.zarr"
    st = FeatureStore.create_or_open(url, SyntheticDataset([(f"k{i}", f"s{i}", f"c{i}") for i in range(8)]),
                                     block_rows=4)
    g = st.require_group("llm", "g", {"a": 1}, {"layer_0/pooled": ArraySpec((4,))})
    with writer_lock(st.path, "llm/g", 0) as fence:
        g.write_block(0, {"layer_0/pooled": np.ones((4, 4))}, fence=fence.check)
        # another job takes the lease over (as when this one was paused past its TTL): a higher lease object
        fs, d = _lease_dir(st.path)
        top = sorted(p for p in fs.ls(d) if "llm__g.rank0.lease." in p)[-1]
        n = int(top.rsplit(".", 1)[1])
        rec = dict(json.loads(fs.cat_file(top)), pid=1, token="other", renewed=time.time() + 3600)
        fs.pipe_file(f"{d}/llm__g.rank0.lease.{n + 1:08d}", json.dumps(rec).encode())
        with pytest.raises(SurpipeError, match="taken over"):
            g.write_block(1, {"layer_0/pooled": np.ones((4, 4))}, fence=fence.check)
    assert g.done_mask().tolist() == [True, False]


def test_train_from_s3_and_the_second_epoch_fetches_no_chunk_data(s3_server, s3_bucket, tiny_models, tmp_path,
                                                                   monkeypatch):
    import s3fs

    from surpipe.store import FeatureStore
    from surpipe.train.groups import resolve_groups
    from surpipe.train.data import BlockReader, SampleStream
    from helpers.stores import make_store

    url = f"{s3_bucket}/t.zarr"
    make_store(url, n=24, block_rows=8)  # built in place on the object store
    local = tmp_path / "same.zarr"
    make_store(local, n=24, block_rows=8)  # the same values (same seed) on the local disk

    gets: list[str] = []
    orig = s3fs.S3FileSystem._cat_file

    async def counting(self, path, *a, **kw):  # every GET the client sends, whoever asks
        gets.append(path)
        return await orig(self, path, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counting)

    def chunk_gets():
        return [p for p in gets if "/c/" in p and "/done/" not in p and "/prompts/" not in p and "/keys/" not in p]

    st = FeatureStore(url)
    groups, problems = resolve_groups(st, llm_layer=-1, llm_group=None, clip_group=None, vae_group=None,
                                      use_flip=True)
    assert not problems
    reader = BlockReader(url, groups, st.block_rows)
    ref = BlockReader(str(local), groups, st.block_rows)

    def epoch():
        stream = SampleStream(reader, batch_size=4, seed=0)
        it = iter(stream)
        return [next(it) for _ in range(24 // 4)]

    gets.clear()
    first = epoch()
    n_first = len(chunk_gets())
    assert n_first == 3 * 7  # 3 blocks x 7 arrays, each fetched once
    gets.clear()
    second = epoch()
    assert chunk_gets() == []  # epoch 2: every chunk from the local cache
    for x, y in zip(first, second):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for b in range(3):  # the cached values are the stored ones
        for k, v in reader[b].items():
            np.testing.assert_array_equal(v, ref[b][k], err_msg=k)

    # a block recomputed in the same generation (verify --repair, then the stage) is never served stale
    g = FeatureStore(url, mode="a").group(groups.llm_group)
    name = f"layer_{groups.llm_layer}/pooled"
    g.mark_incomplete(0)
    new = np.full((8, 16), 5.0)
    g.write_block(0, {a: (new if a == name else np.asarray(g.read(a, 0, 8))) for a in g.array_names})
    fresh = BlockReader(url, groups, st.block_rows)
    np.testing.assert_array_equal(fresh[0]["llm"], new.astype(np.float16))

    # and the CLI trains from the URL (a few steps)
    rc, err = run_cli_err("train", "--store", url, "--model", tiny_models / "sd", "--llm-layer", "-1",
                          "--out", tmp_path / "run", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
                          "--no-progress", "--device", "cpu", "--cache-dir", tmp_path / "c2")
    assert rc == 0, err
    assert any((tmp_path / "c2").rglob("*"))  # the chunks went to --cache-dir


def test_storage_options_json_and_env_credentials(s3_server, s3_bucket, monkeypatch):
    from helpers.stores import make_store

    url = f"{s3_bucket}/o.zarr"
    make_store(url, n=8, block_rows=8)  # through the environment's credentials and endpoint
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    opts = json.dumps(s3_server.storage_options())
    rc, out, err = run_cli("verify", url, "--storage-options", opts)
    assert rc == 0 and "OK: no problems" in out, err
    for bad, why in (("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")):
        rc, out, err = run_cli("verify", url, "--storage-options", bad)
        assert rc == 1 and why in err and "Traceback" not in err, err


def test_bad_endpoint_and_missing_bucket_are_one_clear_line(s3_server, s3_bucket, monkeypatch, tiny_models, tmp_path):
    rc, out, err = run_cli("verify", "s3://no-such-bucket-xyz/s.zarr")
    assert rc == 1 and "bucket 'no-such-bucket-xyz' does not exist" in err and "Traceback" not in err, err
    assert len([ln for ln in err.splitlines() if ln.startswith("surpipe: error")]) == 1
    t0 = time.time()
    rc, err = run_cli_err(*_extract_args("s3://no-such-bucket-xyz/s.zarr", tiny_models / "llm"))
    assert rc == 1 and "does not exist" in err and "Traceback" not in err, err
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for argv in (["verify", f"{s3_bucket}/s.zarr"], ["inspect", f"{s3_bucket}/s.zarr"],
                 ["train", "--store", f"{s3_bucket}/s.zarr", "--model", tiny_models / "sd", "--llm-layer", "1",
                  "--out", tmp_path / "r", "--no-progress"]):
        rc, out, err = run_cli(*argv)
        assert rc == 1 and "cannot reach the object store" in err and "Traceback" not in err, (argv, err)
    assert time.time() - t0 < 60


def test_a_half_built_remote_store_is_never_read_and_is_rebuilt(s3_server, s3_bucket):
    """Object stores have no rename: a build killed midway (marker present, no surpipe_format) is
    refused by readers and rebuilt by the next creator; a prefix of someone else's objects is never
    built over."""
    from surpipe.errors import SurpipeError
    from surpipe.store import FeatureStore
    from surpipe.store.creation import _build, building_marker
    from surpipe.store.location import store_path

    url = f"{s3_bucket}/h.zarr"
    ds = SyntheticDataset([(f"k{i}", f"s{i}", f"c{i}") for i in range(6)])
    path = store_path(url)
    building_marker(path).write_text("{}")

    def killed():
        raise KeyboardInterrupt  # the build dies right before its last write

    with pytest.raises(KeyboardInterrupt):
        _build(path, ds, 2, before_commit=killed)
    fs = s3_server.fs()
    assert fs.isfile(f"{url[5:]}/keys/zarr.json")  # the rows were written ...
    with pytest.raises(SurpipeError, match="was not completely created"):
        FeatureStore(url)  # ... but it is no store
    rc, out, err = run_cli("verify", url)
    assert rc == 1 and "Traceback" not in err
    st = FeatureStore.create_or_open(url, ds, block_rows=2)  # rebuilt under the creation lease
    assert st.created_now and st.num_samples == 6 and not building_marker(path).is_file()
    assert FeatureStore(url).keys().tolist() == [f"k{i}" for i in range(6)]

    other = f"{s3_bucket}/data"
    fs.pipe_file(f"{other[5:]}/x.bin", b"precious")
    with pytest.raises(SurpipeError, match="is not a Zarr v3 store"):
        FeatureStore.create_or_open(other, ds, block_rows=2)
    assert fs.cat_file(f"{other[5:]}/x.bin") == b"precious"


def test_adding_layers_to_a_group_on_s3_keeps_the_stored_ones(s3_server, s3_bucket, tiny_models, tmp_path):
    """extract-llm --layers on an existing remote group: the new layers' arrays are moved in from
    the side store beside it (copied: no rename on object storage), equal to a one-shot run."""
    import zarr

    url = f"{s3_bucket}/a.zarr"
    rc, err = run_cli_err(*_extract_args(url, tiny_models / "llm", name="a", layers="1"))
    assert rc == 0, err
    before = _zarr_group(url, "llm/a", s3_server)["layer_1/pooled"][:]
    rc, err = run_cli_err(*_extract_args(url, tiny_models / "llm", name="a", layers="1,3"))
    assert rc == 0, err
    rc, err = run_cli_err(*_extract_args(str(tmp_path / "one.zarr"), tiny_models / "llm", name="a", layers="1,3"))
    assert rc == 0, err
    a = _zarr_group(url, "llm/a", s3_server)
    b = zarr.open_group(str(tmp_path / "one.zarr"), mode="r")["llm/a"]
    np.testing.assert_array_equal(a["layer_1/pooled"][:], before)
    np.testing.assert_array_equal(a["layer_3/pooled"][:], b["layer_3/pooled"][:])
    assert a.attrs["settings"]["layers"] == [1, 3]
    assert not s3_server.fs().find(f"{url[5:]}.adding-layers")  # the side store (and its locks) is gone
    rc, out, err = run_cli("verify", url)
    assert rc == 0 and "OK: no problems" in out, out + err


def test_saved_configs_keep_no_secrets_and_bad_urls_and_outs_are_refused(s3_server, s3_bucket, tiny_models, tmp_path):
    """--storage-options secrets never reach the store, its sidecar configs or a run folder (others
    read those); URLs with empty or '.' parts (another object prefix than they seem) and output
    folders given as URLs (they would become local folders named 's3:') are one-line refusals."""
    from surpipe.config import redact_storage_options

    env = s3_server.env()
    opts = json.dumps({"key": env["AWS_ACCESS_KEY_ID"], "secret": "SuperSecret123", "endpoint_url": env["AWS_ENDPOINT_URL"],
                       "client_kwargs": {"aws_session_token": "Tok456", "region_name": "us-east-1"}})
    url = f"{s3_bucket}/sec.zarr"
    rc, err = run_cli_err(*_extract_args(url, tiny_models / "llm", name="t", layers="1"), "--storage-options", opts)
    assert rc == 0, err
    fs = s3_server.fs()
    bucket = s3_bucket[len("s3://"):]
    blobs = [fs.cat(f"{bucket}/sec.zarr/llm/t/zarr.json"), fs.cat(f"{bucket}/sec.zarr.configs/extract-llm-t.json")]
    for b in blobs:
        assert b"SuperSecret123" not in b and b"Tok456" not in b
    assert b"endpoint_url" in blobs[1] and b"region_name" in blobs[1]  # the rest of the options is kept
    assert json.loads(redact_storage_options(opts)) == {"endpoint_url": env["AWS_ENDPOINT_URL"],
                                                          "client_kwargs": {"region_name": "us-east-1"}}

    for bad in (f"{s3_bucket}//sec.zarr", f"{s3_bucket}/./sec.zarr"):
        rc, out, err = run_cli("inspect", bad)
        assert rc == 1 and "Traceback" not in err and err.strip().endswith(f"write it as {url}"), err
    rc, out, err = run_cli("train", "--store", url, "--model", tiny_models / "sd", "--llm-layer", "1",
                           "--out", f"{s3_bucket}/run")
    assert rc == 1 and "output folders are local paths" in err, err
    assert not (REPO / "s3:").exists()


def test_a_cached_copy_cut_short_is_fetched_again(s3_server, s3_bucket, tmp_path):
    """A cache file truncated by a crash of the machine is the cache's damage, not the store's: the
    reader drops it and reads the store again, instead of sending the user to verify --repair."""
    from surpipe.store import FeatureStore
    from surpipe.train.groups import resolve_groups
    from surpipe.train.data import BlockReader
    from helpers.stores import make_store

    url = f"{s3_bucket}/c.zarr"
    make_store(url, n=16, block_rows=8)
    st = FeatureStore(url)
    groups, problems = resolve_groups(st, llm_layer=-1, llm_group=None, clip_group=None, vae_group=None,
                                      use_flip=True)
    assert not problems
    first = BlockReader(url, groups, st.block_rows)[1]
    cached = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "/clip/" in str(p))
    assert cached
    for p in cached:
        p.write_bytes(p.read_bytes()[:7])  # cut short
    again = BlockReader(url, groups, st.block_rows)[1]
    for k in first:
        np.testing.assert_array_equal(first[k], again[k], err_msg=k)
