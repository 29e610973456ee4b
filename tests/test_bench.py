"""The benchmarks run and produce their JSON keys (behaviour only, never timings)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


def test_train_step_keys(cache):
    import train_step

    d = train_step.run(True, models=["tiny"], cache=cache, rows={"tiny": 8}, rounds=1, per_round=1,
                       train_steps=2, store_rows=16, train_workers=(0,))
    m = d["models"]["tiny"]
    for k in ("store_samples_per_s", "online_samples_per_s", "store_over_online_samples_per_s",
              "online_breakdown_s_median", "store_breakdown_s_median", "train_loop"):
        assert k in m, k
    assert set(m["train_loop"]["0"]) >= {"data_wait_share", "step_s_median", "samples_per_s"}
    assert train_step.summary(d)


def test_store_io_keys(cache):
    import store_io

    d = store_io.run(True, models=["tiny"], cache=cache, rows={"tiny": 8}, loader_rows=32, workers=(0, 1),
                     block_rows=(16,), loader_codecs=("zstd",), rss_rows=(32, 64))
    arr = d["codecs"]["tiny"]["arrays"]
    assert set(arr) == set(store_io.ARRAYS)
    assert set(arr["clip_simple"]["codecs"]) == {"zstd", "blosc-lz4", "gzip", "none"}
    assert arr["clip_simple"]["codecs"]["none"]["ratio"] > 0
    assert "bf16_over_fp16_rel_rms" in d["dtype_error"]["tiny"]["lat_mean"]
    assert set(d["loader"]["workers"]) == {"0", "1"}
    assert "peak_rss_MB" in d["rss"]["64"] and "peak_rss_growth_MB" in d["rss"]
    assert store_io.summary(d)


def test_optimisations_keys(cache):
    import optimisations

    d = optimisations.run(True, cache=cache, adapter_batch=1, adapter_width=32, reps=1, unet_batch=1)
    assert d["sdpa_adapter"]["max_abs_diff"] < 1e-4 and d["channels_last_unet"]["max_abs_diff"] < 1e-3
    assert optimisations.summary(d)


def test_cost_model_keys():
    import cost_model

    d = cost_model.run(llms=("llama-7b",))
    s = d["sd15"]["step_flops"]
    assert s["online"] > s["from_store"] > 0
    v = d["llm"]["llama-7b"]
    assert v["truncated_flops_per_prompt"] * 32 == v["full_flops_per_prompt"] * 16
    assert "surd_GB_raw" in d["storage"]["arrays"]["clip/simple [77,768]"]
    assert cost_model.summary(d)
