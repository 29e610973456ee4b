"""Stage two: `surpipe train` from a store, on the tiny SD UNet (CPU, fp32)."""

import json
import shutil

import numpy as np
import pytest
from helpers.stores import make_store, _args, _metrics, unet_only_folder
import torch

from helpers import SyntheticDataset
from stages.cli import main
from surpipe.store import ArraySpec, FeatureStore


def test_train_runs_from_unet_only_folder_and_writes_everything(tmp_path, store, tiny_models, capsys):
    sd = unet_only_folder(tiny_models, tmp_path / "sd-unet-only")
    out = tmp_path / "run"
    assert main(_args(store, sd, out, "--max-steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "1")) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    from surpipe import SURAdapter

    ad = SURAdapter.from_pretrained(out / "adapter")
    assert ad.config.width == 32 and ad.config.token_mixing == "sequence"
    assert (out / "adapter" / "llm_projection.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]  # keep the last 1
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "denoise", "llm", "prompt", "lr", "grad_norm", "data_wait_s", "samples_per_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert (out / "loss_curve.png").is_file() and (out / "train.log").read_text().count("step ") >= 4
    saved = json.loads((out / "config.json").read_text())
    assert saved["llm_layer"] == 3 and saved["learning_rate"] == 1e-5 and saved["_surpipe"]["config"] == "TrainConfig"
    # the saved config reruns the same training: finished, nothing to do
    assert main(["train", "--config", str(out / "config.json")]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_resume_equals_straight_run(tmp_path, store, tiny_models):
    sd = tiny_models / "sd"
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert main(_args(store, sd, a, "--max-steps", "6", "--checkpoint-every", "100")) == 0
    assert main(_args(store, sd, b, "--max-steps", "3", "--checkpoint-every", "100")) == 0
    assert main(_args(store, sd, b, "--max-steps", "6", "--checkpoint-every", "100")) == 0
    la = [(r["loss"], r["denoise"], r["llm"], r["prompt"], r["grad_norm"]) for r in _metrics(a)]
    lb = [(r["loss"], r["denoise"], r["llm"], r["prompt"], r["grad_norm"]) for r in _metrics(b)]
    assert [r["step"] for r in _metrics(b)] == [1, 2, 3, 4, 5, 6]
    assert la == lb  # identical, not close: the resumed run replays the same samples, noise and dropout
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter/model.safetensors")), load_file(str(b / "adapter/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_paths(tmp_path, store, tiny_models):
    """paper: the denoising loss reaches the adapter through the frozen UNet; authors: it does not."""
    from surpipe.train.config import TrainConfig
    from surpipe.train.recipe import TrainRecipe
    from surpipe.train.data import BlockReader, SampleStream

    grads = {}
    for path in ("paper", "authors"):
        cfg = TrainConfig(store=str(store), model=str(tiny_models / "sd"), out=str(tmp_path / path), llm_layer=3,
                          gradient_path=path, workers=0, device="cpu", nhead=4, dim_feedforward=64,
                          llm_weight=0.0, prompt_weight=0.0, dropout=0.0, progress=False)
        r = TrainRecipe(cfg)
        r.setup()
        batch = next(iter(SampleStream(BlockReader(str(store), r.groups, 8), 2, seed=0)))
        losses = r.loss(r._batch_to_tensors(batch))
        losses["loss"].backward()
        fc = r.adapter.fc.weight.grad
        grads[path] = 0.0 if fc is None else float(fc.abs().sum())
        assert all(p.grad is None for p in r.unet.parameters())  # the UNet stays frozen
    assert grads["paper"] > 0 and grads["authors"] == 0.0


def test_gradient_checkpointing_really_recomputes(tmp_path, store, tiny_models):
    from surpipe.train.config import TrainConfig
    from surpipe.train.recipe import TrainRecipe
    from surpipe.train.data import BlockReader, SampleStream

    counts = {}
    for gc in (False, True):
        cfg = TrainConfig(store=str(store), model=str(tiny_models / "sd"), out=str(tmp_path / f"gc{gc}"), llm_layer=3,
                          gradient_checkpointing=gc, workers=0, device="cpu", nhead=4, dim_feedforward=64,
                          progress=False)
        r = TrainRecipe(cfg)
        r.setup()
        n = {"calls": 0}
        block = r.unet.up_blocks[-1].resnets[-1]
        orig = block.forward

        def counting_forward(*a, **k):  # forward hooks are muted during recompute; forward is not
            n["calls"] += 1
            return orig(*a, **k)

        block.forward = counting_forward
        batch = next(iter(SampleStream(BlockReader(str(store), r.groups, 8), 2, seed=0)))
        r.loss(r._batch_to_tensors(batch))["loss"].backward()
        counts[gc] = n["calls"]
    # the last up-block resnet (downstream of the mid-block cross-attention, so on the gradient
    # path) runs again in the backward pass
    assert counts == {False: 1, True: 2}


def test_loss_decreases_with_higher_lr(tmp_path, store, tiny_models):
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "30", "--learning-rate", "3e-3",
                      "--dropout", "0", "--llm-weight", "1", "--prompt-weight", "1", "--checkpoint-every", "100",
                      "--no-loss-curve")) == 0
    rows = _metrics(out)
    first = np.mean([r["llm"] + r["prompt"] for r in rows[:5]])
    last = np.mean([r["llm"] + r["prompt"] for r in rows[-5:]])
    assert last < 0.8 * first


def test_refuses_bad_setups_listing_every_problem(tmp_path, tiny_models, capsys):
    make_store(tmp_path / "inc.zarr", complete=False, width=48)
    args = ["train", "--store", str(tmp_path / "inc.zarr"), "--model", str(tiny_models / "sd"), "--llm-layer", "7",
            "--out", str(tmp_path / "run"), "--nhead", "5"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "cannot start training" in err
    assert "has no layer 7 (stored layers: [1, 3])" in err
    assert "llm/tiny is incomplete" in err and "clip/sd is incomplete" in err
    assert "width mismatch" in err and "cross_attention_dim 32" in err
    assert "nhead 5 does not divide" in err  # option ranges are refused earlier: test_train_options.py
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything is written

    # unknown options and a missing store are reported too
    assert main(["train", "--store", str(tmp_path / "nope.zarr"), "--model", str(tiny_models / "sd"),
                 "--llm-layer", "1", "--out", str(tmp_path / "r2")]) == 1
    assert "feature store not found" in capsys.readouterr().err
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"store": "x", "model": "y", "out": "z", "llm_layer": 1, "lr": 3}))
    assert main(["train", "--config", str(cfg)]) == 1
    assert "lr: unknown option" in capsys.readouterr().err


def test_refuses_run_folder_with_other_settings(tmp_path, store, tiny_models, capsys):
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "1")) == 0
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2", "--learning-rate", "1e-4")) == 1
    err = capsys.readouterr().err
    assert "learning_rate: 1e-05 there, 0.0001 now" in err


def test_layer_ablation_one_adapter_per_layer(tmp_path, store, tiny_models):
    for L in (1, 3):
        out = tmp_path / f"L{L}"
        args = _args(store, tiny_models / "sd", out, "--max-steps", "2")
        args[args.index("--llm-layer") + 1] = str(L)
        assert main(args) == 0
        assert json.loads((out / "config.json").read_text())["llm_layer"] == L


def test_block_shuffled_stream_is_exact_and_resumable(tmp_path, store):
    from surpipe.train.groups import StoreGroups
    from surpipe.train.data import BlockReader, Position, SampleStream

    groups = StoreGroups("llm/tiny", 3, "clip/sd", "vae/sd-16", True)
    reader = BlockReader(str(store), groups, 8)
    full = np.asarray(FeatureStore(store).group("llm/tiny").read("layer_3/pooled"))
    s = SampleStream(reader, 5, seed=3, workers=0)
    it = iter(s)
    batches = [next(it) for _ in range(10)]  # 50 samples: two epochs of 24 and then some
    rows = np.concatenate([b["llm"] for b in batches])
    idx = [int(np.flatnonzero((full == r).all(1))[0]) for r in rows]
    assert sorted(idx[:24]) == list(range(24)) and sorted(idx[24:48]) == list(range(24))
    assert idx[:24] != list(range(24)) and idx[:24] != idx[24:48]  # shuffled, differently per epoch
    # restart from a saved position with workers: the same continuation
    s2 = SampleStream(BlockReader(str(store), groups, 8), 5, seed=3, workers=0)
    it2 = iter(s2)
    for _ in range(4):
        next(it2)
    pos = Position(**s2.position.to_dict())
    s3 = SampleStream(BlockReader(str(store), groups, 8), 5, seed=3, workers=2, position=pos)
    it3 = iter(s3)
    for k in range(4, 10):
        np.testing.assert_array_equal(next(it3)["llm"], batches[k]["llm"])


def test_validation_grid_every_k_steps(tmp_path, store, tiny_models):
    from PIL import Image

    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2", "--validation-every", "1",
                      "--validation-steps", "2", "--validation-size", "32",
                      "--validation-prompts", "a red cube", "--validation-prompts", "two dogs running")) == 0
    grids = sorted((out / "validation").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-00000001.png", "step-00000002.png"]
    im = Image.open(grids[-1])
    assert im.width > 2 * 96 and im.height > 2 * 96  # two rows, two columns (without | with)


@pytest.mark.parametrize("extra", [
    ["--mixed-precision", "bf16"],
    ["--prediction-type", "v_prediction", "--min-snr-gamma", "5.0", "--noise-offset", "0.05"],
    ["--projection", "learnable", "--token-mixing", "tokenwise", "--gradient-path", "authors"],
])
def test_training_variants_run_and_save(tmp_path, store, tiny_models, extra):
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2", *extra)) == 0
    rows = _metrics(out)
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    saved = json.loads((out / "config.json").read_text())
    for flag, value in zip(extra[::2], extra[1::2]):
        key = flag[2:].replace("-", "_")
        assert str(saved[key]) == value


def test_learnable_projection_is_trained_and_saved(tmp_path, store, tiny_models):
    from surpipe.train.losses import LLMProjection

    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2", "--projection", "learnable",
                      "--learning-rate", "1e-2", "--llm-weight", "1")) == 0
    saved = LLMProjection.load(out / "adapter" / "llm_projection.safetensors")
    fresh = LLMProjection(saved.llm_size, saved.width, seed=0)
    assert not torch.equal(saved.linear.weight, fresh.linear.weight)
    frozen_out = tmp_path / "frozen"
    assert main(_args(store, tiny_models / "sd", frozen_out, "--max-steps", "2")) == 0
    kept = LLMProjection.load(frozen_out / "adapter" / "llm_projection.safetensors")
    assert torch.equal(kept.linear.weight, fresh.linear.weight)  # frozen: the seeded weights, saved


def test_second_job_on_the_same_run_folder_is_refused(tmp_path, store, tiny_models, capsys):
    from surpipe.store.locks import exclusive_lock

    out = tmp_path / "run"
    out.mkdir()
    with exclusive_lock(out / ".lock", "held by this test"):  # as a running training would hold it
        assert main(_args(store, tiny_models / "sd", out, "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert f"run folder {out} is being written by pid" in err and "Traceback" not in err
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "1")) == 0  # released: runs
