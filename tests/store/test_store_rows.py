"""Store creation and matching as one explicit step (surpipe.store.feature_store / .opening): exception
classes instead of error strings, matching by keys and prompts without decoding images, the
image check of the rows encode-latents reads; lock files and saved configs beside the store, so
plain zarr reads a finished store without warnings; the one device/dtype resolver."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from surpipe.errors import SurpipeError


def _surd(make_surd, n=6, broken=(), prompts=None, name=None):
    from helpers import png_bytes

    files, lines = {}, []
    for i in range(n):
        files[f"im{i}.png"] = b"not an image at all" if i in broken else png_bytes((12 + i, 10), (20 * i, 90, 9))
        simple = (prompts or {}).get(i, f"a small cube number {i}")
        lines.append({"file_name": f"im{i}.png", "text": simple, "prompt": f"{simple}, studio light"})
    return make_surd(lines, files, name=name)


@pytest.fixture
def count_image_reads(monkeypatch):
    """Counts image checks (header or full) of any kind: every one goes through open_checked."""
    import surpipe.data.images as I

    calls = {"n": 0}
    real = I.open_checked

    def spy(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(I, "open_checked", spy)
    return calls


def test_new_store_leaves_out_bad_images_and_matching_decodes_only_those(make_surd, tmp_path, count_image_reads):
    from surpipe.store import FeatureStore
    from surpipe.store.opening import open_store

    data = _surd(make_surd, n=6, broken={2})
    ds, st = open_store(str(data), str(tmp_path / "s.zarr"), block_rows=4, progress=False)
    assert st.created_now and st.num_samples == 5 and "im2" not in [s.key for s in ds.samples]
    assert count_image_reads["n"] >= 6  # a new store's rows pass a full check
    count_image_reads["n"] = 0
    # extract-llm on the existing store: rows matched by keys and prompts; only the one dataset row
    # missing from the store is decoded (to confirm its image is why it was left out)
    ds2, st2 = open_store(str(data), str(tmp_path / "s.zarr"), progress=False)
    assert not st2.created_now and count_image_reads["n"] == 1
    assert [s.key for s in ds2.samples] == FeatureStore(tmp_path / "s.zarr").keys().tolist()
    # a dataset whose every image is good matches without reading any image
    good = _surd(make_surd, n=4, name="good")
    open_store(str(good), str(tmp_path / "g.zarr"), progress=False)
    count_image_reads["n"] = 0
    open_store(str(good), str(tmp_path / "g.zarr"), progress=False)
    assert count_image_reads["n"] == 0


def test_dataset_mismatch_is_a_class_naming_the_first_differing_row(make_surd, tmp_path):
    from surpipe.store import DatasetMismatch
    from surpipe.store.opening import open_store

    store = str(tmp_path / "s.zarr")
    open_store(str(_surd(make_surd, n=6, name="a")), store, progress=False)
    with pytest.raises(DatasetMismatch) as e:
        open_store(str(_surd(make_surd, n=6, prompts={3: "another prompt"}, name="b")), store, progress=False)
    err = e.value
    assert isinstance(err, SurpipeError) and "different dataset" in str(err) and "use another --store" in str(err)
    assert err.row == 3 and err.stored[0] == "im3" and err.given == ("im3", "another prompt", "another prompt, studio light")
    assert "'im3'" in err.detail and "simple prompt" in err.detail
    # a dataset row that is not in the store and whose image is fine: refused, not silently skipped
    # (rows after the store's last row grow the store instead: tests/test_store_growth.py)
    c = _surd(make_surd, n=7, name="c")
    lines = (c / "metadata.jsonl").read_text().splitlines()
    (c / "metadata.jsonl").write_text("\n".join(lines[:3] + lines[6:] + lines[3:6]) + "\n")  # im6 before im3
    with pytest.raises(DatasetMismatch) as e:
        open_store(str(c), store, progress=False)
    assert e.value.row == 3 and e.value.stored[0] == "im3" and "'im6') is not in the store" in str(e.value)
    # a store row the dataset lacks
    with pytest.raises(DatasetMismatch) as e:
        open_store(str(_surd(make_surd, n=5, name="d")), store, progress=False)
    assert e.value.row == 5 and "is not in the dataset" in str(e.value)


def test_store_not_found_and_lost_creation_race_are_classes(tmp_path):
    from surpipe.store import FeatureStore, StoreExists, StoreNotFound, create_store
    from helpers import FakeDataset

    with pytest.raises(StoreNotFound, match="not found"):
        FeatureStore(tmp_path / "nope.zarr")
    create_store(tmp_path / "s.zarr", FakeDataset(3))
    with pytest.raises(StoreExists):
        create_store(tmp_path / "s.zarr", FakeDataset(3))


def test_encode_latents_refuses_store_rows_whose_image_broke_naming_them(make_surd, tmp_path):
    from surpipe.store.opening import open_store

    data = _surd(make_surd, n=6)
    store = str(tmp_path / "s.zarr")
    open_store(str(data), store, progress=False)
    (data / "im4.png").write_bytes(b"garbage now")
    open_store(str(data), store, progress=False)  # extract-llm does not read images: fine
    with pytest.raises(SurpipeError) as e:
        open_store(str(data), store, images=True, progress=False)
    msg = str(e.value) + "\n".join(e.value.problems)
    assert "fail the header check" in msg and "row 4 (im4)" in msg and "not an image" in msg
    assert "different dataset" not in msg


def test_failed_new_store_is_removed_with_its_sidecars_but_an_old_one_stays(make_surd, tmp_path):
    from surpipe.config import atomic_write_text
    from surpipe.store.locks import writer_lock
    from surpipe.store import config_file
    from surpipe.store.opening import discard_new_store_on_error, open_store

    data = _surd(make_surd, n=4)
    store = tmp_path / "s.zarr"
    ds, st = open_store(str(data), str(store), progress=False)
    with pytest.raises(RuntimeError):
        with discard_new_store_on_error(st):
            atomic_write_text(config_file(store, "extract-llm", "x"), "{}")
            with writer_lock(store, "llm/x", 0):
                raise RuntimeError("model failed to load")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["surd1"]
    ds, st = open_store(str(data), str(store), progress=False)
    ds, st = open_store(str(data), str(store), progress=False)  # now an existing store
    with pytest.raises(RuntimeError):
        with discard_new_store_on_error(st):
            raise RuntimeError("boom")
    assert store.is_dir()


def test_locks_and_configs_live_beside_the_store_and_plain_zarr_does_not_warn(tiny_models, make_surd, tmp_path):
    import zarr

    from stages.extract_llm import ExtractLLMConfig, run

    data = _surd(make_surd, n=6)
    store = tmp_path / "s.zarr"
    run(ExtractLLMConfig(data=str(data), store=str(store), model=str(tiny_models / "llm"), layers=[1], name="g",
                         block_rows=4, progress=False, store_dtype="float32"))
    saved = tmp_path / "s.zarr.configs" / "extract-llm-g.json"
    assert json.loads(saved.read_text())["layers"] == [1]
    assert (tmp_path / "s.zarr.locks" / "llm__g.rank0.lock").is_file()
    assert sorted(p.name for p in store.iterdir()) == ["keys", "llm", "prompts", "zarr.json"]
    assert json.loads((store / "llm" / "g" / "zarr.json").read_text())["attributes"]["config"]["layers"] == [1]

    def zarr_warnings(path):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            members = dict(zarr.open_group(str(path), mode="r").members(max_depth=None))
        return members, [w for w in seen if "not recognized" in str(w.message)]

    members, seen = zarr_warnings(store)
    assert "llm/g/layer_1/pooled" in members and seen == []
    (store / ".locks").mkdir()  # the old layout: zarr warns about it (so the check above can fail)
    assert zarr_warnings(store)[1]


def test_block_job_resumes_and_takes_its_lock_beside_the_store(tmp_path):
    from surpipe.store.blockjob import DistEnv, run_block_job
    from surpipe.store import ArraySpec, FeatureStore
    from helpers import FakeDataset

    st = FeatureStore.create_or_open(tmp_path / "s.zarr", FakeDataset(10), block_rows=4)
    calls = []

    def block(a, b):
        calls.append((a, b))
        return {"x": np.arange(a, b, dtype=np.float32)[:, None].repeat(2, 1)}

    job = dict(store=st, kind="clip", name="t", settings={"s": 1}, arrays={"x": ArraySpec((2,), "float32")},
               provenance={}, overwrite=False, env=DistEnv(), compute_block=block, progress=False)
    res = run_block_job(**job)
    assert calls == [(0, 4), (4, 8), (8, 10)] and res.rows_done_now == 10 and not res.already_complete
    assert run_block_job(**job).already_complete and len(calls) == 3
    np.testing.assert_array_equal(st.group("clip/t").read("x")[:, 0], np.arange(10))
    assert (tmp_path / "s.zarr.locks" / "clip__t.rank0.lock").is_file() and not (tmp_path / "s.zarr" / ".locks").exists()


def test_one_device_and_dtype_resolver():
    import torch

    from surpipe import devices as D

    assert D.device_problem("cuda:1") is None and D.device_problem("auto") is None
    assert "cuda:<index>" in D.device_problem("gpu0")
    assert D.resolve_dtype("auto", "cpu") == "float32" and D.resolve_dtype("fp16", "cpu") == "float16"
    assert D.dtype_name("torch.bfloat16") == "bfloat16" and D.dtype_name("bf16") == "bfloat16"
    assert D.torch_dtype("half") is torch.float16 and D.torch_dtype(torch.float32) is torch.float32
    assert D.torch_dtype(None) is None
    with pytest.raises(SurpipeError, match="unknown dtype"):
        D.dtype_name("float8")
    if not torch.cuda.is_available():
        assert D.resolve_device("auto", 3) == "cpu"
        with pytest.raises(SurpipeError, match="CUDA is not available"):
            D.resolve_device("cuda:0")
    else:
        assert D.resolve_device("auto", 0) == "cuda:0"
        assert D.resolve_dtype("auto", "cuda", cuda="float16") == "float16"


def test_status_lines_follow_the_current_stderr():
    """Library messages (e.g. the removal of a failed new store) reach stderr as it is now, not a
    stream captured when the logger was first made (an in-process run under a replaced stderr
    otherwise printed a logging traceback)."""
    import contextlib
    import io

    from surpipe.logs import get_logger

    get_logger().info("made before the redirect")
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        get_logger().info("removed the store y")
    assert buf.getvalue() == "surpipe: removed the store y\n"
