"""The benchmarks run and produce their JSON keys (behaviour only, never timings)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


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


def test_store_io_real_widths_tiny(cache):
    """--real-widths on the tiny model: sizes from the shapes, loader rate against a given GPU rate."""
    import store_io

    d = store_io.run_real(True, cache=cache, model="tiny", rows=8, llm_widths=(64,), llm_prompts=8,
                          loader_rows=32, batch=4, workers=(0, 1), predicted_samples_per_s=1e9, wait_batch=4)
    r = d["real_widths"]
    a = r["arrays"]
    assert set(a) == {"clip_simple", "clip_complex", "lat_mean", "lat_std", "flip_mean", "flip_std", "llm_64"}
    assert a["clip_simple"]["raw_bytes_per_sample"] == 77 * 32 * 2  # fp16 [77, 32]
    assert a["lat_mean"]["raw_bytes_per_sample"] == 4 * 32 * 32 * 2
    assert a["llm_64"]["raw_bytes_per_sample"] == 64 * 2 and a["llm_64"]["rows"] == 8
    for v in a.values():  # uncompressed chunks hold the raw bytes (+ a few bytes per chunk); zstd about no more
        assert 0 <= v["codecs"]["none"]["bytes_per_sample"] - v["raw_bytes_per_sample"] <= 1
        assert v["codecs"]["zstd"]["bytes_per_sample"] <= v["raw_bytes_per_sample"] * 1.05
    assert r["raw_bytes_per_sample"]["clip2_vae4_llm_64"] == 2 * 77 * 32 * 2 + 4 * 4 * 32 * 32 * 2 + 128
    lo = r["loader"]
    assert set(lo["workers"]) == {"0", "1"} and lo["llm_width"] == 64
    assert lo["needs_2x"] is True  # nothing reads 5e8 samples/s
    # the loader's store holds distinct rows: repeated rows in a chunk would zstd to almost nothing
    zstd = sum(v["codecs"]["zstd"]["bytes_per_sample"] for v in a.values())
    assert lo["store_MB_per_row_on_disk"] * 1e6 > 0.8 * zstd
    assert lo["headroom_over_predicted"]["0"] == round(lo["workers"]["0"]["samples_per_s"] / 1e9, 2)
    w = r["data_wait"]  # the train loop's batch work against an emulated GPU, with and without read-ahead
    assert set(w["cases"]) == {f"workers {k}, {m}" for k in (0, 1) for m in ("read-ahead", "blocking copies")}
    assert all(0 <= v["data_wait_share"] < 1 and v["steps"] == 30 for v in w["cases"].values())
    assert store_io.summary_real(d)


def test_train_step_derive_by_hand():
    """The sd15 figures derived from the measurements: the by-parts ratio and the batch bought."""
    import train_step

    m = {"batch": 2,
         "store_breakdown_s_median": {"read_batch": 0.001, "to_tensors": 0.002, "loss_backward_opt": 10.0},
         "online_breakdown_s_median": {"decode_preprocess": 0.5, "vae_encode": 4.0, "clip_2x": 0.5,
                                       "loss_backward_opt": 12.0},
         "memory_MB": {"store": {"params_M": {"unet": 100.0, "adapter": 10.0}, "peak_rss_MB": 3000.0,
                                 "rss_after_setup_MB": 500.0},
                       "online": {"peak_rss_MB": 4000.0}}}
    train_step.derive(m)
    assert m["store_over_online_by_parts"] == round((11 + 5) / (11 + 0.003), 3)
    fixed = (100 * 4 + 10 * 12) * 1e6 / 2 ** 20  # UNet fp32 + adapter grads and AdamW moments, MiB
    per = (3000 - 500 - fixed) / 2
    assert m["memory_MB"]["store_step_MB_per_sample"] == round(per, 1)
    assert m["memory_MB"]["extra_batch_from_the_saving"] == int(1000 // per)


@pytest.mark.slow
def test_train_step_arch_tiny(cache):
    """--models sd15's machinery (one worker process per path, alternating steps) on the tiny model."""
    import train_step

    tmp = cache / "arch"
    tmp.mkdir(exist_ok=True)
    m = train_step.bench_arch("tiny", tmp, cache, 8, 1, 1, 16, 1.0)
    assert m["steps_timed_each"] == 1  # the budget is spent: one round, never zero
    mem = m["memory_MB"]
    assert "vae_encoder" in mem["online"]["params_M"] and "vae_encoder" not in mem["store"]["params_M"]
    assert mem["store"]["peak_rss_MB"] > mem["store"]["rss_after_setup_MB"] > 0
    sb = m["store_breakdown_s_median"]
    assert abs(sb["loss_forward"] + sb["backward"] + sb["optimizer"] - sb["loss_backward_opt"]) < 1e-3
    assert "cost_model" not in m  # the tiny model's FLOPs are not modelled
    assert train_step.summary({"models": {"tiny": m}})


def test_train_step_arch_sdxl_tiny_one_after_the_other(cache, monkeypatch):
    """--models sdxl's machinery on the tiny SDXL: the SDXL store (pooled embeddings, micro-conditioning),
    the online path with both text encoders, and the paths run one after the other when both
    processes would not fit in memory."""
    import numpy as np

    import _common as C
    import train_step

    tmp = cache / "arch-xl"
    tmp.mkdir(exist_ok=True)
    monkeypatch.setattr(train_step, "_schedule", lambda mdir: (False, "forced by the test"))
    m = train_step.bench_arch("tiny-xl", tmp, cache, 4, 1, 2, 16, 1.0)
    assert m["paths_run"].startswith("one after the other") and "forced by the test" in m["paths_run"]
    assert m["steps_timed_each"] == 1  # the budget is spent: never zero steps
    p = m["memory_MB"]["online"]["params_M"]
    assert {"vae_encoder", "text_encoder", "text_encoder_2"} <= set(p)  # both SDXL text encoders online
    assert "text_encoder" not in m["memory_MB"]["store"]["params_M"]
    # the store holds what encode-latents writes for SDXL: the stored pooled embeddings are those of
    # surpipe.sd.xl.encode_prompts_xl on the sample's prompts (independent recomputation)
    from surpipe.sd import xl as sdxl

    _, act = C.cached_model_and_activations("tiny-xl", cache, 4)
    te = sdxl.load_text_encoders_xl(str(cache / "sd-tiny-xl"))
    emb, pooled = sdxl.encode_prompts_xl(te, [s.simple for s in C.sample_rows(4)])
    # the same float32 encoders on the same 4 prompts; only thread splits of the reductions may differ (a few eps)
    np.testing.assert_allclose(act.pooled_simple, pooled.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(act.clip_simple, emb.numpy(), rtol=1e-5, atol=1e-6)
    assert act.original_size.shape == act.crop_top_left.shape == (4, 2)
    assert train_step.summary({"models": {"tiny-xl": m}})


def test_cost_model_px_keeps_defaults():
    """sd_costs(px=...) evaluates another resolution; without it the outputs are the default ones."""
    import cost_model

    base = cost_model.sd_costs(1, "sd15")
    assert base == cost_model.sd_costs(1, "sd15", px=None) and base["resolution_px"] == 512
    half = cost_model.sd_costs(1, "sd15", px=256)
    assert half["resolution_px"] == 256 and half["latent_shape"] == [4, 32, 32]
    assert "vae_encode_256px" in half["flops"]
    assert half["flops"]["unet_forward"] < base["flops"]["unet_forward"] / 3  # ~1/4 of the pixels
