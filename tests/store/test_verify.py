"""surpipe verify: a sound store passes; every kind of damage is found and named (array, block,
rows, chunk); --repair marks exactly the damaged done blocks incomplete, so a rerun redoes them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

from helpers import run_cli as _run
from helpers.stores import make_store

from surpipe.store import FeatureStore


def _chunk(store, array, block):
    arr = zarr.open_array(str(store / array), mode="r")
    key = arr.metadata.chunk_key_encoding.encode_chunk_key((block, *([0] * (arr.ndim - 1))))
    return store / array / key


def test_sound_store_passes_and_incomplete_blocks_are_warnings(tmp_path, store):
    rc, out, err = _run("verify", store)
    assert rc == 0, err
    assert "OK: no problems" in out and "llm/tiny: 3/3 blocks done (complete)" in out
    make_store(tmp_path / "inc.zarr", complete=False)
    rc, out, err = _run("verify", tmp_path / "inc.zarr")
    assert rc == 0, err
    assert "warning: vae/sd-16: 1 of 3 blocks incomplete: 2 (rows 16-23)" in out
    assert "rerun `surpipe encode-latents`" in out
    rc, out, err = _run("verify", store, "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["sound"] and rep["problems"] == [] and rep["groups"]["clip/sd"]["blocks_done"] == 3


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garbage(p):
    p.write_bytes(os.urandom(p.stat().st_size))


def _delete(p):
    p.unlink()


@pytest.mark.parametrize("damage, phrase", [(_truncate, "cannot be decoded"), (_garbage, "cannot be decoded"),
                                            (_delete, "chunk file missing although done[1] is true")])
@pytest.mark.parametrize("array", ["clip/sd/simple", "llm/tiny/layer_3/pooled", "vae/sd-16/flip_std"])
def test_damaged_chunk_found_named_and_repaired(store, damage, phrase, array):
    group = "/".join(array.split("/")[:2])
    damage(_chunk(store, array, 1))
    rc, out, err = _run("verify", store)
    assert rc == 1 and "Traceback" not in err
    assert f"{array} [block 1, rows 8-15, chunk {array}/c/1/" in err and phrase in err
    assert "has 1 problem(s)" in err and "--repair" in err

    rc, out, err = _run("verify", store, "--repair")
    assert rc == 0, err
    assert "repaired (block marked incomplete)" in out and array in out
    rc, out, err = _run("verify", store, "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["sound"]
    assert [w["where"] for w in rep["warnings"]] == [group]  # only the incomplete block is left
    assert rep["groups"][group]["incomplete_blocks"] == [1]
    g = FeatureStore(store).group(group)
    assert g.pending_blocks() == [1]
    # the stage's rerun (here: writing the pending block again) makes the store whole
    st = FeatureStore(store, mode="a")
    g = st.group(group)
    for b in g.pending_blocks():
        s, e = st.block_range(b)
        g.write_block(b, {name: np.ones((e - s, *g.array(name).shape[1:])) for name in g.array_names})
    rc, out, _ = _run("verify", store)
    assert rc == 0 and "OK: no problems" in out and "warning" not in out


def test_all_zero_block_is_not_mistaken_for_a_deleted_chunk(tmp_path):
    st = make_store(tmp_path / "s.zarr")
    g = st.group("llm/tiny")
    g.write_block(0, {name: np.zeros((8, 16)) for name in g.array_names})  # zeros: chunk file still written
    assert _chunk(tmp_path / "s.zarr", "llm/tiny/layer_1/pooled", 0).is_file()
    assert _run("verify", tmp_path / "s.zarr")[0] == 0


def test_nan_in_a_done_block_and_damaged_done_record(store):
    raw = zarr.open_array(str(store / "llm/tiny/layer_1/pooled"), mode="r+")
    x = raw[8:16]
    x[3, 2] = np.nan
    x[5, 0] = np.inf
    raw[8:16] = x  # plain zarr, bypassing surpipe's finite check
    _garbage(store / "clip/sd/done/c/2")
    rc, out, err = _run("verify", store)
    assert rc == 1
    assert "llm/tiny/layer_1/pooled [block 1, rows 8-15]: 2 rows hold NaN or Inf (rows [11, 13])" in err
    assert "clip/sd/done [block 2, chunk clip/sd/done/c/2]: chunk cannot be decoded" in err
    assert _run("verify", store, "--repair")[0] == 0
    assert FeatureStore(store).group("llm/tiny").pending_blocks() == [1]
    assert FeatureStore(store).group("clip/sd").pending_blocks() == [2]


def test_alignment_provenance_and_root_problems(store):
    root = zarr.open_group(str(store), mode="r+")
    g = root["clip/sd"]
    s = dict(g.attrs["settings"])
    s["m"] = 2
    g.attrs["settings"] = s  # edited settings: the hash no longer matches
    g.create_array("stray", shape=(24,), dtype="float32", chunks=(8,))
    vae = root["vae/sd-16"]
    vae.attrs["arrays"] = [*vae.attrs["arrays"], "gone"]
    del vae.attrs["kind"]
    llm = root["llm/tiny"]
    a = llm["layer_1/pooled"]
    data = a[:]
    del llm["layer_1/pooled"]
    b = llm.create_array("layer_1/pooled", shape=(25, 16), dtype="float16", chunks=(8, 16))
    b[:24] = data
    rc, out, err = _run("verify", store)
    assert rc == 1 and "Traceback" not in err
    assert "clip/sd: attribute settings_hash" in err and "settings were edited" in err
    assert "clip/sd/stray: array present but not listed" in err
    assert "vae/sd-16/gone: array listed in the group's attribute arrays is missing" in err
    assert "vae/sd-16: attribute kind is None, expected 'vae'" in err
    assert "llm/tiny/layer_1/pooled: 25 rows, expected 24 (= len(keys)): not row-aligned" in err
    # none of these is a block problem: --repair leaves them (exit 1 still)
    assert _run("verify", store, "--repair")[0] == 1

    del root.attrs["dataset_fingerprint"]
    root.attrs["num_samples"] = 23
    rc, out, err = _run("verify", store)
    assert rc == 1
    assert "root: attribute dataset_fingerprint missing" in err
    assert "keys: shape (24,), expected (23,): rows are not aligned" in err
    assert "prompts/simple: shape (24,), expected (23,)" in err


def test_keys_duplicates_and_store_dtype_mismatch(tmp_path):
    from helpers.stores import _DS

    from surpipe.store import ArraySpec

    ds = _DS(6)
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", ds, block_rows=4)
    g = st.require_group("llm", "x", {"layers": [2], "hidden_size": 4, "store_dtype": "float32"},
                         {"layer_2/pooled": ArraySpec((4,), "float16"), "layer_5/pooled": ArraySpec((3,), "float32")})
    for b in range(st.num_blocks):
        s, e = st.block_range(b)
        g.write_block(b, {"layer_2/pooled": np.ones((e - s, 4)), "layer_5/pooled": np.ones((e - s, 3))})
    keys = zarr.open_array(str(tmp_path / "s.zarr/keys"), mode="r+")
    k = keys[:]
    k[4] = k[1]
    keys[:] = k
    rc, out, err = _run("verify", tmp_path / "s.zarr")
    assert rc == 1
    assert "keys: 1 duplicate sample keys, e.g. 'r001' at rows 1 and 4" in err
    assert "llm/x/layer_2/pooled: dtype float16, but the settings say float32" in err
    assert "llm/x/layer_5/pooled: row shape (3,), but the settings say (4,)" in err
    assert "layer 5 is not in the settings" in err


def test_missing_and_non_store_paths(tmp_path):
    rc, out, err = _run("verify", tmp_path / "nope.zarr")
    assert rc == 1 and "feature store not found" in err and "Traceback" not in err
    (tmp_path / "plain").mkdir()
    rc, out, err = _run("verify", tmp_path / "plain")
    assert rc == 1 and "not a Zarr v3 store" in err
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    rc, out, err = _run("verify", tmp_path / "other.zarr")
    assert rc == 1 and "surpipe_format missing" in err
