"""A store that grows (issue 15, item 2): stage one on the store's dataset plus rows after its last
row appends them. Old rows keep their values bit for bit and their finished chunk files are not
rewritten; new rows equal a store built from scratch; changed, removed or inserted rows are still
refused naming the row; a growth interrupted (raised or SIGKILLed) at any step is completed by a
rerun; two processes growing one store at once leave one consistent store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.growth import BLOCK, _surd, _extract, _encode, _values
import zarr

from helpers import run_cli
from surpipe.errors import SurpipeError

REPO = Path(__file__).resolve().parents[2]


def _chunk_files(store: Path, block: int) -> dict[str, tuple[bytes, int]]:
    """(bytes, mtime_ns) of every feature array's chunk files of ``block``."""
    from surpipe.store.integrity import chunk_files

    root = zarr.open_group(str(store), mode="r")
    out = {}
    for kind in ("llm", "clip", "vae"):
        for name in root[kind].group_keys():
            g = root[f"{kind}/{name}"]
            for a in g.attrs["arrays"]:
                for f in chunk_files(store, g[a], block):
                    out[str(f.relative_to(store))] = (f.read_bytes(), f.stat().st_mtime_ns)
    return out


def _train(store, sd, out, steps):
    return ["train", "--store", store, "--model", sd, "--llm-layer", "3", "--out", out, "--batch-size", "2",
            "--grad-accum", "1", "--workers", "0", "--no-progress", "--device", "cpu", "--dim-feedforward", "64",
            "--nhead", "4", "--max-steps", str(steps), "--checkpoint-every", "1", "--no-loss-curve"]


def test_grow_7_to_12_keeps_old_rows_equals_a_fresh_store_and_trains(make_surd, tiny_models, tmp_path):
    from surpipe.data import open_dataset
    from surpipe.store import FeatureStore
    from surpipe.features import RULES
    from surpipe.store.verify import check_store

    d7, d12 = _surd(make_surd, 7, "d7"), _surd(make_surd, 12, "d12")
    store = tmp_path / "s.zarr"
    _extract(d7, store, tiny_models)
    _encode(d7, store, tiny_models)
    before, block0 = _values(store), _chunk_files(store, 0)
    assert before["keys"].shape == (7,) and len(block0) > 10
    rc, out, err = run_cli(*_train(store, tiny_models / "sd", tmp_path / "run7", 1))  # a run on the 7 rows
    assert rc == 0, err
    time.sleep(0.01)  # a rewritten chunk file would get another mtime

    rep = _extract(d12, store, tiny_models)  # grows the store, then computes the llm group's new rows
    assert rep["rows"] == 12 and rep["prompts_done_now"] == 8  # blocks 1 (partial before) and 2
    st = FeatureStore(store)
    assert st.num_samples == 12 and st.num_blocks == 3
    assert st.fingerprint == open_dataset(str(d12), check_images="none", progress=False).fingerprint()
    for path in ("clip/sd", "vae/sd-64"):  # not computed yet: the old partial block waits for its new rows
        g = st.group(path)
        assert g.done_mask().tolist() == [True, False, False] and g.kept_rows() == {1: 7}
    assert st.group("llm/llm").is_complete() and st.group("llm/llm").kept_rows() == {}
    _encode(d12, store, tiny_models)

    after = _values(store)
    assert set(after) == set(before)
    for name, old in before.items():  # every old row: bit-identical
        assert after[name].shape[0] == 12, name
        np.testing.assert_array_equal(after[name][:7], old, err_msg=name)
    assert _chunk_files(store, 0) == block0  # the full block's chunk files were not rewritten

    fresh = tmp_path / "fresh.zarr"  # the same 12 rows from scratch
    _extract(d12, fresh, tiny_models)
    _encode(d12, fresh, tiny_models)
    ref = _values(fresh)
    for name, r in ref.items():
        if after[name].dtype.kind in "fc":
            np.testing.assert_allclose(after[name][7:].astype(np.float32), r[7:].astype(np.float32),
                                       rtol=2e-3, atol=1e-3, err_msg=name)
        else:
            np.testing.assert_array_equal(after[name][7:], r[7:], err_msg=name)

    rep = check_store(store, RULES)
    assert rep.problems == [] and rep.warnings == [], (rep.problems, rep.warnings)
    rc, out, err = run_cli("inspect", store, "--json")
    assert rc == 0 and json.loads(out)["num_samples"] == 12
    rc, out, err = run_cli(*_train(store, tiny_models / "sd", tmp_path / "run12", 2))
    assert rc == 0, err
    # the run made on the 7 rows is not resumed on the grown store
    rc, out, err = run_cli(*_train(store, tiny_models / "sd", tmp_path / "run7", 2))
    assert rc == 1 and "held 7 rows" in err and "holds 12 rows" in err and "the store grew" in err, err


def _plain_store(make_surd, tmp_path, n=7):
    """A store of rows im0..im<n-1> made by open_store, with two groups written by run_block_job
    (values a function of the row, so old and new rows can be told apart)."""
    from surpipe.store.opening import open_store

    store = tmp_path / "s.zarr"
    open_store(str(_surd(make_surd, n, "base")), str(store), block_rows=BLOCK, progress=False)
    _fill(store, offset=0.5)
    return store


def _fill(store, offset):
    from surpipe.store.blockjob import DistEnv, run_block_job
    from surpipe.store import ArraySpec, FeatureStore

    st = FeatureStore(store, mode="a")
    for kind, name in (("llm", "a"), ("clip", "b")):
        run_block_job(store=st, kind=kind, name=name, settings={"m": name},
                      arrays={"x": ArraySpec((3,), "float32"), "n": ArraySpec((), "int32")}, provenance={},
                      overwrite=False, env=DistEnv(), progress=False,
                      compute_block=lambda s, e: {"x": np.arange(s, e)[:, None] * np.ones(3) + offset,
                                                  "n": np.arange(s, e)})


def test_changed_removed_and_inserted_rows_are_refused_naming_the_row(make_surd, tmp_path):
    from surpipe.store import DatasetMismatch, FeatureStore
    from surpipe.store.opening import open_store

    store = _plain_store(make_surd, tmp_path)
    cases = {  # dataset -> (row named, words in the message)
        "removed": (_surd(make_surd, 12, "removed", order=[0, 1, 2, 4, 5, 6, *range(7, 12)]), 3, "'im3'"),
        "changed": (_surd(make_surd, 12, "changed", prompts={5: "another prompt"}), 5, "simple prompt"),
        "inserted": (_surd(make_surd, 12, "inserted", order=[0, 1, 9, 2, 3, 4, 5, 6, 7, 8, 10, 11]), 2,
                     "'im9') is not in the store"),
        "reordered": (_surd(make_surd, 12, "reordered", order=[0, 1, 3, 2, 4, 5, 6, *range(7, 12)]), 3,
                      "comes before"),
    }
    for what, (data, row, words) in cases.items():
        with pytest.raises(DatasetMismatch) as e:
            open_store(str(data), str(store), progress=False)
        assert e.value.row == row and words in str(e.value) and "use another --store" in str(e.value), what
    st = FeatureStore(store)  # untouched
    assert st.num_samples == 7 and st.format == 2 and st.group("llm/a").is_complete()


def test_rows_whose_images_fail_are_left_out_of_the_growth(make_surd, tmp_path):
    from surpipe.store.opening import open_store

    store = _plain_store(make_surd, tmp_path)
    data = _surd(make_surd, 12, "bad")
    (data / "im9.png").write_bytes(b"not an image")
    ds, st = open_store(str(data), str(store), progress=False)
    assert st.num_samples == 11 and "im9" not in st.keys().tolist() and [s.key for s in ds.samples] == st.keys().tolist()
    ds, st = open_store(str(data), str(store), progress=False)  # the same dataset again: matched, not grown
    assert st.num_samples == 11


def _check_grown(store, n_new=12):
    """The grown store after its groups are completed: old rows kept, new rows computed."""
    from surpipe.store import FeatureStore
    from surpipe.features import RULES
    from surpipe.store.verify import check_store

    _fill(store, offset=100.0)  # new values differ from the old ones: a recomputed old row would show
    st = FeatureStore(store)
    assert st.num_samples == n_new and st.keys().tolist() == [f"im{i}" for i in range(n_new)]
    for path in ("llm/a", "clip/b"):
        g = st.group(path)
        assert g.is_complete()
        x = g.read("x")[:, 0]
        np.testing.assert_array_equal(x[:7], np.arange(7) + 0.5)
        np.testing.assert_array_equal(x[7:], np.arange(7, n_new) + 100.0)
    rep = check_store(store, RULES)
    assert rep.problems == [] and rep.warnings == [], (rep.problems, rep.warnings)


@pytest.mark.parametrize("fail_at", ["group 1", "group 2", "rows"])
def test_growth_interrupted_at_any_step_is_refused_then_completed_by_a_rerun(make_surd, tmp_path, monkeypatch, fail_at):
    import surpipe.store.growth as G
    from surpipe.store import FeatureStore
    from surpipe.store.opening import open_store
    from surpipe.features import RULES
    from surpipe.store.verify import check_store

    store = _plain_store(make_surd, tmp_path)
    data = _surd(make_surd, 12, "grown")
    calls = {"groups": 0}
    real_group = G.grow_group

    def group_then_fail(*a, **kw):
        calls["groups"] += 1
        if fail_at == f"group {calls['groups']}":
            raise KeyboardInterrupt("killed")
        return real_group(*a, **kw)

    def commit_fails(*a, **kw):  # keys and prompts are written, the commit is next
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(G, "grow_group", group_then_fail)
    if fail_at == "rows":
        monkeypatch.setattr(G, "fingerprint_of", commit_fails)
    with pytest.raises(KeyboardInterrupt):
        open_store(str(data), str(store), progress=False)
    monkeypatch.undo()

    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["surpipe_format"] == "2+growing"  # older surpipe versions refuse an unknown format
    with pytest.raises(SurpipeError, match="growing from 7 to 12 rows"):
        FeatureStore(store)
    assert any("interrupted" in p.message for p in check_store(store, RULES).problems)
    ds, st = open_store(str(data), str(store), progress=False)  # the rerun completes the growth
    assert st.num_samples == 12 and st.growing is None and st.format == 2
    _check_grown(store)


def test_sigkill_right_after_the_resize_then_rerun(make_surd, tmp_path):
    store = _plain_store(make_surd, tmp_path)
    data = _surd(make_surd, 12, "grown")
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import surpipe.store.growth as G
real = G.grow_group
def grow_then_die(*a, **kw):
    real(*a, **kw)
    os.kill(os.getpid(), signal.SIGKILL)  # right after the first group's resize
G.grow_group = grow_then_die
from surpipe.store.opening import open_store
open_store({str(data)!r}, {str(store)!r}, progress=False)
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    from surpipe.store.opening import open_store

    assert zarr.open_group(str(store), mode="r").attrs["surpipe_format"] == "2+growing"
    open_store(str(data), str(store), progress=False)
    _check_grown(store)


def test_two_processes_growing_at_once_leave_one_consistent_store(make_surd, tmp_path):
    store = _plain_store(make_surd, tmp_path)
    data = _surd(make_surd, 12, "grown")
    go = tmp_path / "go"
    script = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
import surpipe.store.growth as G
real = G.grow_group
def slow(*a, **kw):
    with open({str(tmp_path / "calls")!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(0.3)  # widen the window: the other process must wait for the lock, not interleave
    return real(*a, **kw)
G.grow_group = slow
from surpipe.store.opening import open_store
while not os.path.exists({str(go)!r}):
    time.sleep(0.01)
ds, st = open_store({str(data)!r}, {str(store)!r}, progress=False)
print(st.num_samples, len(ds))
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    assert [o.split() for o, _ in outs] == [["12", "12"], ["12", "12"]]
    assert sum("grew from 7 to 12" in e for _, e in outs) >= 1
    root = zarr.open_group(str(store), mode="r")
    assert len(root.attrs["grown"]) == 1
    calls = (tmp_path / "calls").read_text().split()  # grown once: the second process found it grown
    assert len(calls) == 2 and len(set(calls)) == 1, calls  # 2 groups, by one process
    _check_grown(store)


def test_a_writer_that_opened_the_store_before_it_grew_is_refused(make_surd, tmp_path):
    from surpipe.store import FeatureStore
    from surpipe.store.opening import open_store

    store = _plain_store(make_surd, tmp_path)
    old = FeatureStore(store, mode="a")
    g = old.group("llm/a")
    g.mark_incomplete(1)
    open_store(str(_surd(make_surd, 12, "grown")), str(store), progress=False)
    with pytest.raises(SurpipeError, match="grew"):  # its block 1 would cover rows 4-6 only
        g.write_block(1, {"x": np.zeros((3, 3)), "n": np.zeros(3)})
    assert FeatureStore(store).group("llm/a").done_mask().tolist() == [True, False, False]


def test_a_store_smaller_than_one_block_grows(make_surd, tmp_path):
    from surpipe.store import FeatureStore
    from surpipe.store.opening import open_store
    from surpipe.features import RULES
    from surpipe.store.verify import check_store

    store = _plain_store(make_surd, tmp_path, n=3)  # arrays chunked by 3 rows: re-chunked to blocks of 4
    open_store(str(_surd(make_surd, 10, "grown")), str(store), progress=False)
    _fill(store, offset=100.0)
    g = FeatureStore(store).group("llm/a")
    assert g.array("x").chunks[0] == BLOCK
    np.testing.assert_array_equal(g.read("x")[:, 0], np.arange(10) + 100.0)  # block 0 recomputed whole
    assert check_store(store, RULES).problems == []


def test_per_token_group_grows_with_its_capacity_or_refuses_rows_that_need_more(make_surd, tiny_models, tmp_path):
    from stages.extract_llm import ExtractLLMConfig, run
    from surpipe.store import FeatureStore

    def extract(data, store):
        return run(ExtractLLMConfig(data=str(data), store=str(store), model=str(tiny_models / "llm"), layers=[1],
                                    pooling="tokens", block_rows=BLOCK, store_dtype="float32", progress=False))

    def tokens(store):  # each row's [len, H] per-token states, through the stored offsets
        g = FeatureStore(store).group("llm/llm-tokens")
        flat, off, cnt = g.read("layer_1/tokens"), g.read("token_offsets"), g.read("token_counts")
        return [flat[o:o + c] for o, c in zip(off, cnt)], int(g.array("layer_1/tokens").attrs["block_capacity"])

    same = {i: f"a cube {chr(97 + i)}" for i in range(12)}  # equal token counts: new blocks fit
    store, fresh = tmp_path / "s.zarr", tmp_path / "f.zarr"
    extract(_surd(make_surd, 7, "t7", prompts=same), store)
    old, cap = tokens(store)
    extract(_surd(make_surd, 12, "t12", prompts=same), store)
    extract(_surd(make_surd, 12, "t12f", prompts=same), fresh)
    grown, cap2 = tokens(store)
    ref, _ = tokens(fresh)
    assert cap2 == cap and len(grown) == 12
    for i in range(12):
        # float32 per-token states computed in other batches (other padding shapes): ~1e-6 relative expected;
        # 1e-4 also covers values near zero, where the relative error of single elements is larger
        np.testing.assert_allclose(grown[i], ref[i], rtol=1e-4, atol=1e-5, err_msg=f"row {i}")
        if i < 7:
            np.testing.assert_allclose(grown[i], old[i], rtol=1e-4, atol=1e-5, err_msg=f"row {i}")

    longer = {**same, 10: "a cube " + "with many more words " * 6}
    store = tmp_path / "s2.zarr"
    extract(_surd(make_surd, 7, "l7", prompts=longer), store)
    with pytest.raises(SurpipeError, match="holds at most .* token rows per block"):
        extract(_surd(make_surd, 12, "l12", prompts=longer), store)
