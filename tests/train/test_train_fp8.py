"""`surpipe train --unet-fp8`: torchao float8 matmuls in the frozen UNet's attention layers. On a CPU
the casts are emulated (the same float8 rounding, high-precision matmuls): these tests check the
numerics that way; tests/test_gpu.py runs the real kernels on a GPU of compute capability 8.9+.

The tolerance (docs/performance.md): after 6 steps of the denoising loss alone (learning rate 1e-3),
the fp8 run's per-step losses are within 0.2% of the bf16 run's and its adapter update (trained
minus initial weights) differs from bf16's by at most 35% of that update's norm. float32 against
bf16 passes the same check, and a real change of the objective (Min-SNR weighting) fails it."""

import copy

import pytest
import torch

from helpers.fp8 import LOSS_RTOL, UPDATE_RTOL, fp8_against_bf16
from stages.cli import main

pytest.importorskip("torchao")


def test_fp8_trains_the_bf16_adapter_within_the_stated_tolerance(tmp_path, store, tiny_models, monkeypatch):
    d = fp8_against_bf16(tmp_path, store, tiny_models / "sd", monkeypatch)
    print("distance to bf16 (loss, update):", d)
    assert d["fp8"][0] > 0  # the fp8 casts really ran: not the bf16 numbers again
    assert d["fp8"][0] <= LOSS_RTOL and d["fp8"][1] <= UPDATE_RTOL
    assert d["fp32"][0] <= LOSS_RTOL and d["fp32"][1] <= UPDATE_RTOL  # the tolerance is precision noise...
    assert d["min_snr"][0] > LOSS_RTOL and d["min_snr"][1] > UPDATE_RTOL  # ...and a real change fails it


@pytest.mark.slow
def test_fp8_compiled_by_inductor_trains_the_bf16_adapter_within_the_stated_tolerance(tmp_path, store, tiny_models,
                                                                                      monkeypatch):
    # what --compile-unet runs on a GPU: inductor's kernels around torchao's float8 casts (3 min here)
    d = fp8_against_bf16(tmp_path, store, tiny_models / "sd", monkeypatch, controls=False, backend="inductor")
    print("distance to bf16 (loss, update):", d)
    assert 0 < d["fp8"][0] <= LOSS_RTOL and d["fp8"][1] <= UPDATE_RTOL


def test_float8_unet_converts_the_attention_linears_only(tiny_models):
    from diffusers import UNet2DConditionModel
    from torchao.float8.float8_linear import Float8Linear

    from surpipe.train.fp8 import float8_copy, float8_unet

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sd", subfolder="unet", torch_dtype=torch.bfloat16)
    linears = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    # widths 32..256, all multiples of 16; the cross-attention keys and values see batch x 77 rows
    attention = {n for n in linears if "attentions" in n.split(".") and n.split(".")[-2:] not in (
        ["attn2", "to_k"], ["attn2", "to_v"])}
    assert attention and linears - attention  # the tiny UNet has both kinds (time embedding, resnets)
    assert any(n.endswith("attn2.to_q") for n in attention) and not any(n.endswith("attn2.to_k") for n in attention)
    fp8 = copy.deepcopy(unet)
    assert float8_unet(fp8, emulate=True) == len(attention)
    assert {n for n, m in fp8.named_modules() if isinstance(m, Float8Linear)} == attention
    twin = float8_copy(unet, emulate=True)  # what the loss calls: the same weights, the UNet untouched
    assert {n for n, m in twin.named_modules() if isinstance(m, Float8Linear)} == attention
    assert not any(isinstance(m, Float8Linear) for m in unet.modules())
    assert all(a is b for a, b in zip(twin.parameters(), unet.parameters()))
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g).bfloat16()
    e = torch.randn(2, 77, c.cross_attention_dim, generator=g).bfloat16()
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref, out = unet(x, t, e).sample.float(), fp8(x, t, e).sample.float()
    rel = float((out - ref).norm() / ref.norm())
    assert 1e-4 < rel < 0.05, rel  # float8 rounding: a few percent of the output, not nothing


def test_unet_fp8_is_refused_with_every_reason_at_once(tmp_path, store, tiny_models, capsys):
    code = main(["train", "--store", str(store), "--model", str(tiny_models / "sd"), "--out", str(tmp_path / "r"),
                 "--device", "cpu", "--llm-layer", "3", "--unet-fp8", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "--compile-unet --mixed-precision bf16" in err  # the options it needs
    assert "compute capability 8.9" in err and "'cpu'" in err  # and the GPU it needs
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_fp8_problem_names_the_gpu_and_what_it_needs(monkeypatch):
    import importlib.util

    from surpipe.train import fp8

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU{i}")
    for cap, ok in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, c=cap: c)
        for device in ("auto", "cuda", "cuda:1"):
            problem = fp8.fp8_problem(device)
            assert (problem is None) == ok, (cap, device, problem)
            if not ok:
                index = 1 if device == "cuda:1" else 0
                assert f"GPU{index} has compute capability {cap[0]}.{cap[1]}" in problem and "H100" in problem
    assert "'cpu'" in fp8.fp8_problem("cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    assert "pip install 'surpipe[fp8]'" in fp8.fp8_problem("cuda")
