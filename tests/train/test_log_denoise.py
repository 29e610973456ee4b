"""``--log-denoise-every``: on the authors' gradient path the UNet runs only for the logged denoising
term (first and every N-th step); the adapter is identical to the full computation's."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_cli


def _train(store, sd, out, *extra):
    return run_cli("train", "--store", store, "--model", sd, "--llm-layer", "3", "--out", out, "--batch-size", "2",
                   "--grad-accum", "2", "--workers", "0", "--no-progress", "--device", "cpu", "--nhead", "4",
                   "--dim-feedforward", "64", "--checkpoint-every", "100", "--max-steps", "6", "--llm-weight", "1",
                   "--prompt-weight", "1", *extra)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_skipping_the_unet_leaves_the_adapter_identical(store, tiny_models, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    calls = []
    forward = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", lambda self, *a, **k: (calls.append(1), forward(self, *a, **k))[1])
    sd = tiny_models / "sd"
    full, skip = tmp_path / "full", tmp_path / "skip"
    rc, _, err = _train(store, sd, full, "--gradient-path", "authors", "--log-denoise-every", "1")
    assert rc == 0, err
    n_full, calls[:] = len(calls), []
    rc, _, err = _train(store, sd, skip, "--gradient-path", "authors", "--log-denoise-every", "3")
    assert rc == 0, err
    assert n_full == 12 and len(calls) == 3 * 2  # steps 1, 3, 6, two micro-batches each
    a, b = _rows(full), _rows(skip)
    assert [r["denoise"] is not None for r in b] == [True, False, True, False, False, True]
    for ra, rb in zip(a, b):
        assert (ra["llm"], ra["prompt"], ra["grad_norm"]) == (rb["llm"], rb["prompt"], rb["grad_norm"])
        if rb["denoise"] is not None:
            assert (ra["denoise"], ra["loss"]) == (rb["denoise"], rb["loss"])
        else:
            # the logged total is the float32 sum of the logged terms: one rounding (eps 1.2e-7)
            assert rb["loss"] == pytest.approx(rb["llm"] + rb["prompt"], rel=1e-6)
    wa, wb = load_file(str(full / "adapter/model.safetensors")), load_file(str(skip / "adapter/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (skip / "loss_curve.png").is_file() and "denoise -" in (skip / "train.log").read_text()


def test_the_paper_path_always_computes_the_denoising_term(store, tiny_models, tmp_path):
    rc, _, err = _train(store, tiny_models / "sd", tmp_path / "p", "--log-denoise-every", "3")
    assert rc == 0, err
    assert all(r["denoise"] is not None for r in _rows(tmp_path / "p"))


def test_skipping_on_the_paper_path_is_refused_in_the_library(store, tiny_models, tmp_path):
    from types import SimpleNamespace

    from surpipe.train.losses import composed_loss

    with pytest.raises(ValueError):
        b = {"latents": torch.zeros(1, 4, 8, 8), "clip_simple": torch.zeros(1, 77, 32), "clip_complex": torch.zeros(1, 77, 32),
             "llm": torch.zeros(1, 8)}
        composed_loss(b, adapter=lambda x, return_aux: (x, x, x), projection=lambda v: torch.zeros(1, 32), unet=None,
                      scheduler=SimpleNamespace(config=SimpleNamespace(num_train_timesteps=10),
                                                add_noise=lambda l, n, t: l),
                      generator=torch.Generator().manual_seed(0), cfg=SimpleNamespace(
                          gradient_path="paper", noise_offset=0, prompt_target="out", llm_weight=1, prompt_weight=1),
                      prediction_type="epsilon", denoise=False)
