"""The CUDA paths on the tiny models (``pytest -m gpu``; skipped without CUDA): stage one and two
and generate on a GPU, each checked against the same command on the CPU in float32 (the CPU paths
are what the rest of the suite tests)."""

import json

import numpy as np
import pytest
import torch

from stages.cli import main
from surpipe.store import FeatureStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _extract(sample_dir, store, llm, device, quant, name, dtype="auto"):
    assert main(["extract-llm", "--data", str(sample_dir), "--store", str(store), "--model", str(llm),
                 "--layers", "1,3", "--quant", quant, "--device", device, "--dtype", dtype, "--name", name,
                 "--block-rows", "16", "--no-progress"]) == 0
    return FeatureStore(store).group(f"llm/{name}").read("layer_3/pooled")


def test_stage_one_two_and_generate_on_cuda(tmp_path, tiny_models, sample_dir, capsys):
    store = tmp_path / "s.zarr"
    llm, sd = tiny_models / "llm", tiny_models / "sd"
    ref = _extract(sample_dir, store, llm, "cpu", "none", "cpu-fp32", "float32")
    fp32 = _extract(sample_dir, store, llm, "cuda", "none", "cuda-fp32", "float32")
    nf4 = _extract(sample_dir, store, llm, "cuda", "4bit", "cuda-nf4")
    int8 = _extract(sample_dir, store, llm, "cuda", "8bit", "cuda-int8")
    np.testing.assert_allclose(fp32, ref, rtol=1e-3, atol=1e-4)
    sims = {k: min(_cos(a, b) for a, b in zip(v, ref)) for k, v in (("nf4", nf4), ("int8", int8))}
    print("llm pooled features, lowest per-row cosine to CPU fp32:", sims)
    assert all(np.isfinite(v).all() for v in (nf4, int8)) and min(sims.values()) > 0.9

    for device in ("cpu", "cuda"):
        assert main(["encode-latents", "--data", str(sample_dir), "--store", str(store), "--model", str(sd),
                     "--device", device, "--name", f"enc-{device}", "--vae-name", f"enc-{device}",
                     "--no-progress"]) == 0
    st = FeatureStore(store)
    for kind, arr in (("clip", "simple"), ("vae", "mean")):
        a, b = st.group(f"{kind}/enc-cpu").read(arr), st.group(f"{kind}/enc-cuda").read(arr)
        assert np.isfinite(b).all() and _cos(a, b) > 0.999, (kind, _cos(a, b))

    runs = {}
    for device, extra in (("cpu", []), ("cuda", ["--mixed-precision", "bf16", "--compile-unet"])):
        out = tmp_path / f"run-{device}"
        assert main(["train", "--store", str(store), "--model", str(sd), "--out", str(out), "--llm-group",
                     "cuda-fp32", "--clip-group", "enc-cpu", "--vae-group", "enc-cpu", "--llm-layer", "3",
                     "--device", device, "--max-steps", "6", "--batch-size", "4", "--grad-accum", "1",
                     "--nhead", "4", "--dim-feedforward", "64", "--workers", "0", "--no-progress",
                     "--validation-every", "0", "--no-loss-curve", "--log-every", "1", *extra]) == 0
        runs[device] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {d: [r["loss"] for r in rows if "loss" in r] for d, rows in runs.items()}
    assert all(np.isfinite(losses["cuda"])) and len(losses["cuda"]) == 6
    # the same data, noise and timesteps (drawn on the CPU): bf16 moves the first loss by little
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=0.05), losses

    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(sd), "--adapter", str(tmp_path / "run-cuda"), "--prompt",
                 "a red cube", "--out", str(gen), "--device", "cuda", "--steps", "4", "--size", "64",
                 "--compare"]) == 0
    assert (gen / "compare_grid.png").is_file()


def test_the_train_loop_never_waits_on_the_gpu_between_sync_points(tmp_path, store, tiny_models, monkeypatch):
    """On CUDA, from the second step on, nothing between two sync points (the logging, checkpoint and
    last steps) blocks the host on the GPU: CUDA's sync debug mode raises on any synchronizing call
    (item/float/bool of a device tensor, a blocking copy to or from the GPU) from the start of a
    step's batch to its sync-point check; the sync points themselves read as they should."""
    from helpers.stores import _args
    from surpipe.train.recipe import TrainRecipe

    acc, sync = TrainRecipe._accumulate, TrainRecipe._sync_point
    watched, layouts = [], set()

    def accumulate(self, data):
        layouts.add(self.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last))
        if self.step >= 1:  # step 1 warms up: lazy optimizer state, the scheduler's tables, compile
            watched.append(self.step + 1)
            torch.cuda.set_sync_debug_mode("error")
        return acc(self, data)

    def sync_point(self):
        torch.cuda.set_sync_debug_mode(0)
        return sync(self)

    monkeypatch.setattr(TrainRecipe, "_accumulate", accumulate)
    monkeypatch.setattr(TrainRecipe, "_sync_point", sync_point)
    out = tmp_path / "run"
    try:
        rc = main([*_args(store, tiny_models / "sd", out, "--max-steps", "8", "--log-every", "4",
                          "--checkpoint-every", "100", "--min-snr-gamma", "5", "--mixed-precision", "bf16",
                          "--compile-unet", "--workers", "2"), "--device", "cuda"])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert rc == 0 and watched == list(range(2, 9))
    # compiled, the UNet keeps its layout (inductor's channels-last gradient fault: docs/reliability.md)
    assert layouts == {False}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 8]


def test_read_ahead_on_a_side_stream_hands_over_the_batches_the_cpu_reads(store):
    """DevicePrefetcher on CUDA: each batch staged on the side stream while the main stream is busy
    (a long matmul queued first) equals the CPU's staging of the same batch, in the same order, with
    the same positions: the main stream waited for the copies, and their memory was not reused early."""
    from surpipe.train.data import SampleStream
    from surpipe.train.prefetch import DevicePrefetcher
    from surpipe.train.setup import stage_batch
    from helpers.stores import block_reader

    reader = block_reader(store)
    cpu = DevicePrefetcher(SampleStream(reader, 5, seed=2), lambda b: stage_batch(b, "cpu"), "cpu")
    dev = torch.device("cuda")
    gpu = DevicePrefetcher(SampleStream(reader, 5, seed=2), lambda b: stage_batch(b, dev), dev)
    busy = torch.randn(4096, 4096, device=dev)
    for i in range(12):
        want, got = next(cpu), next(gpu)
        assert got.position == want.position
        for k, v in want.staged.items():
            if isinstance(v, torch.Tensor):
                assert got.staged[k].is_cuda
                torch.testing.assert_close(got.staged[k].cpu(), v, rtol=0, atol=0, msg=f"{k} of batch {i}")
        busy = busy @ busy / 64  # keeps the main stream busy while the next batch is copied
        gpu.prefetch()
    torch.cuda.synchronize()


def test_unet_fp8_trains_the_bf16_adapter_within_the_stated_tolerance(tmp_path, store, tiny_models, monkeypatch):
    """--unet-fp8 with the real float8 kernels (torch._scaled_mm) against bf16 on the GPU, with the
    tolerance the CPU's emulated casts are held to (tests/train/test_train_fp8.py)."""
    pytest.importorskip("torchao")
    from helpers.fp8 import LOSS_RTOL, UPDATE_RTOL, fp8_against_bf16
    from surpipe.train.fp8 import FP8_CAPABILITY

    if torch.cuda.get_device_capability() < FP8_CAPABILITY:
        pytest.skip(f"float8 matmuls need compute capability {FP8_CAPABILITY}")
    d = fp8_against_bf16(tmp_path, store, tiny_models / "sd", monkeypatch, device="cuda", controls=False)
    print("distance to bf16 (loss, update):", d)
    assert 0 < d["fp8"][0] <= LOSS_RTOL and d["fp8"][1] <= UPDATE_RTOL


def test_inductor_gives_the_eager_gradient_for_the_adapter_on_cuda(tiny_models):
    """torch 2.13's inductor got the UNet's conditioning gradient 53% off with channels-last layouts on
    a CPU (docs/reliability.md): --compile-unet compiles without them. float32: only TF32
    convolutions and fusion rounding separate the two. Also prints what channels-last with
    inductor's defaults gives on this GPU (whether the fault is the GPU's too), and checks the eager
    channels-last UNet that ``load_unet`` gives a CUDA run without --compile-unet."""
    from types import SimpleNamespace

    from surpipe.train.compile_check import CheckedCompiledUNet, _gradient, relative_distance
    from surpipe.train.setup import Runtime, load_unet, unet_for_loss

    cfg = SimpleNamespace(model=str(tiny_models / "sd"), revision=None, gradient_checkpointing=False,
                          compile_unet=True, compile_mode="default", unet_fp8=False)
    unet = load_unet(cfg, Runtime(None, torch.device("cuda"), torch.float32, "no"))
    c = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, c.in_channels, c.sample_size, c.sample_size, generator=g).cuda()
    e = torch.randn(4, 77, c.cross_attention_dim, generator=g).cuda().requires_grad_(True)  # as the adapter's output
    t = torch.tensor([10, 300, 600, 900]).cuda()
    torch._dynamo.reset()
    checked = unet_for_loss(unet, cfg)
    checked(x, t, e)
    torch._dynamo.reset()
    contiguous = _gradient(unet, x, t, e, {})
    channels_last = unet.to(memory_format=torch.channels_last)
    eager_cl = relative_distance(_gradient(channels_last, x, t, e, {}), contiguous)
    raw = CheckedCompiledUNet(torch.compile(channels_last), channels_last, rtol=float("inf"))
    raw(x, t, e)
    print(f"conditioning gradient, compiled against eager: --compile-unet {checked.distance:.2e}; "
          f"channels-last with inductor's defaults {raw.distance:.2e}; eager channels-last against eager "
          f"contiguous {eager_cl:.2e}")
    assert checked.distance < 1e-2 and eager_cl < 1e-2
