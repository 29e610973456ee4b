"""bench/gpu_check.py: the CPU dry run (--device cpu --tiny) writes the JSON the GPU run will, every
figure finite and positive, every case measured or skipped with its reason (behaviour, never timings)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

BATCHES = (1, 8, 32)
LLM_CASES = ("fp16", "int8", "nf4")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()), p.stdout


def _figures(d, path=""):
    """(path, value) of every number in ``d`` (bools are flags, not figures)."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _figures(v, f"{path}/{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _figures(v, f"{path}[{i}]")
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield path, d


def test_dry_run_keys_and_cases(dry_run):
    d, stdout = dry_run
    assert d["tiny"] is True and d["device"]["torch_device"] == "cpu" and d["device"]["name"]
    assert set(d["versions"]) >= {"torch", "diffusers", "transformers", "bitsandbytes"}
    assert d["versions"]["torch"] and d["versions"]["diffusers"] and d["versions"]["transformers"]
    # no known peak for a CPU: MFU omitted, and said so
    assert d["device"]["peak_bf16_tflops"] is None and "omitted" in d["device"]["mfu"]
    assert "30% MFU" in d["mfu_anchor"]
    ts = d["train_step"]
    cases = {(c["path"], c["batch"]): c for c in ts["cases"]}
    # on CPU nothing of the training step may be skipped: both paths at every batch size
    assert set(cases) == {(p, b) for p in ("store", "online") for b in BATCHES}
    for (path, b), c in cases.items():
        assert set(c) >= {"step_s_median", "samples_per_s", "peak_memory_GB", "model_tflops_per_step",
                          "achieved_tflops"}
        assert "mfu" not in c
        assert c["samples_per_s"] == pytest.approx(b / c["step_s_median"], rel=1e-2)
        # the model FLOPs of a step are the cost model's per-sample FLOPs times the batch
        assert c["model_tflops_per_step"] == pytest.approx(ts["cost_model_flops_per_sample"][path] * b / 1e12,
                                                           rel=1e-3)
    assert "data_s_median" in cases["store", 8] and "data_s_median" not in cases["online", 8]
    assert ts["cost_model_flops_per_sample"]["online"] > ts["cost_model_flops_per_sample"]["store"]
    assert set(ts["online_step_over_store_step"]) == {str(b) for b in BATCHES}
    llm = d["llm_extraction"]
    got = {c["case"]: c for c in llm["cases"]}
    skipped = {s["case"]: s["reason"] for s in d["skipped"]}
    assert "llm/fp16" not in skipped and "fp16" in got
    for name in LLM_CASES:  # measured, or skipped with its reason (bitsandbytes' CPU backend)
        assert (name in got) != (f"llm/{name}" in skipped), name
    n_layers = llm["config"]["num_hidden_layers"]
    for name, c in got.items():
        assert c["features_finite"] is True
        assert c["prompts_per_s"] == pytest.approx(llm["prompts"] / c["seconds"], rel=1e-2)
        if name == "fp16":
            assert "quantized_linear_layers" not in c
        else:  # really quantized: the 7 linear layers of every LLaMA decoder layer (q k v o gate up down)
            assert c["quantized_linear_layers"] == 7 * n_layers
    assert "GPU check on" in stdout


def test_dry_run_figures_finite_and_positive(dry_run):
    d, _ = dry_run
    figures = list(_figures({k: v for k, v in d.items() if k != "skipped"}))
    assert len(figures) > 50
    bad = [(p, v) for p, v in figures if not (math.isfinite(v) and v > 0)]
    assert not bad, bad
    for s in d["skipped"]:
        assert s["case"] and s["reason"].strip(), s


def test_spent_budget_skips_every_case_with_its_reason(tmp_path):
    import gpu_check

    out = tmp_path / "g.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    want = {f"train_step/{p}/batch{b}" for p in ("store", "online") for b in BATCHES} | {f"llm/{c}" for c in LLM_CASES}
    assert {s["case"] for s in d["skipped"]} == want
    assert all("time budget" in s["reason"] for s in d["skipped"])
    assert "train_step" not in d and "llm_extraction" not in d


def test_out_of_memory_skips_that_batch_and_the_larger_ones(tmp_path):
    import torch

    import gpu_check

    run = gpu_check.Run(tmp_path / "g.json", 1e9, gpu_check.Device("cpu"), {})

    def measure(batch):
        if batch >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return {"batch": batch}

    assert list(gpu_check.batch_cases(run, "train_step/store", [32, 1, 8], measure)) == [{"batch": 1}]
    reasons = {s["case"]: s["reason"] for s in run.res["skipped"]}
    assert reasons["train_step/store/batch8"].startswith("out of memory: CUDA out of memory")
    assert reasons["train_step/store/batch32"] == "batch 8 did not fit (out of memory)"
    assert json.loads((tmp_path / "g.json").read_text())["skipped"] == run.res["skipped"]


def test_an_error_in_one_case_is_recorded_and_the_run_goes_on(tmp_path):
    import gpu_check

    run = gpu_check.Run(tmp_path / "g.json", 1e9, gpu_check.Device("cpu"), {})
    assert run.attempt("llm/int8", lambda: (_ for _ in ()).throw(ImportError("no bitsandbytes\nmore"))) is None
    assert run.attempt("llm/nf4", lambda: {"ok": 1}) == {"ok": 1}
    assert run.res["skipped"] == [{"case": "llm/int8", "reason": "error: ImportError: no bitsandbytes"}]


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                        ("NVIDIA H200 NVL", 835.0), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_by_device_name(name, peak):
    import gpu_check

    assert gpu_check.peak_tflops(name) == peak


def test_a_failing_setup_skips_the_rest_of_its_part(tmp_path):
    import gpu_check

    run = gpu_check.Run(tmp_path / "g.json", 1e9, gpu_check.Device("cpu"), {})
    cases = [f"train_step/store/batch{b}" for b in BATCHES]

    def part():  # one case measured, then the part breaks (e.g. a package missing on the GPU machine)
        run.res["train_step"] = {"cases": [{"path": "store", "batch": 1}]}
        raise ModuleNotFoundError("No module named 'zarr'")

    gpu_check.guarded(run, cases, part)
    assert run.res["skipped"] == [
        {"case": c, "reason": "error before this case: ModuleNotFoundError: No module named 'zarr'"}
        for c in cases[1:]]
