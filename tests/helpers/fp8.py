"""The fp8-against-bf16 comparison of ``surpipe train --unet-fp8`` (tests/train/test_train_fp8.py on
the CPU with emulated casts, tests/test_gpu.py with the real kernels): the tolerance is stated there."""

import json

import torch
from safetensors.torch import load_file

from stages.cli import main

LOSS_RTOL, UPDATE_RTOL = 2e-3, 0.35
ARGS = ["--llm-layer", "3", "--batch-size", "4", "--grad-accum", "1", "--workers", "0", "--no-progress",
        "--dim-feedforward", "64", "--nhead", "4", "--max-steps", "6", "--learning-rate", "1e-3",
        "--prompt-weight", "0", "--llm-weight", "0", "--checkpoint-every", "100", "--no-loss-curve",
        "--validation-every", "0", "--mixed-precision", "bf16", "--compile-unet"]


def _train(store, sd, out, *extra, device="cpu"):
    assert main(["train", "--store", str(store), "--model", str(sd), "--out", str(out), "--device", device,
                 *ARGS, *extra]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(out / "adapter" / "model.safetensors"))
    return [r["denoise"] for r in rows if "denoise" in r], torch.cat([weights[k].flatten().float() for k in sorted(weights)])


def distance(run, ref, init) -> tuple[float, float]:
    """(largest relative per-step loss difference, |update - ref update| / |ref update|)."""
    (losses, w), (ref_losses, ref_w) = run, ref
    assert len(losses) == len(ref_losses) == 6
    loss = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    return loss, float((w - ref_w).norm() / (ref_w - init[1]).norm())


def fp8_against_bf16(tmp_path, store, sd, monkeypatch, device="cpu", controls=True, backend="aot_eager") -> dict:
    """The distances to the bf16 run of: fp8, and (controls) float32 and Min-SNR weighting; the UNet
    compiled with ``backend``."""
    from surpipe.train import recipe as R
    from surpipe.train import setup as S

    # aot_eager traces what inductor would compile, without code generation (minutes on a CPU)
    monkeypatch.setattr(S, "COMPILE_BACKEND", backend)
    if device == "cpu":  # emulated casts: the GPU check is what a CPU fails
        monkeypatch.setattr(R, "_fp8_problem", lambda device: None)
    cases = {"bf16": [], "fp8": ["--unet-fp8"], "init": ["--learning-rate", "1e-12", "--max-steps", "1", "--no-compile-unet"]}
    if controls:
        cases.update(fp32=["--mixed-precision", "no"], min_snr=["--min-snr-gamma", "5"])
    runs = {}
    for name, extra in cases.items():
        torch._dynamo.reset()
        runs[name] = _train(store, sd, tmp_path / name, *extra, device=device)
    # the init run's single step at lr 1e-12 moves no weight by more than ~1e-12: the initial adapter
    init = runs.pop("init")
    return {name: distance(run, runs["bf16"], init) for name, run in runs.items() if name != "bf16"}
