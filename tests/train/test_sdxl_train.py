"""Training on SDXL from the store: a UNet-only SDXL folder, the added conditioning (the pooled
embedding and the time ids) built as diffusers' SDXL training example builds them, exact resume,
held-out validation, ``--pooled aligned``, and clear refusals when store and UNet disagree."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from helpers import REPO, run_cli, run_cli_err
from helpers.stores import unet_only_folder

STEPS = 4


@pytest.fixture(scope="module")
def xl_store(tiny_models, tmp_path_factory):
    """The bundled sample encoded with the tiny SDXL (and the tiny LLM's layer 3)."""
    store = tmp_path_factory.mktemp("xltrain") / "s.zarr"
    data = REPO / "data" / "sample"
    assert run_cli_err("extract-llm", "--data", data, "--store", store, "--model", tiny_models / "llm", "--layers",
                       "3", "--quant", "none", "--no-progress", "--block-rows", "16")[0] == 0
    rc, err = run_cli_err("encode-latents", "--data", data, "--store", store, "--model", tiny_models / "sdxl",
                          "--workers", "0", "--no-progress", "--flip")
    assert rc == 0, err
    return store


def _train(store, model, out, *extra):
    return run_cli("train", "--store", store, "--model", model, "--llm-layer", "3", "--out", out, "--batch-size",
                   "2", "--grad-accum", "1", "--workers", "0", "--no-progress", "--device", "cpu", "--nhead", "4",
                   "--dim-feedforward", "64", "--checkpoint-every", "100", "--no-loss-curve", *extra)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_time_ids_follow_diffusers_sdxl_example():
    """original (h, w) + crop (top, left) + target (R, R); a flipped row's left offset is R - left,
    as the example records it after flipping the cropped square."""
    from surpipe.train.setup import sdxl_conditioning

    batch = {"original_size": np.array([[100, 200], [300, 50]], np.int32),
             "crop_top_left": np.array([[0, 10], [5, 0]], np.int32),
             "pooled_simple": np.ones((2, 3), np.float32), "pooled_complex": np.zeros((2, 3), np.float32)}
    got = sdxl_conditioning(batch, torch.tensor([True, False]), 64)
    assert got["time_ids"].tolist() == [[100, 200, 0, 54, 64, 64], [300, 50, 5, 0, 64, 64]]
    assert got["time_ids"].tolist() == sdxl_conditioning(batch, torch.tensor([True, False]), 64)["time_ids"].tolist()
    none = sdxl_conditioning(batch, None, 64)["time_ids"]
    assert none[:, 3].tolist() == [10, 0]


def test_sdxl_trains_from_a_unet_only_folder_with_the_added_conditioning(xl_store, tiny_models, tmp_path,
                                                                          monkeypatch):
    from diffusers import UNet2DConditionModel

    from surpipe.store import FeatureStore

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=None, **kw):
        seen.append({k: v.detach().clone() for k, v in (added_cond_kwargs or {}).items()})
        return forward(self, sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=added_cond_kwargs, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    model = unet_only_folder(tiny_models, tmp_path / "xl-unet-only", "sdxl")
    out = tmp_path / "run"
    rc, printed, err = _train(xl_store, model, out, "--max-steps", STEPS, "--val-rows", "8")
    assert rc == 0, err
    rows = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "denoise", "llm", "prompt"))
    val = [r for r in _metrics(out) if "val/prompt" in r]
    assert [r["step"] for r in val] == [0, STEPS] and all(np.isfinite(v) for r in val for v in r.values())
    # every UNet call had SDXL's added conditioning: the simple prompts' pooled embeddings (stored rows)
    # and time ids = stored original size + crop (or its mirror) + the training resolution
    fs = FeatureStore(xl_store)
    clip = fs.group(next(p for p in fs.group_paths("clip")))
    vae = fs.group(next(p for p in fs.group_paths("vae")))
    pooled = clip.read("simple_pooled").astype(np.float32)
    orig, crop = vae.read("original_size"), vae.read("crop_top_left")
    R = vae.settings["resolution"]
    assert seen and all(set(s) == {"text_embeds", "time_ids"} for s in seen)
    for s in seen:
        for p, t in zip(s["text_embeds"].numpy(), s["time_ids"].numpy()):
            row = int(np.argmin(np.abs(pooled - p).sum(1)))
            assert np.allclose(pooled[row], p, atol=1e-6)  # stored float32 values passed through: equal
            assert t[:2].tolist() == orig[row].tolist() and t[4:].tolist() == [R, R]
            assert t[2:4].tolist() in (crop[row].tolist(), [crop[row][0], R - crop[row][1]])
    from surpipe.adapter import SURAdapter

    ad = SURAdapter.from_pretrained(out / "adapter")
    assert ad.config.width == 64 and ad.config.pooled_width is None  # D1 + D2 of the tiny SDXL


def test_sdxl_resume_equals_straight_run(xl_store, tiny_models, tmp_path):
    from safetensors.torch import load_file

    model = tiny_models / "sdxl"
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert _train(xl_store, model, a, "--max-steps", "4")[0] == 0
    assert _train(xl_store, model, b, "--max-steps", "2")[0] == 0
    assert _train(xl_store, model, b, "--max-steps", "4")[0] == 0
    keys = ("loss", "denoise", "llm", "prompt", "grad_norm")
    assert [[r[k] for k in keys] for r in _metrics(a)] == [[r[k] for k in keys] for r in _metrics(b)]
    wa, wb = load_file(str(a / "adapter/model.safetensors")), load_file(str(b / "adapter/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_pooled_aligned_trains_a_pooled_head(xl_store, tiny_models, tmp_path):
    from surpipe.adapter import SURAdapter

    out = tmp_path / "aligned"
    rc, _, err = _train(xl_store, tiny_models / "sdxl", out, "--max-steps", "3", "--pooled", "aligned",
                        "--prompt-weight", "1", "--learning-rate", "1e-3", "--val-rows", "8",
                        "--validation-every", "3", "--validation-steps", "2", "--validation-prompts", "a red cube")
    assert rc == 0, err
    assert (out / "validation" / "step-00000003.png").is_file()  # the grid, rendered by the SDXL pipeline
    ad = SURAdapter.from_pretrained(out / "adapter")
    assert ad.config.pooled_width == 32
    assert ad.pooled_head[2].weight.abs().sum() > 0  # left zero-initialised, then trained
    p = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.allclose(ad.pool(p), p + ad.pooled_head(p))
    # eval --store on an SDXL run: the held-out path with the pooled head
    rc, printed, err = run_cli("eval", "--store", xl_store, "--adapter", out, "--no-clip-score", "--device", "cpu",
                               "--out", tmp_path / "ev")
    assert rc == 0, err
    assert "the run's held-out rows: 8 rows" in printed
    last = [r for r in _metrics(out) if "val/prompt" in r][-1]  # the final adapter, as training evaluated it
    got = json.loads((tmp_path / "ev" / "held_out.json").read_text())["categories"]["all"]
    for k in ("val/denoise", "val/prompt", "val/llm", "val/prompt_baseline"):
        assert np.isclose(got[k], last[k], rtol=1e-5), k  # eval recomputes training's float32 terms


def test_mismatched_store_and_unet_are_refused_clearly(xl_store, store, tiny_models, tmp_path):
    rc, _, err = _train(xl_store, tiny_models / "sd", tmp_path / "a", "--max-steps", "1")
    assert rc == 1 and "Traceback" not in err and "SDXL" in err
    rc, _, err = _train(store, tiny_models / "sdxl", tmp_path / "b", "--max-steps", "1")
    assert rc == 1 and "Traceback" not in err and "SDXL" in err
    rc, _, err = _train(store, tiny_models / "sd", tmp_path / "c", "--max-steps", "1", "--pooled", "aligned")
    assert rc == 1 and "--pooled aligned" in err


def test_pooled_aligned_on_the_authors_path_trains_the_head_on_skipped_steps_too(xl_store, tiny_models, tmp_path):
    """--log-denoise-every skips only the UNet: the pooled head's KL is part of every step, so the
    adapter (head included) equals the full computation's."""
    from safetensors.torch import load_file

    runs = {}
    for every in ("1", "3"):
        out = tmp_path / f"every{every}"
        rc, _, err = _train(xl_store, tiny_models / "sdxl", out, "--max-steps", "4", "--pooled", "aligned",
                            "--gradient-path", "authors", "--log-denoise-every", every, "--prompt-weight", "1",
                            "--learning-rate", "1e-3", "--dropout", "0")
        assert rc == 0, err
        runs[every] = load_file(str(out / "adapter" / "model.safetensors"))
    a, b = runs["1"], runs["3"]
    assert any(k.startswith("pooled_head") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["pooled_head.2.weight"].abs().sum() > 0
