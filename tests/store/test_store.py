"""Feature store: creation, alignment, block writes and completion, refusal of mismatches,
and the on-disk layout read back with plain zarr as docs/store-format.md describes it."""

import os
import stat

import numpy as np
import pytest
import zarr

from helpers import FakeDataset, SyntheticDataset
from surpipe.errors import SurpipeError
from surpipe.store import ArraySpec, FeatureStore, to_storage


def _group(store, **kw):
    return store.require_group(
        "llm", "tiny", settings={"model": "m", "layers": [1, 3]},
        arrays={"layer_1/pooled": ArraySpec((8,)), "layer_3/pooled": ArraySpec((8,), dtype="float32")}, **kw)


def test_create_keys_prompts_and_plain_zarr_layout(tmp_path):
    ds = FakeDataset(10)
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", ds, block_rows=4)
    assert st.num_samples == 10 and st.num_blocks == 3
    assert st.block_range(2) == (8, 10)
    g = _group(st, provenance={"model": "m"})
    rng = np.random.default_rng(0)
    full1 = rng.normal(size=(10, 8)).astype(np.float32)
    full3 = rng.normal(size=(10, 8)).astype(np.float32)
    for b in (2, 0, 1):
        s, e = st.block_range(b)
        g.write_block(b, {"layer_1/pooled": full1[s:e], "layer_3/pooled": full3[s:e]})
    assert g.is_complete()

    # plain zarr, following docs/store-format.md, no surpipe involved
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert root.attrs["surpipe_format"] == 2 and root.attrs["num_samples"] == 10
    assert root.attrs["dataset_fingerprint"] == ds.fingerprint()
    assert list(root["keys"][:]) == [s.key for s in ds.samples]
    assert list(root["prompts/simple"][:]) == [s.simple for s in ds.samples]
    assert list(root["prompts/complex"][:]) == [s.complex for s in ds.samples]
    grp = root["llm/tiny"]
    assert grp.attrs["settings"] == {"model": "m", "layers": [1, 3]}
    assert grp.attrs["arrays"] == ["layer_1/pooled", "layer_3/pooled"]
    assert grp["layer_1/pooled"].dtype == np.float16 and grp["layer_1/pooled"].chunks == (4, 8)
    np.testing.assert_array_equal(grp["layer_1/pooled"][:], full1.astype(np.float16))
    np.testing.assert_array_equal(grp["layer_3/pooled"][:], full3)
    # format 2: done[b] is the generation id that completed block b (docs/store-format.md)
    assert grp["done"][:].tolist() == [g.gen_id] * 3 and grp["done"].chunks == (1,)
    assert g.gen_id == int(grp.attrs["generation"][:15], 16) + 1
    assert "torch" in grp.attrs["provenance"]["library_versions"] or "zarr" in grp.attrs["provenance"]["library_versions"]


def test_reopen_same_dataset_and_refuse_other_dataset(tmp_path):
    p = tmp_path / "s.zarr"
    FeatureStore.create_or_open(p, FakeDataset(6), block_rows=4)
    st = FeatureStore.create_or_open(p, FakeDataset(6), block_rows=99)  # existing block_rows wins
    assert st.block_rows == 4
    with pytest.raises(SurpipeError, match="different dataset"):
        FeatureStore.create_or_open(p, FakeDataset(6, tag="x"))
    with pytest.raises(SurpipeError, match="different dataset"):
        FeatureStore.create_or_open(p, FakeDataset(7))


def test_pending_blocks_partition_and_resume(tmp_path):
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", FakeDataset(20), block_rows=3)
    g = _group(st)
    assert g.pending_blocks() == list(range(7))
    r0, r1 = g.pending_blocks(0, 2), g.pending_blocks(1, 2)
    assert sorted(r0 + r1) == list(range(7)) and not set(r0) & set(r1)
    s, e = st.block_range(3)
    g.write_block(3, {"layer_1/pooled": np.ones((e - s, 8)), "layer_3/pooled": np.ones((e - s, 8))})
    assert 3 not in g.pending_blocks() and g.completed_blocks() == 1
    # a reopened store sees the same completion
    g2 = FeatureStore(tmp_path / "s.zarr").group("llm/tiny")
    assert g2.done_mask().tolist() == [False, False, False, True, False, False, False]
    with pytest.raises(SurpipeError, match="incomplete"):
        g2.require_complete()


def test_settings_mismatch_refused_listing_differences_and_overwrite(tmp_path):
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", FakeDataset(5), block_rows=5)
    g = _group(st)
    g.write_block(0, {"layer_1/pooled": np.ones((5, 8)), "layer_3/pooled": np.ones((5, 8))})
    assert _group(st).is_complete()  # same settings: reopened, not reset
    with pytest.raises(SurpipeError) as ei:
        st.require_group("llm", "tiny", settings={"model": "other", "layers": [1, 3]},
                         arrays={"layer_1/pooled": ArraySpec((8,))})
    assert "model: stored 'm', requested 'other'" in str(ei.value) and "--overwrite" in str(ei.value)
    g3 = st.require_group("llm", "tiny", settings={"model": "other"}, arrays={"x": ArraySpec((2,))}, overwrite=True)
    assert g3.completed_blocks() == 0 and g3.array_names == ["x"]


def test_write_block_refuses_float16_overflow_and_nan(tmp_path):
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", FakeDataset(4), block_rows=4)
    g = _group(st)
    big = np.ones((4, 8), np.float32)
    big[2, 5] = 70000.0
    with pytest.raises(SurpipeError, match=r"llm/tiny/layer_1/pooled.*overflows float16"):
        g.write_block(0, {"layer_1/pooled": big, "layer_3/pooled": np.ones((4, 8))})
    assert g.completed_blocks() == 0  # nothing marked done
    nan = np.ones((4, 8))
    nan[0, 0] = np.nan
    with pytest.raises(SurpipeError, match="NaN"):
        to_storage(nan, "float32", "x")
    # float32 storage of the same values is fine
    assert to_storage(big, "float32", "x").max() == 70000.0


def test_missing_store_and_non_store_errors(tmp_path):
    with pytest.raises(SurpipeError, match="not found"):
        FeatureStore(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(SurpipeError, match="not a Zarr v3 store"):
        FeatureStore(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(SurpipeError, match="not a surpipe feature store"):
        FeatureStore(tmp_path / "other.zarr")
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", FakeDataset(3))
    with pytest.raises(SurpipeError, match=r"no feature group 'clip/x'"):
        st.group("clip/x")
    with pytest.raises(SurpipeError, match="valid choices: llm, clip, vae"):
        st.require_group("bogus", "n", {}, {})


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_store_refused_for_writing(tmp_path):
    p = tmp_path / "s.zarr"
    FeatureStore.create_or_open(p, FakeDataset(3))
    os.chmod(p, stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(SurpipeError, match="read-only"):
            FeatureStore(p, mode="a")
    finally:
        os.chmod(p, stat.S_IRWXU)


def test_inspect_cli(tmp_path, capsys):
    from stages.cli import main

    st = FeatureStore.create_or_open(tmp_path / "s.zarr", FakeDataset(10), block_rows=4)
    g = _group(st, provenance={"model": "tiny-llm"})
    g.write_block(1, {"layer_1/pooled": np.ones((4, 8)), "layer_3/pooled": np.ones((4, 8))})
    assert main(["inspect", str(tmp_path / "s.zarr")]) == 0  # the short summary: a line per group
    out = capsys.readouterr().out
    assert "samples 10" in out and "llm/tiny" in out and "1/3 blocks INCOMPLETE" in out and "--full" in out
    assert "provenance model" not in out
    assert main(["inspect", str(tmp_path / "s.zarr"), "--full"]) == 0
    out = capsys.readouterr().out
    assert "samples 10" in out and "llm/tiny: 1/3 blocks done (INCOMPLETE)" in out
    assert "pending blocks: [0, 2]" in out and "layer_3/pooled" in out and "float32" in out
    assert "provenance model: \"tiny-llm\"" in out and "zstd" in out
    assert main(["inspect", str(tmp_path / "missing.zarr")]) == 1
    assert "feature store not found" in capsys.readouterr().err


def test_group_whose_creation_was_interrupted_is_recreated(tmp_path):
    """A kill between creating a group's arrays and writing its attrs (written last) leaves a group
    without settings: it holds no finished block, so reopening starts it again instead of refusing."""
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", FakeDataset(6), block_rows=3)
    half = st.root.require_group("llm/tiny")
    half.create_array("layer_1/pooled", shape=(6, 8), dtype="float16", chunks=(3, 8))
    half.attrs["kind"] = "llm"  # attrs partly there, settings not
    st.check_settings("llm", "tiny", {"model": "m", "layers": [1, 3]})  # the early check lets it pass
    g = _group(st)
    assert g.settings == {"model": "m", "layers": [1, 3]} and g.completed_blocks() == 0
    assert sorted(g.array_names) == ["layer_1/pooled", "layer_3/pooled"]


def test_group_being_created_counts_as_absent(tmp_path):
    """Between creating a group's arrays and its ``done`` record and publishing its attributes,
    another process (a data-parallel rank) must see no group, not a damaged one: the race that
    made two gloo ranks fail with "done record has dtype int64, expected bool"."""
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", FakeDataset(6), block_rows=3)
    half = st.root.require_group("llm/tiny")
    half.create_array("layer_1/pooled", shape=(6, 8), dtype="float16", chunks=(3, 8))
    half.create_array("done", shape=(2,), dtype="int64", chunks=(1,))
    other = FeatureStore(tmp_path / "s.zarr", mode="a")
    assert not other.has_group("llm/tiny")
    with pytest.raises(SurpipeError, match="has no feature group 'llm/tiny'"):
        other.group("llm/tiny")
    _group(st)  # the creator finishes: now both see it, undamaged
    assert other.has_group("llm/tiny") and other.group("llm/tiny").completed_blocks() == 0


def test_check_settings_refuses_before_any_work(tmp_path):
    st = FeatureStore.create_or_open(tmp_path / "s.zarr", FakeDataset(6), block_rows=3)
    _group(st)
    st.check_settings("llm", "tiny", {"model": "m", "layers": [1, 3]})
    st.check_settings("llm", "other", {"anything": 1})  # absent group: nothing to compare
    with pytest.raises(SurpipeError, match=r"layers: stored \[1, 3\], requested \[2\]"):
        st.check_settings("llm", "tiny", {"model": "m", "layers": [2]})
