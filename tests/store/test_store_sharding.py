"""Shards (issue 15, item 1): ``--shard-blocks K`` stores K blocks of a group per object (zarr v3
sharding), with the same values as an unsharded store, K times fewer objects, ranks that own whole
shards (zarr loses data when two writers touch one shard), resume and verify at block granularity,
and growth into a partial last shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers import SyntheticDataset
from surpipe.store.blockjob import DistEnv, run_block_job
from surpipe.errors import SurpipeError
from surpipe.store import ArraySpec, FeatureStore
from surpipe.store.sharding import default_shard_blocks, owner, shard_runs
from helpers.s3server import s3_bucket, s3_server, use_s3_env  # noqa: F401  (fixtures)
from helpers.growth import BLOCK, _surd, _values

REPO = Path(__file__).resolve().parents[2]
ARRAYS = {"x": ArraySpec((3, 5)), "n": ArraySpec((), "int32"),
          "tok": ArraySpec((2,), "float32", block_capacity=7)}


def _extract(data, store, tiny_models, shard_blocks=None):
    from stages.extract_llm import ExtractLLMConfig, run

    return run(ExtractLLMConfig(data=str(data), store=str(store), model=str(tiny_models / "llm"), layers=[1, 3],
                                block_rows=BLOCK, batch_size=3, progress=False, shard_blocks=shard_blocks))


def _encode(data, store, tiny_models, shard_blocks=None):
    from stages.encode_latents import EncodeLatentsConfig, run

    return run(EncodeLatentsConfig(data=str(data), store=str(store), model=str(tiny_models / "sd"),
                                   block_rows=BLOCK, batch_size=3, workers=0, flip=True, progress=False,
                                   shard_blocks=shard_blocks))


def _rows(n):
    return SyntheticDataset([(f"k{i:03d}", f"simple {i}", f"complex {i}") for i in range(n)])


def _compute(start, stop):
    r = np.arange(start, stop)
    return {"x": (r[:, None, None] * 0.5 + np.arange(15).reshape(3, 5)).astype("float32"),
            "n": r.astype("int32"), "tok": np.full((stop - start, 2), start, "float32")}


def _job(store, k, env=DistEnv(), compute=_compute, name="g"):
    return run_block_job(store=store, kind="llm", name=name, settings={"s": 1}, arrays=ARRAYS, provenance={},
                         overwrite=False, env=env, compute_block=compute, progress=False, shard_blocks=k)


def _objects(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "c").rglob("*") if p.is_file())


def test_sharded_group_same_values_k_times_fewer_objects(tmp_path):
    plain = FeatureStore.create_or_open(tmp_path / "a.zarr", _rows(38), block_rows=4)  # 10 blocks, last partial
    sharded = FeatureStore.create_or_open(tmp_path / "b.zarr", _rows(38), block_rows=4)
    _job(plain, 1)
    _job(sharded, 4)
    ga, gb = plain.group("llm/g"), sharded.group("llm/g")
    assert (ga.shard_blocks, gb.shard_blocks) == (1, 4) and gb.is_complete()
    for name in ("x", "n", "tok", "done"):
        np.testing.assert_array_equal(ga.group[name][:], gb.group[name][:]) if name != "done" else None
        na, nb = len(_objects(tmp_path / "a.zarr/llm/g" / name)), len(_objects(tmp_path / "b.zarr/llm/g" / name))
        assert (na, nb) == (10, 3), (name, na, nb)  # ceil(10 / 4) shard objects
    arr = zarr.open_array(str(tmp_path / "b.zarr/llm/g/x"), mode="r")
    assert arr.shards == (16, 3, 5) and arr.chunks == (4, 3, 5)  # a block is still one inner chunk
    assert gb.read("x", 9, 30).tolist() == ga.read("x", 9, 30).tolist()


def test_ranks_own_whole_shards():
    assert [owner(b, 4, 2) for b in range(12)] == [0] * 4 + [1] * 4 + [0] * 4
    assert [owner(b, 1, 2) for b in range(4)] == [0, 1, 0, 1]
    assert shard_runs([1, 2, 3, 4, 6, 7, 9], 4) == [[1, 2, 3], [4], [6, 7], [9]]
    assert default_shard_blocks("s3://b/x.zarr", None) == 4 and default_shard_blocks("/d/x.zarr", None) == 1
    assert default_shard_blocks("file:///d/x.zarr", None) == 1 and default_shard_blocks("s3://b/x", 2) == 2


def test_two_ranks_write_disjoint_shards_and_equal_one_process(tmp_path):
    one = FeatureStore.create_or_open(tmp_path / "one.zarr", _rows(40), block_rows=4)
    _job(one, 3)
    two = FeatureStore.create_or_open(tmp_path / "two.zarr", _rows(40), block_rows=4)
    two.require_group("llm", "g", {"s": 1}, ARRAYS, shard_blocks=3)
    seen = {}
    for rank in (0, 1):  # each rank writes only blocks of its own shards
        def compute(start, stop, rank=rank):
            seen.setdefault(rank, []).append(start // 4)
            return _compute(start, stop)
        _job(two, 3, DistEnv(rank=rank, world_size=2), compute)
    assert seen == {0: [0, 1, 2, 6, 7, 8], 1: [3, 4, 5, 9]}
    assert all(owner(b, 3, 2) == r for r, bs in seen.items() for b in bs)
    for name in ("x", "n", "tok"):
        np.testing.assert_array_equal(one.group("llm/g").read(name), two.group("llm/g").read(name))


def test_a_shard_is_written_in_one_piece_and_resume_keeps_finished_shards(tmp_path, monkeypatch):
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _rows(40), block_rows=4)
    sets = []
    real = zarr.Array.__setitem__

    def count(self, sel, value):
        if self.path.endswith("llm/g/x"):
            sets.append((sel.start, sel.stop))
        return real(self, sel, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", count)

    def dies_in_block_6(start, stop):
        if start == 24:
            raise RuntimeError("killed")
        return _compute(start, stop)

    with pytest.raises(RuntimeError):
        _job(st, 4, compute=dies_in_block_6)
    assert sets == [(0, 16)]  # shard 0 (blocks 0-3) uploaded once, not rewritten block by block
    g = FeatureStore(tmp_path / "s.zarr").group("llm/g")
    assert g.done_mask().tolist() == [True] * 4 + [False] * 6  # blocks 4, 5 computed but their shard unwritten
    shard0 = tmp_path / "s.zarr/llm/g/x/c/0/0/0"
    before = (shard0.stat().st_mtime_ns, shard0.read_bytes())
    sets.clear()
    _job(FeatureStore(tmp_path / "s.zarr", mode="a"), 4)
    assert sets == [(16, 32), (32, 40)] and (shard0.stat().st_mtime_ns, shard0.read_bytes()) == before
    ref = FeatureStore.create_or_open(tmp_path / "ref.zarr", _rows(40), block_rows=4)
    _job(ref, 1)
    np.testing.assert_array_equal(g.read("x"), ref.group("llm/g").read("x"))


def test_verify_checks_a_sharded_store(tmp_path):
    from surpipe.features import RULES
    from surpipe.store.verify import check_store as verify_store

    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _rows(20), block_rows=4)
    _job(st, 2)
    rep = verify_store(tmp_path / "s.zarr", RULES)
    assert rep.sound, rep.problems
    shard = tmp_path / "s.zarr/llm/g/x/c/1/0/0"  # blocks 2 and 3
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    rep = verify_store(tmp_path / "s.zarr", RULES)
    assert not rep.sound and any("checksum" in str(p) for p in rep.problems)
    shard.unlink()
    rep = verify_store(tmp_path / "s.zarr", RULES)
    assert not rep.sound and any("missing" in str(p) for p in rep.problems)
    with pytest.raises(SurpipeError, match="missing|chunk"):
        FeatureStore(tmp_path / "s.zarr").group("llm/g").read("x", 8, 12)


def test_stage_one_sharded_equals_unsharded_and_grows(make_surd, tiny_models, tmp_path):
    from surpipe.store.verify import check_store

    small = _surd(make_surd, 10, "small")
    for store, k in ((tmp_path / "plain.zarr", None), (tmp_path / "sharded.zarr", 2)):
        _extract(small, store, tiny_models, shard_blocks=k)
        _encode(small, store, tiny_models, shard_blocks=k)
    a, b = _values(tmp_path / "plain.zarr"), _values(tmp_path / "sharded.zarr")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    st = FeatureStore(tmp_path / "sharded.zarr")
    assert {st.group(p).shard_blocks for p in st.group_paths()} == {2}
    # grow 10 -> 22 rows: block 2 (rows 8-11) was partial in shard 1 (blocks 2-3)
    big = _surd(make_surd, 22, "big")
    _extract(big, tmp_path / "sharded.zarr", tiny_models)
    _encode(big, tmp_path / "sharded.zarr", tiny_models)
    _extract(big, tmp_path / "fresh.zarr", tiny_models)
    _encode(big, tmp_path / "fresh.zarr", tiny_models)
    a, b = _values(tmp_path / "fresh.zarr"), _values(tmp_path / "sharded.zarr")
    assert a.keys() == b.keys()
    for name, r in a.items():  # as in test_store_growth: new rows batch with other rows than from scratch
        if r.dtype.kind in "fc":
            np.testing.assert_allclose(b[name].astype(np.float32), r.astype(np.float32), rtol=2e-3, atol=1e-3,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(b[name], r, err_msg=name)
    assert check_store(tmp_path / "sharded.zarr").sound


def test_added_layers_keep_the_groups_shard_layout(make_surd, tiny_models, tmp_path):
    from stages.extract_llm import ExtractLLMConfig, run

    data = _surd(make_surd, 10, "d")
    store = tmp_path / "s.zarr"

    def extract(layers):
        run(ExtractLLMConfig(data=str(data), store=str(store), model=str(tiny_models / "llm"), layers=layers,
                             block_rows=BLOCK, batch_size=3, progress=False, shard_blocks=2))

    extract([1])
    extract([1, 3])  # layer 3 is computed in a side store and moved in: same shards
    st = FeatureStore(store)
    (path,) = st.group_paths("llm")
    g = st.group(path)
    assert g.is_complete() and g.shard_blocks == 2
    for name in ("layer_1/pooled", "layer_3/pooled"):
        assert zarr.open_array(str(store / path / name), mode="r").shards[0] == 2 * BLOCK, name
    assert check_store_sound(store)


def check_store_sound(store) -> bool:
    from surpipe.store.verify import check_store

    rep = check_store(store)
    return rep.sound or print(rep.problems)


def test_train_reads_a_sharded_s3_store_through_the_cache(s3_server, s3_bucket, tmp_path, monkeypatch):
    """A sharded group on object storage: training reads each shard object once (the cache keeps it
    whole and serves zarr's byte ranges of it), nothing in the second epoch, the stored values."""
    import s3fs

    from surpipe.train.groups import resolve_groups
    from surpipe.train.data import BlockReader, SampleStream
    from helpers.stores import make_sharded_store, make_store

    use_s3_env(s3_server, monkeypatch, tmp_path / "cache")
    url = f"{s3_bucket}/sharded.zarr"
    make_sharded_store(url, monkeypatch)  # 4 blocks: 2 shard objects per array
    make_store(tmp_path / "plain.zarr", n=32, block_rows=8)  # the same values, unsharded, local
    st = FeatureStore(url)
    assert {st.group(p).shard_blocks for p in st.group_paths()} == {2}

    gets: list[str] = []
    orig = s3fs.S3FileSystem._cat_file

    async def counting(self, path, *a, **kw):
        gets.append(path)
        return await orig(self, path, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counting)
    groups, problems = resolve_groups(st, llm_layer=-1, llm_group=None, clip_group=None, vae_group=None,
                                      use_flip=True)
    assert not problems
    reader = BlockReader(url, groups, st.block_rows)
    ref = BlockReader(str(tmp_path / "plain.zarr"), groups, st.block_rows)

    def data_gets():
        return [p for p in gets if "/c/" in p and "/done/" not in p and "/prompts/" not in p and "/keys/" not in p]

    def epoch():
        it = iter(SampleStream(reader, batch_size=4, seed=0))
        return [next(it) for _ in range(32 // 4)]

    gets.clear()
    first = epoch()
    assert len(data_gets()) == 2 * 7 and len(set(data_gets())) == 2 * 7  # 2 shards x 7 arrays, once each
    gets.clear()
    second = epoch()
    assert data_gets() == []
    for x, y in zip(first, second):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for b in range(4):
        for k, v in reader[b].items():
            np.testing.assert_array_equal(v, ref[b][k], err_msg=k)


def _flip(f: Path, at: int) -> None:
    data = bytearray(f.read_bytes())
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))


def test_a_block_missing_from_its_shard_index_is_never_read_as_zeros(tmp_path):
    """An inner chunk absent from an existing shard (what two writers in one shard leave) would read
    back as fill values: verify, reads and the training reader refuse it."""
    import struct

    import google_crc32c

    from surpipe.store.verify import check_store

    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _rows(32), block_rows=4)
    _job(st, 4)
    shard = tmp_path / "s.zarr/llm/g/x/c/1/0/0"  # blocks 4-7
    data = bytearray(shard.read_bytes())
    n = 16 * 4
    idx = bytearray(data[-(n + 4):-4])
    struct.pack_into("<QQ", idx, 16 * 1, 2**64 - 1, 2**64 - 1)  # block 5: no inner chunk
    data[-(n + 4):] = bytes(idx) + google_crc32c.value(bytes(idx)).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    assert zarr.open_array(str(tmp_path / "s.zarr/llm/g/x"), mode="r")[20:24].sum() == 0  # zarr alone: zeros
    rep = check_store(tmp_path / "s.zarr")
    assert [(p.block, "missing from its shard" in p.message) for p in rep.problems] == [(5, True)], rep.problems
    with pytest.raises(SurpipeError, match="missing"):
        FeatureStore(tmp_path / "s.zarr").group("llm/g").read("x", 20, 24)


def test_repair_of_a_damaged_shard_index_recomputes_its_blocks(tmp_path):
    from surpipe.store.verify import check_store, verify_store

    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _rows(32), block_rows=4)
    _job(st, 4)
    _flip(tmp_path / "s.zarr/llm/g/x/c/1/0/0", -10)  # inside the index of shard 1 (blocks 4-7)
    with pytest.raises(SurpipeError, match="damaged|verify"):  # writing into it: one clear message
        FeatureStore(tmp_path / "s.zarr", mode="a").group("llm/g").write_block(5, _compute(20, 24))
    rep = verify_store(tmp_path / "s.zarr", repair=True)
    assert rep.sound and sorted({p.block for p in rep.repaired}) >= [4]
    g = FeatureStore(tmp_path / "s.zarr").group("llm/g")
    assert g.done_mask().tolist() == [True] * 4 + [False] * 4
    _job(FeatureStore(tmp_path / "s.zarr", mode="a"), 4)  # the rerun writes a fresh shard
    ref = FeatureStore.create_or_open(tmp_path / "ref.zarr", _rows(32), block_rows=4)
    _job(ref, 1)
    for name in ("x", "n", "tok"):
        np.testing.assert_array_equal(FeatureStore(tmp_path / "s.zarr").group("llm/g").read(name),
                                      ref.group("llm/g").read(name))
    assert check_store(tmp_path / "s.zarr").sound


def test_repair_waits_for_no_writer(tmp_path):
    """verify --repair takes the group's lock exclusively: with a writer at work it refuses, so the
    writer cannot undo its marks (a shard's done flags are one object)."""
    from surpipe.store.locks import writer_lock
    from surpipe.store.verify import verify_store

    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _rows(16), block_rows=4)
    _job(st, 2)
    _flip(tmp_path / "s.zarr/llm/g/x/c/0/0/0", 30)
    with writer_lock(st.path, "llm/g", 0):
        with pytest.raises(SurpipeError, match="being written"):
            verify_store(tmp_path / "s.zarr", repair=True)
    assert verify_store(tmp_path / "s.zarr", repair=True).sound


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_job_with_another_number_of_ranks_is_refused(where, tmp_path, request, monkeypatch):
    """Rank locks are per rank: job B's rank 1 would not meet job A's rank 0, and with another world
    size their ranks own other shards, so two writers would share shard objects. Each rank's record
    names its job's world size; a rank refuses when a live one names another."""
    from surpipe.store.locks import writer_lock

    if where == "s3":
        server = request.getfixturevalue("s3_server")
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("SURPIPE_STORAGE_OPTIONS", "")
        store = FeatureStore.create_or_open(f"{request.getfixturevalue('s3_bucket')}/s.zarr", _rows(8), block_rows=4)
    else:
        store = FeatureStore.create_or_open(tmp_path / "s.zarr", _rows(8), block_rows=4)
    with writer_lock(store.path, "llm/g", 0, world_size=1):  # job A: one process writes every shard
        with pytest.raises(SurpipeError, match="another number of ranks") as e:
            with writer_lock(store.path, "llm/g", 1, world_size=2):  # job B's rank 1
                pass
        assert "rank 0 of 1" in str(e.value)
        with writer_lock(store.path, "llm/other", 1, world_size=2):  # another group: no conflict
            pass
    with writer_lock(store.path, "llm/g", 1, world_size=2):  # A finished: B may start
        pass


def test_inspect_shows_the_shard_layout(tmp_path):
    from helpers import run_cli

    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _rows(16), block_rows=4)
    _job(st, 2)
    rc, out, err = run_cli("inspect", tmp_path / "s.zarr", "--full")
    assert rc == 0, err
    assert "llm/g: 4/4 blocks done (complete), 2 blocks per stored object" in out
    rc, out, err = run_cli("inspect", tmp_path / "s.zarr", "--json")
    import json

    assert [g["shard_blocks"] for g in json.loads(out)["groups"]] == [2]


def test_a_damaged_cached_shard_is_fetched_again_not_blamed_on_the_store(s3_server, s3_bucket, tiny_models,
                                                                          tmp_path, monkeypatch):
    """A cached shard object that fails its checks (cut in half by a crash, overwritten with garbage
    of the same length) is the cache's damage: train drops it and fetches it again (it used to stop
    with "checksum mismatch ... verify --repair" on every rerun, while verify said the store was
    fine). Only an object that fails its checks as freshly fetched is the store's damage."""
    import os

    from helpers import run_cli_err
    from surpipe.train.groups import resolve_groups
    from surpipe.train.data import BlockReader
    from helpers.stores import make_sharded_store, make_store

    def damaged(data: bytes, how: str) -> bytes:
        return data[:len(data) // 2] if how == "cut in half" else os.urandom(len(data))

    use_s3_env(s3_server, monkeypatch)
    url = f"{s3_bucket}/sharded.zarr"
    make_sharded_store(url, monkeypatch)  # 4 blocks: 2 shard objects per array
    cache = tmp_path / "cache"

    def train(out):
        return run_cli_err("train", "--store", url, "--model", tiny_models / "sd", "--llm-layer", "-1",
                           "--out", tmp_path / out, "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
                           "--no-progress", "--device", "cpu", "--cache-dir", cache)

    def shards():
        return {p: p.read_bytes() for p in cache.rglob("*") if p.is_file() and "/c/" in p.as_posix()}

    rc, err = train("run0")
    assert rc == 0, err
    whole = shards()
    assert whole
    for how in ("cut in half", "random bytes"):
        for p, data in whole.items():
            p.write_bytes(damaged(data, how))
        rc, err = train(f"run-{how}")
        assert rc == 0, (how, err)  # was: exit 1, "checksum mismatch (crc32c) ... run surpipe verify --repair"
        assert {p: d for p, d in shards().items() if p in whole} == whole, how  # fetched again, whole

    # damage in the store itself (the fresh fetch fails too) is still the store's
    monkeypatch.setenv("SURPIPE_STORE_CACHE_DIR", str(tmp_path / "cache2"))
    monkeypatch.setenv("SURPIPE_STORE_CACHE_GB", "1")
    st = FeatureStore(url)
    groups, problems = resolve_groups(st, llm_layer=-1, llm_group=None, clip_group=None, vae_group=None,
                                      use_flip=True)
    assert not problems
    fs = s3_server.fs()
    for how in ("cut in half", "random bytes"):
        for b, obj in ((0, "mean/c/0/0/0/0"), (2, "std/c/1/0/0/0")):
            key = f"{url[len('s3://'):]}/{groups.vae_group}/{obj}"
            data = fs.cat_file(key)
            fs.pipe_file(key, damaged(data, how))
            with pytest.raises(SurpipeError, match=f"{obj.split('/')[0]} block {b} .*verify --repair"):
                BlockReader(url, groups, st.block_rows)[b]
            fs.pipe_file(key, data)
