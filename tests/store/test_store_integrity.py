"""Store integrity (issue 12, points 1, 3, 4, 9, 12): attacks on a real store's files.

Every chunk carries a crc32c checksum (format 2); a done block must find every chunk; blocks of
another generation of a group (after --overwrite) are refused; stored NaN/Inf and edited array
metadata are caught as data is read for training; damaged metadata gives one message, no traceback.
"""

from __future__ import annotations

import errno
import json
import threading

import numpy as np
import pytest
import zarr

from helpers import run_cli as _run
from helpers.stores import _DS, make_store

from surpipe.errors import SurpipeError
from surpipe.features import open_group
from surpipe.store import ArraySpec, FeatureStore
from surpipe.train.groups import StoreGroups
from surpipe.train.data import BlockReader, SampleStream

GROUPS = StoreGroups("llm/tiny", 3, "clip/sd", "vae/sd-16", True)


def _chunk(store, array, block):
    arr = zarr.open_array(str(store / array), mode="r")
    return store / array / arr.metadata.chunk_key_encoding.encode_chunk_key((block, *([0] * (arr.ndim - 1))))


def _flip(path, at=0):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- checksums (point 12)


def test_every_chunk_ends_with_its_crc32c(store):
    import google_crc32c

    for array in ("keys", "prompts/simple", "llm/tiny/layer_3/pooled", "clip/sd/simple", "vae/sd-16/std",
                  "llm/tiny/done"):
        meta = json.loads((store / array / "zarr.json").read_text())
        assert meta["codecs"][-1]["name"] == "crc32c", array  # last in the chain: covers the stored bytes
        raw = _chunk(store, array, 0).read_bytes()
        assert int.from_bytes(raw[-4:], "little") == google_crc32c.value(raw[:-4]), array
    assert zarr.open_group(str(store), mode="r").attrs["surpipe_format"] == 2


def test_flipped_byte_that_still_decodes_is_caught_on_read_by_verify_and_repaired(tmp_path):
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _DS(12), block_rows=4)
    g = st.require_group("llm", "raw", {"layers": [0]}, {"layer_0/pooled": ArraySpec((4,), "float32", "none")})
    for b in range(3):
        g.write_block(b, {"layer_0/pooled": np.full((4, 4), float(b + 1))})
    chunk = _chunk(tmp_path / "s.zarr", "llm/raw/layer_0/pooled", 1)
    _flip(chunk, 0)  # codec "none": the flipped value (2.0000002) is finite and plausible
    raw = np.frombuffer(chunk.read_bytes()[:-4], dtype="<f4")
    assert np.isfinite(raw).all() and raw[0] != 2.0  # without the checksum this would be read silently

    with pytest.raises(SurpipeError, match=r"llm/raw/layer_0/pooled block 1 \(rows 4-7\): checksum mismatch \(crc32c\)"):
        FeatureStore(tmp_path / "s.zarr").group("llm/raw").read("layer_0/pooled", 4, 8)
    rc, out, err = _run("verify", tmp_path / "s.zarr")
    assert rc == 1 and "Traceback" not in err
    assert "llm/raw/layer_0/pooled [block 1, rows 4-7, chunk llm/raw/layer_0/pooled/c/1/0]" in err
    assert "checksum mismatch (crc32c)" in err
    rc, out, err = _run("verify", tmp_path / "s.zarr", "--repair")
    assert rc == 0, err
    assert FeatureStore(tmp_path / "s.zarr").group("llm/raw").pending_blocks() == [1]


def test_training_reader_names_store_array_and_block_of_a_bad_checksum(store):
    _flip(_chunk(store, "clip/sd/complex", 2), 7)
    reader = BlockReader(str(store), GROUPS, 8)
    reader[0]  # other blocks read fine
    with pytest.raises(SurpipeError) as e:
        reader[2]
    msg = str(e.value)
    assert f"store {store}: clip/sd/complex block 2 (rows 16-23)" in msg and "checksum mismatch" in msg
    assert "surpipe verify --repair" in msg
    # through loader worker processes: the same message, without a worker traceback in it
    with pytest.raises(SurpipeError) as e:
        for _ in SampleStream(BlockReader(str(store), GROUPS, 8), 4, seed=0, workers=1):
            pass
    assert "clip/sd/complex block 2" in str(e.value) and "Traceback" not in str(e.value)


def test_format_1_store_opens_and_is_reported_unchecked(store):
    """A store written before checksums and generations: still read, but said to be unchecked."""
    root = zarr.open_group(str(store), mode="r+")
    root.attrs["surpipe_format"] = 1
    for gpath in ("llm/tiny", "clip/sd", "vae/sd-16"):
        g = root[gpath]
        attrs = dict(g.attrs)
        for name in attrs["arrays"]:  # rewrite each array without the crc32c codec, as format 1 did
            data = g[name][:]
            meta = g[name].metadata
            del g[name]
            a = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=meta.chunks,
                               compressors=(zarr.codecs.ZstdCodec(level=3),), fill_value=0)
            a.with_config({"write_empty_chunks": True})[:] = data
        del g["done"]
        g.create_array("done", shape=(3,), dtype=bool, chunks=(1,), fill_value=False)[:] = True
        del g.attrs["generation"]
        del g.attrs["array_specs"]
    st = FeatureStore(store)
    assert not st.checked and st.group("llm/tiny").is_complete()
    assert BlockReader(str(store), GROUPS, 8)[1]["llm"].shape == (8, 16)
    rc, out, err = _run("verify", store)
    assert rc == 0, err
    assert "store format 1" in out and "UNCHECKED" in out
    rc, out, err = _run("inspect", store)
    assert rc == 0 and "checksums: UNCHECKED" in out
    make_store(store.parent / "new.zarr")
    rc, out, err = _run("inspect", store.parent / "new.zarr")
    assert rc == 0 and "checksums: crc32c" in out


# --------------------------------------------------------------------------- deleted chunks (point 3)


@pytest.mark.parametrize("array", ["clip/sd/simple", "llm/tiny/layer_3/pooled", "vae/sd-16/flip_std"])
def test_deleted_chunk_of_a_done_block_stops_the_reader(store, array):
    _chunk(store, array, 1).unlink()
    reader = BlockReader(str(store), GROUPS, 8)
    with pytest.raises(SurpipeError) as e:
        reader[1]
    msg = str(e.value)
    assert f"store {store}: {array} block 1 (rows 8-15) is marked done but its chunk file" in msg
    assert "would read back as zeros" in msg and "surpipe verify --repair" in msg
    group, name = "/".join(array.split("/")[:2]), "/".join(array.split("/")[2:])
    with pytest.raises(SurpipeError, match="is marked done but its chunk file"):
        FeatureStore(store).group(group).read(name)
    assert np.asarray(zarr.open_array(str(store / array))[8:16]).max() == 0  # what plain zarr would hand over


def test_deleted_chunk_stops_train_with_a_message(store, tiny_models, tmp_path):
    from helpers.stores import _args

    _chunk(store, "vae/sd-16/mean", 0).unlink()
    _chunk(store, "vae/sd-16/mean", 1).unlink()
    _chunk(store, "vae/sd-16/mean", 2).unlink()
    rc, out, err = _run(*_args(store, tiny_models / "sd", tmp_path / "run", "--max-steps", "2")[0:])
    assert rc == 1 and "Traceback" not in err
    assert "vae/sd-16/mean block" in err and "chunk file" in err and "missing" in err


# --------------------------------------------------------------------------- generations (point 4)


def _llm(st, overwrite=False, model="m"):
    return st.require_group("llm", "g", {"model": model}, {"layer_0/pooled": ArraySpec((4,))}, overwrite=overwrite)


def test_overwrite_is_refused_while_another_job_writes_the_group(tmp_path):
    from surpipe.store.locks import writer_lock

    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _DS(8), block_rows=4)
    g = _llm(st)
    g.write_block(0, {"layer_0/pooled": np.ones((4, 4))})
    with writer_lock(st.path, "llm/g", 0):  # as a running extract-llm holds it
        with pytest.raises(SurpipeError, match="being written by pid .*cannot be replaced"):
            _llm(FeatureStore(tmp_path / "s.zarr", mode="a"), overwrite=True, model="other")
    assert FeatureStore(tmp_path / "s.zarr").group("llm/g").completed_blocks() == 1  # nothing deleted
    _llm(FeatureStore(tmp_path / "s.zarr", mode="a"), overwrite=True, model="other")  # writer gone: allowed


def test_writer_of_a_replaced_group_never_marks_a_block_of_the_new_one(tmp_path):
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _DS(8), block_rows=4)
    old = _llm(st)
    old.write_block(0, {"layer_0/pooled": np.ones((4, 4))})
    new = _llm(FeatureStore(tmp_path / "s.zarr", mode="a"), overwrite=True, model="other")
    assert new.generation != old.generation
    with pytest.raises(SurpipeError, match="was replaced or deleted by another job"):
        old.write_block(1, {"layer_0/pooled": np.full((4, 4), 7.0)})
    assert FeatureStore(tmp_path / "s.zarr").group("llm/g").completed_blocks() == 0


def test_block_done_under_another_generation_is_refused_by_reader_and_verify(store):
    old_gen = FeatureStore(store).group("clip/sd").gen_id
    st = FeatureStore(store, mode="a")
    spec = {"simple": ArraySpec((77, 32)), "complex": ArraySpec((77, 32)),
            "simple_len": ArraySpec((), "int32"), "complex_len": ArraySpec((), "int32")}
    new = st.require_group("clip", "sd", {"m": 2}, spec, overwrite=True)
    for b in range(3):
        s, e = st.block_range(b)
        new.write_block(b, {"simple": np.ones((e - s, 77, 32)), "complex": np.ones((e - s, 77, 32)),
                            "simple_len": np.ones(e - s), "complex_len": np.ones(e - s)})
    # the old job (opened before --overwrite, with no lock) records its block in the new group
    zarr.open_array(str(store / "clip/sd/done"), mode="r+")[1] = old_gen
    g = FeatureStore(store).group("clip/sd")
    assert g.pending_blocks() == [1] and g.foreign_blocks() == [1]
    with pytest.raises(SurpipeError, match="clip/sd block 1 .*another generation"):
        BlockReader(str(store), GROUPS, 8)[1]
    rc, out, err = _run("verify", store)
    assert rc == 1 and "clip/sd/done [block 1, rows 8-15]: block completed by another generation" in err
    assert _run("verify", store, "--repair")[0] == 0
    assert FeatureStore(store).group("clip/sd").done_record().tolist()[1] == 0


def test_two_jobs_creating_the_same_group_at_once_share_one(tmp_path):
    FeatureStore.create_or_open(tmp_path / "s.zarr", _DS(8), block_rows=4)
    errors, gens = [], {}
    for i in range(12):
        bar = threading.Barrier(3)

        def job(j, i=i, bar=bar):
            st = FeatureStore(tmp_path / "s.zarr", mode="a")
            bar.wait()
            try:
                g = st.require_group("llm", f"race{i}", {"model": "m"},
                                     {f"layer_{k}/pooled": ArraySpec((4,)) for k in range(6)})
                gens.setdefault(i, set()).add(g.generation)
            except Exception as e:  # noqa: BLE001 - any failure is the bug
                errors.append(repr(e))

        ts = [threading.Thread(target=job, args=(j,)) for j in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert errors == []
    assert all(len(v) == 1 for v in gens.values()) and len(gens) == 12  # everyone opened the winner's group
    assert _run("verify", tmp_path / "s.zarr")[0] == 0


# --------------------------------------------------------------------------- data finiteness, dtypes (point 1)


@pytest.mark.parametrize("array, key", [("llm/tiny/layer_3/pooled", "llm"), ("clip/sd/simple", "clip_simple"),
                                        ("vae/sd-16/std", "lat_std"), ("vae/sd-16/flip_mean", "lat_flip_mean")])
def test_non_finite_stored_values_stop_the_reader_naming_rows_and_keys(store, array, key):
    raw = zarr.open_array(str(store / array), mode="r+")
    x = raw[8:16]
    x[2] = np.nan
    x[5].flat[0] = np.inf
    raw[8:16] = x  # plain zarr: bypasses surpipe's write check
    reader = BlockReader(str(store), GROUPS, 8)
    assert np.isfinite(reader[0][key]).all()
    with pytest.raises(SurpipeError) as e:
        reader[1]
    msg = str(e.value)
    assert f"{array} holds NaN or Inf in 2 rows of block 1: rows [10, 13] (keys ['r010', 'r013'])" in msg


@pytest.mark.parametrize("new_type", ["int16", "float32", "uint16"])
def test_edited_data_type_is_refused_not_misread(store, new_type):
    p = store / "clip/sd/simple/zarr.json"
    meta = json.loads(p.read_text())
    meta["data_type"] = new_type
    p.write_text(json.dumps(meta))
    with pytest.raises(SurpipeError, match=f"simple: data_type {new_type}, but it was created as float16"):
        BlockReader(str(store), GROUPS, 8)
    rc, out, err = _run("verify", store)
    assert rc == 1 and "Traceback" not in err
    assert f"clip/sd/simple: data_type {new_type}, but it was created as float16" in err


def test_dtype_other_than_the_settings_say_is_refused_for_training(tmp_path):
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _DS(4), block_rows=4)
    st.require_group("llm", "x", {"layers": [0], "store_dtype": "float32"}, {"layer_0/pooled": ArraySpec((4,), "float16")})
    with pytest.raises(SurpipeError, match="layer_0/pooled: dtype float16, but the settings say float32"):
        open_group(FeatureStore(tmp_path / "s.zarr"), "llm/x")  # how every reader opens a group
    FeatureStore(tmp_path / "s.zarr").group("llm/x")  # the store alone knows no kind's contract


# --------------------------------------------------------------------------- damaged metadata (point 9)


def _garbage_json(store, node):
    (store / node / "zarr.json").write_text("{ this is not json")


def _edit_shape(store, node):
    p = store / node / "zarr.json"
    meta = json.loads(p.read_text())
    meta["shape"][0] += 5
    p.write_text(json.dumps(meta))


def _delete_array(store, node):
    import shutil

    shutil.rmtree(store / node)


def _bad_scaling(store, node):
    g = zarr.open_group(str(store / node), mode="r+")
    g.attrs["settings"] = {**g.attrs["settings"], "scaling_factor": "zero point one eight"}


@pytest.mark.parametrize("damage, node", [
    (_garbage_json, "clip/sd"), (_garbage_json, "llm/tiny/layer_3/pooled"), (_garbage_json, "vae"),
    (_edit_shape, "vae/sd-16/mean"), (_delete_array, "clip/sd/complex"), (_bad_scaling, "vae/sd-16"),
    (_garbage_json, "vae/sd-16/done"),
])
def test_damaged_metadata_gives_one_message_in_verify_inspect_and_train(store, tiny_models, tmp_path, damage, node):
    from helpers.stores import _args

    damage(store, node)
    for args in (("verify", store), ("inspect", store),
                 _args(store, tiny_models / "sd", tmp_path / "run", "--max-steps", "1")):
        rc, out, err = _run(*args)
        assert rc == 1, (args[0], out, err)
        assert "Traceback" not in err and "surpipe: error" in err, (args[0], err)
    if node != "vae":  # (the kind folder's metadata is not on the reader's path to the data)
        with pytest.raises(SurpipeError):
            BlockReader(str(store), GROUPS, 8)


def test_garbage_root_metadata(store):
    (store / "zarr.json").write_text("[1, 2]")
    for cmd in ("verify", "inspect"):
        rc, out, err = _run(cmd, store)
        assert rc == 1 and "Traceback" not in err and "surpipe: error" in err


def test_full_disk_at_store_and_group_creation(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _DS(8), block_rows=4)
    real = LocalStore.set

    async def full(self, key, value):
        if "llm/" in key or "fresh" in str(self.root):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / key))
        return await real(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full)
    with pytest.raises(SurpipeError, match="cannot create group llm/g in store .*no space left on device"):
        _llm(st)
    with pytest.raises(SurpipeError, match="cannot create feature store .*fresh.zarr: no space left on device"):
        FeatureStore.create_or_open(tmp_path / "fresh.zarr", _DS(8), block_rows=4)
    assert not (tmp_path / "fresh.zarr").exists() and not list(tmp_path.glob(".fresh.zarr.tmp-*"))
    monkeypatch.setattr(LocalStore, "set", real)
    g = _llm(FeatureStore(tmp_path / "s.zarr", mode="a"))  # space again: the half-made group is replaced
    g.write_block(0, {"layer_0/pooled": np.ones((4, 4))})
    assert g.completed_blocks() == 1


def test_zero_length_vectors_do_not_break_verify(tmp_path):
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", _DS(8), block_rows=4)
    g = st.require_group("llm", "empty", {"layers": [0], "hidden_size": 0},
                         {"layer_0/pooled": ArraySpec((0,), "float16")})
    for b in range(2):
        g.write_block(b, {"layer_0/pooled": np.zeros((4, 0))})
    rc, out, err = _run("verify", tmp_path / "s.zarr")
    assert "Traceback" not in err and "ZeroDivisionError" not in err
    assert rc == 0, err
