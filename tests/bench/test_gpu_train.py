"""bench/gpu_train.py: the CPU dry run (tiny SD and tiny SDXL, both paths) runs the real TrainRecipe
loop and writes every key the GPU run will; MFU and the host-sync count by hand (behaviour, never timings)."""

import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

CASE_KEYS = {"case", "model", "px", "path", "compile", "unet_fp8", "mixed_precision", "workers", "log_every", "warm_up_steps",
             "batch", "steady_steps", "step_s", "samples_per_s", "step_s_rows", "model_tflops_per_step",
             "achieved_tflops", "mfu", "data_wait_share", "host_s_per_step", "host_syncs_per_step",
             "host_sync_sites", "peak_memory_GB", "metrics_rows", "losses_finite", "loss_last", "recipe",
             "weight_dtype", "batches_tried", "seconds", "compile_grad_distance"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    import gpu_train

    out = tmp_path_factory.mktemp("gpu-train") / "gpu_train.json"
    d = gpu_train.run(dry=True, out=out, command="test")
    return d, json.loads(out.read_text())


@pytest.mark.slow  # about 50 s: the dry run of every case (in .ci/run, with the other slow tests)
def test_dry_run_cases_ran_the_recipe_loop(dry_run):
    import gpu_train

    d, written = dry_run
    assert written == json.loads(json.dumps(d))  # the file holds the returned result
    assert d["dry_run"] is True and d["skipped"] == []
    assert d["device"]["torch_device"] == "cpu" and d["device"]["name"] and d["device"]["peak_bf16_tflops"] is None
    assert d["versions"]["torch"] and d["versions"]["diffusers"] and d["host"]["torch"]
    cases = {c["case"]: c for c in d["cases"]}
    assert set(cases) == {c.name for c in gpu_train.DRY_CASES}
    for name, c in cases.items():
        assert set(c) >= CASE_KEYS, CASE_KEYS - set(c)
        log_every, warm, timed = d["settings"]["steps"][c["model"]]
        # the recipe's own metrics rows: one per log interval, the loss finite in every one
        profiled = any(k in name for k in d["settings"]["profile"])  # one log interval more, not timed
        assert c["metrics_rows"] == (warm + timed) // log_every + profiled and c["losses_finite"]
        assert ("profile" in c) == profiled
        if profiled:  # torch's profiler over the extra interval: the ops that took the time
            p = c["profile"]
            assert p["time"] == "cpu" and p["top"] and p["total_ms"] > 0
            assert any("addmm" in t["name"] or "conv" in t["name"] or "mm" in t["name"] for t in p["top"])
        assert c["steady_steps"] == timed and len(c["step_s_rows"]) == timed // log_every
        assert c["samples_per_s"] == pytest.approx(c["batch"] / c["step_s"], rel=1e-2)
        assert c["data_wait_share"] >= 0
        assert {"data_wait", "forward", "backward", "optimizer"} <= set(c["host_s_per_step"])
        # CPU: no device peak, no CUDA syncs or memory to read
        assert c["mfu"] is None and c["host_syncs_per_step"] is None and c["peak_memory_GB"] is None
        assert c["weight_dtype"] == "float32" and not c["compile"] and c["compile_grad_distance"] is None
        if c["path"] == "online":  # the online recipe encoded one batch per step, through the same loop
            assert c["recipe"] == "OnlineRecipe" and c["online_encodes"] == warm + timed
        else:
            assert c["recipe"] == "TrainRecipe" and "online_encodes" not in c
    assert set(d["store_over_online"]) == {"tiny/eager/batch2", "tiny-xl/eager/batch2"}
    for pair, ratio in d["store_over_online"].items():
        s, o = cases[f"{pair}/store"], cases[f"{pair}/online"]
        assert ratio == pytest.approx(s["samples_per_s"] / o["samples_per_s"], rel=1e-2)
    assert any("store over online" in k for k, _ in gpu_train.summary(d))


def test_budget_skips_with_reason(tmp_path):
    import gpu_train

    d = gpu_train.run(dry=True, out=tmp_path / "g.json", budget_s=-1, only=["tiny-xl"])
    assert d["cases"] == [] and d["store_over_online"] == {}
    assert {s["case"] for s in d["skipped"]} == {"tiny-xl/eager/batch2/store", "tiny-xl/eager/batch2/online"}
    assert all(s["reason"].startswith("time budget") for s in d["skipped"])


def test_figures_mfu_and_waits_by_hand():
    import gpu_train

    rows = [{"step": s, "loss": 0.5, "step_s": t, "samples_per_s": 4 / t, "data_wait_s": w, "forward_s": 0.01,
             "backward_s": 0.02, "optimizer_s": 0.003}
            for s, t, w in ((5, 9.0, 0.5), (10, 0.2, 0.02), (15, 0.3, 0.04))]  # the first: warm-up (compile)
    got = {"rows": rows, "recipe": "TrainRecipe", "weight_dtype": "bfloat16", "syncs_per_step": 1.2,
           "sync_sites": {"x.py:1": 12}, "peak_memory_GB": 30.0}
    f = gpu_train.figures(got, batch=4, warm_steps=5, flops_per_sample=2e12, peak=1000.0)
    assert f["step_s"] == pytest.approx(0.25) and f["samples_per_s"] == pytest.approx(16.0)
    assert f["model_tflops_per_step"] == pytest.approx(8.0) and f["achieved_tflops"] == pytest.approx(32.0)
    assert f["mfu"] == pytest.approx(8e12 / 0.25 / 1e15)
    assert f["data_wait_share"] == pytest.approx(0.03 / 0.25)
    assert f["host_s_per_step"] == pytest.approx({"backward": 0.02, "data_wait": 0.03, "forward": 0.01,
                                                  "optimizer": 0.003})
    assert f["steady_steps"] == 10 and f["host_syncs_per_step"] == 1.2 and f["peak_memory_GB"] == 30.0
    assert gpu_train.figures(got, 4, 5, None, 1000.0)["mfu"] is None  # no cost model for the model
    assert gpu_train.figures(got, 4, 5, 2e12, None)["mfu"] is None  # no known peak for the device


def test_sync_counter_counts_steady_steps_only():
    import gpu_train

    recipe = SimpleNamespace(step=0)
    counter = gpu_train.SyncCounter(recipe)
    msg = gpu_train.SyncCounter.MESSAGE + " (Triggered internally at CUDAFunctions.cpp:1.)"  # as torch words it
    with counter.watching(debug_mode=False):
        for step in range(7):  # the recipe at steps 0 (warm-up) .. 6 (the last step's checkpoint)
            recipe.step = step
            for _ in range(2):  # the same line twice: each counts (not once per line)
                warnings.warn(msg, UserWarning)
        with pytest.warns(DeprecationWarning):  # other warnings pass through
            warnings.warn("other", DeprecationWarning)
    per_step, sites = counter.steady(2, 6)
    assert per_step == 2.0 and sum(sites.values()) == 8 and len(sites) == 1
    assert next(iter(sites)).startswith("tests/bench/test_gpu_train.py:")


def test_online_recipe_hooks_before_and_after_the_stage_split():
    """Today's recipe calls ``_stage`` then ``_complete``; one without the split calls only
    ``_batch_to_tensors`` with the store batch: the online encode runs once either way."""
    import gpu_train

    calls = []
    online = SimpleNamespace(stage=lambda b: calls.append("stage") or {"pixels": 1, "llm": b["llm"]},
                             encode=lambda s: calls.append("encode") or {"latents": s["pixels"]})
    r = object.__new__(gpu_train.OnlineRecipe)
    r.__dict__["online"] = online
    batch = {"llm": np.zeros((2, 4), np.float16)}
    assert r._batch_to_tensors(batch) == {"latents": 1} and calls == ["stage", "encode"]
    calls.clear()
    assert r._complete(r._stage(batch)) == {"latents": 1} and calls == ["stage", "encode"]
    calls.clear()
    assert r._batch_to_tensors({"pixels": 1, "llm": None}) == {"latents": 1} and calls == ["encode"]


def test_a_compile_mode_case_reaches_the_train_config(tmp_path):
    """The CUDA-graph case (--compile-mode reduce-overhead) trains with --compile-unet and that mode;
    its pair name keeps it apart from the default-mode compile case."""
    import gpu_train

    names = [c.name for c in gpu_train.GPU_CASES]
    assert "sd15/compile-reduce-overhead/batch32/store" in names and "sd15/compile/batch32/store" in names
    spec = dict(store=str(tmp_path / "s.zarr"), model=str(tmp_path / "m"), out=str(tmp_path / "o"), kind="tiny",
                batch=2, workers=0, max_steps=3, device="cpu", mixed_precision="no", log_every=1)
    for comp, unet, mode in ((False, False, "default"), (True, True, "default"),
                             ("reduce-overhead", True, "reduce-overhead")):
        cfg = gpu_train.train_config({**spec, "compile": comp})
        assert (cfg.compile_unet, cfg.compile_mode) == (unet, mode) and cfg.problems() == []


def test_the_device_profile_counts_each_kernel_once_and_no_annotation():
    """On a GPU, key_averages() holds the kernels and also the CPU ops that launched them (their self
    device time is the kernels' again), and ProfilerStep annotations are device events spanning a step."""
    import gpu_train
    from torch.autograd import DeviceType

    def ev(name, device, us, start, end, annotation=False):
        return SimpleNamespace(key=name, count=1, device_type=device, self_device_time_total=us,
                               is_user_annotation=annotation, time_range=SimpleNamespace(start=start, end=end))

    kernels = [ev("sm90_gemm", DeviceType.CUDA, 300, 0, 300), ev("softmax", DeviceType.CUDA, 100, 400, 500)]
    launcher = ev("aten::mm", DeviceType.CPU, 300, 0, 0)
    step = ev("ProfilerStep#3", DeviceType.CUDA, 600, 0, 600, annotation=True)
    prof = SimpleNamespace(key_averages=lambda: [launcher, *kernels, step], events=lambda: [*kernels, step])
    s = gpu_train.profile_summary(prof, cuda=True)
    assert s["total_ms"] == 0.4 and [t["name"] for t in s["top"]] == ["sm90_gemm", "softmax"]
    assert s["top"][0]["share"] == 0.75
    assert s["device_busy_share"] == 0.8 and s["largest_gaps_ms"] == [0.1] and s["idle_ms"] == 0.1


def test_the_device_scripts_name_cases_that_exist():
    """bench/gpu_issue26.sh and gpu_all.sh select cases by name: a misspelt one would spend the GPU call
    on nothing."""
    import re

    import gpu_train

    bench = Path(gpu_train.__file__).parent
    names = [c.name for c in gpu_train.GPU_CASES]
    script = (bench / "gpu_issue26.sh").read_text()
    chosen = re.search(r'\$\{CASES:-([^}]+)\}', script).group(1).split(",")
    chosen += re.findall(r"gpu_train\.py --cases (\S+)", (bench / "gpu_all.sh").read_text())
    assert len(chosen) == 4
    for key in chosen:
        assert any(key in n for n in names), key
    assert "sd15/compile/batch32/store" in names and "sd15/compile-fp8/batch32/store" in names
