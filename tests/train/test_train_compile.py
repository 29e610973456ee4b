"""`surpipe train --compile-unet`: the training loss runs through ``torch.compile`` of the frozen UNet
and trains the same adapter as the eager UNet (a compiled graph that changed the arithmetic, or a
flag that compiled nothing, fails here)."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from stages.cli import main
from surpipe.errors import SurpipeError

ARGS = ["--llm-layer", "3", "--batch-size", "2", "--grad-accum", "1", "--workers", "0", "--no-progress",
        "--device", "cpu", "--dim-feedforward", "64", "--nhead", "4", "--max-steps", "3", "--learning-rate", "1e-3",
        "--prompt-weight", "1", "--llm-weight", "1", "--checkpoint-every", "100", "--no-loss-curve",
        "--validation-every", "0"]


def _train(store, sd, out, *extra):
    assert main(["train", "--store", str(store), "--model", str(sd), "--out", str(out), *ARGS, *extra]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], load_file(str(out / "adapter" / "model.safetensors"))


def _compare(tmp_path, store, tiny_models, monkeypatch, backend, weight_atol=1e-5):
    from surpipe.train import setup as train_setup

    monkeypatch.setattr(train_setup, "COMPILE_BACKEND", backend)
    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: calls.append((type(m).__name__, k)) or real(m, **k))
    eager_losses, eager = _train(store, tiny_models / "sd", tmp_path / "eager")
    assert calls == []  # off by default
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    comp_losses, comp = _train(store, tiny_models / "sd", tmp_path / "compiled", "--compile-unet")
    assert [c[0] for c in calls] == ["UNet2DConditionModel"] and calls[0][1]["backend"] == backend
    # the loss really ran the compiled module: dynamo captured at least one graph of it
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert len(comp_losses) == len(eager_losses) == 3
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
    assert set(comp) == set(eager)
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=weight_atol)
    cfg = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert cfg.get("compile_unet") is True or cfg.get("running", {}).get("compile_unet") is True


def test_compiled_unet_trains_the_same_adapter(tmp_path, store, tiny_models, monkeypatch):
    # aot_eager traces forward and backward graphs as inductor does, without generating kernels
    _compare(tmp_path, store, tiny_models, monkeypatch, "aot_eager")


@pytest.mark.slow
def test_inductor_compiled_unet_trains_the_same_adapter(tmp_path, store, tiny_models, monkeypatch):
    # inductor fuses and reorders float arithmetic: losses agree to 1e-4, but AdamW divides each
    # gradient by its own running RMS, so rounding noise in near-zero gradients becomes weight
    # differences of the order of the learning rate (1e-3) times the 3 steps
    _compare(tmp_path, store, tiny_models, monkeypatch, "inductor", weight_atol=3e-3)


def test_a_failing_compiler_is_one_line_naming_the_flag(tmp_path, store, tiny_models, monkeypatch, capsys):
    """A machine where inductor cannot build (no C++ compiler on a CPU box) gets one line that names
    --compile-unet, not a traceback."""
    from torch._dynamo.exc import BackendCompilerFailed

    from surpipe.train import setup as train_setup

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(train_setup, "COMPILE_BACKEND", broken_backend)
    torch._dynamo.reset()
    code = main(["train", "--store", str(store), "--model", str(tiny_models / "sd"), "--out", str(tmp_path / "r"),
                 *ARGS, "--compile-unet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "torch.compile failed" in err and "--compile-unet" in err, err
    assert BackendCompilerFailed.__module__.startswith("torch._dynamo")


def test_compile_mode_reaches_torch_compile_and_needs_compile_unet(monkeypatch):
    """--compile-mode (CUDA graphs: reduce-overhead, max-autotune) is passed to inductor's
    torch.compile; without --compile-unet it is refused, naming the fix."""
    from surpipe.train import setup as train_setup
    from surpipe.train.config import TrainConfig

    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **k: seen.append(k) or m)
    base = dict(store="s.zarr", model="m", out="o", llm_layer=3)
    # a mode travels as its inductor options (torch.compile takes a mode or options, not both); the
    # layout optimisation is off (compile_check's fault)
    off = {"layout_optimization": False}
    for mode, want in (("default", off), ("reduce-overhead", {"triton.cudagraphs": True, **off})):
        cfg = TrainConfig(**base, compile_unet=True, compile_mode=mode)
        assert cfg.problems() == []
        unet = SimpleNamespace(device=torch.device("cpu"))
        checked = train_setup.unet_for_loss(unet, cfg)
        assert checked.compiled is unet and checked.eager is unet
        assert seen.pop() == {"backend": "inductor", "options": want}
    problems = TrainConfig(**base, compile_mode="max-autotune").problems()
    assert any("compile_mode" in p and "--compile-unet" in p for p in problems)
    from surpipe.config import from_dict

    with pytest.raises(SurpipeError, match="'default', 'reduce-overhead', 'max-autotune'"):
        from_dict(TrainConfig, {**base, "compile_mode": "fast"})


class _HalfGradient(torch.autograd.Function):
    """Identity forward, half the gradient: a compiled UNet whose loss is right and gradient wrong."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 0.5


def test_a_compiled_unet_with_a_wrong_gradient_is_refused_at_the_first_step(tmp_path, store, tiny_models, monkeypatch,
                                                                            capsys):
    """The first step compares the compiled UNet's gradient for the adapter's output with the eager
    UNet's; a compiled graph that gets it wrong stops the run before anything is trained."""
    def miscompiled(unet, **kwargs):
        return lambda sample, t, cond, **kw: unet(sample, t, _HalfGradient.apply(cond), **kw)

    monkeypatch.setattr(torch, "compile", miscompiled)
    out = tmp_path / "run"
    code = main(["train", "--store", str(store), "--model", str(tiny_models / "sd"), "--out", str(out), *ARGS,
                 "--compile-unet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "the compiled UNet's gradient for the adapter's output is 50% off the eager UNet's" in err
    assert "Rerun without --compile-unet" in err
    assert not list(out.glob("checkpoint*")) and not (out / "adapter").exists()
    monkeypatch.undo()  # the advice works: the same command without --compile-unet, on the same --out
    assert main(["train", "--store", str(store), "--model", str(tiny_models / "sd"), "--out", str(out), *ARGS]) == 0
    assert (out / "adapter" / "model.safetensors").exists()


def test_the_gradient_distance_refuses_what_is_not_finite():
    from surpipe.train.compile_check import relative_distance

    a = torch.ones(3)
    assert relative_distance(a, a) == 0 and relative_distance(a * 1.1, a) == pytest.approx(0.1)
    assert relative_distance(a * float("nan"), a) == float("inf") and relative_distance(a, a * 0) == float("inf")
    assert relative_distance(a * 0, a * 0) == 0


@pytest.mark.slow
def test_inductor_gives_the_eager_gradient_for_the_adapter(tiny_models):
    """torch 2.13's inductor on a CPU got the UNet's gradient with respect to the conditioning 53% off
    with its channels-last layout optimisation (forward right); --compile-unet turns that off, and the
    check it runs measures the distance (float32: rounding only)."""
    from diffusers import UNet2DConditionModel

    from surpipe.train.setup import unet_for_loss

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sd", subfolder="unet").eval().requires_grad_(False)
    c = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, c.in_channels, c.sample_size, c.sample_size, generator=g)
    e = torch.randn(4, 77, c.cross_attention_dim, generator=g).requires_grad_(True)  # as the adapter's output
    torch._dynamo.reset()
    checked = unet_for_loss(unet, SimpleNamespace(compile_unet=True, compile_mode="default"))
    checked(x, torch.tensor([10, 300, 600, 900]), e)
    assert checked.distance < 1e-4
