"""Bad input across the CLI: each case exits non-zero with a clear message (or is a counted skip),
never a traceback. Also the safety checks: no user pickle is ever executed, images over the pixel
limit are refused before decoding, and ``file_name`` cannot leave the dataset folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from helpers import png_bytes, run_cli as _run


def _fails(args, phrase):
    rc, out, err = _run(*args)
    assert rc == 1, (args, out, err)
    assert phrase in err, (phrase, err)
    assert "Traceback" not in err and "Traceback" not in out
    return err


def _adapter(folder: Path, width=32) -> Path:
    from surpipe.adapter import SURAdapter, SURAdapterConfig

    SURAdapter(SURAdapterConfig(width=width, nhead=4, dim_feedforward=64)).save_pretrained(folder)
    return folder


def _train(store, model, out, *extra):
    return ["train", "--store", store, "--model", model, "--llm-layer", "3", "--out", out, "--max-steps", "1",
            "--nhead", "4", "--dim-feedforward", "64", "--workers", "0", "--no-progress", *extra]


def _gen(model, adapter, out, *extra):
    return ["generate", "--model", model, "--adapter", adapter, "--out", out, "--prompt", "a cat", "--steps", "1",
            "--size", "32", "--device", "cpu", *extra]


# --------------------------------------------------------------------------- paths that do not exist


def test_nonexistent_paths(tmp_path, store, tiny_models, sample_dir):
    nope = tmp_path / "nope"
    sd, llm = tiny_models / "sd", tiny_models / "llm"
    _fails(["extract-llm", "--data", nope, "--store", tmp_path / "x.zarr", "--model", llm, "--layers", "1"],
           f"no such file or folder: {nope}")
    _fails(["encode-latents", "--data", nope, "--store", tmp_path / "x.zarr", "--model", sd], "no such file or folder")
    _fails(["pack", nope, tmp_path / "shards"], "no such file or folder")
    for args in (["inspect", nope], ["verify", nope],
                 ["import-prompt2vec", tmp_path / "f.pt", "--store", nope, "--layer", "1"], _train(nope, sd, tmp_path / "r")):
        _fails(args, f"feature store not found: {nope}")
    _fails(_train(store, nope, tmp_path / "r"), f"model folder not found: {nope}")
    _fails(["encode-latents", "--data", sample_dir, "--store", tmp_path / "x.zarr", "--model", nope],
           "model folder not found")
    _fails(["extract-llm", "--data", sample_dir, "--store", tmp_path / "x.zarr", "--model", nope, "--layers", "1"],
           "model folder not found")
    _fails(_gen(sd, nope, tmp_path / "g"), f"adapter folder not found: {nope}")
    _fails(_gen(nope, _adapter(tmp_path / "ad"), tmp_path / "g"), "not found")
    _fails(["import-official", nope, tmp_path / "o", "--adapter-weight", "0.1"], "not found")
    _fails(["import-prompt2vec", nope, "--store", store, "--layer", "1"], "prompt2vec file not found")
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- wrong or broken models


def test_folder_that_is_not_a_model_and_wrong_kinds(tmp_path, store, tiny_models, sample_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    sd, llm = tiny_models / "sd", tiny_models / "llm"
    x = tmp_path / "x.zarr"
    _fails(_train(store, empty, tmp_path / "r"), "has no unet/config.json")
    _fails(["encode-latents", "--data", sample_dir, "--store", x, "--model", empty], "is this a diffusers Stable Diffusion folder")
    _fails(["extract-llm", "--data", sample_dir, "--store", x, "--model", empty, "--layers", "1"],
           "is not a Hugging Face model folder")
    _fails(_gen(empty, _adapter(tmp_path / "ad"), tmp_path / "g"), "not a diffusers Stable Diffusion folder")
    # the other stage's model
    _fails(_train(store, llm, tmp_path / "r"), "has no unet/config.json")
    _fails(["encode-latents", "--data", sample_dir, "--store", x, "--model", llm], "is this a diffusers Stable Diffusion folder")
    _fails(["extract-llm", "--data", sample_dir, "--store", x, "--model", sd, "--layers", "1"], "is not a Hugging Face model folder")
    # an SD-shaped folder whose unet/config.json is not a UNet (an LLM config)
    wrong = tmp_path / "wrong"
    shutil.copytree(sd, wrong)
    shutil.copy(llm / "config.json", wrong / "unet" / "config.json")
    err = _fails(_train(store, wrong, tmp_path / "r"), "unet/config.json is not a Stable Diffusion UNet")
    assert "model_type 'llama'" in err
    assert not x.exists() and not (tmp_path / "r").exists()


def test_corrupt_config_json(tmp_path, store, tiny_models):
    sd = tmp_path / "sd"
    shutil.copytree(tiny_models / "sd", sd)
    (sd / "unet" / "config.json").write_text("{not json")
    _fails(_train(store, sd, tmp_path / "r"), "unet/config.json is not valid JSON")
    ad = _adapter(tmp_path / "ad")
    (ad / "config.json").write_bytes(b"\xff\xfe garbage")
    _fails(_gen(tiny_models / "sd", ad, tmp_path / "g"), "config.json is not valid JSON")
    (ad / "config.json").write_text("[1, 2]")
    _fails(_gen(tiny_models / "sd", ad, tmp_path / "g"), "must hold a JSON object")


def test_adapter_safetensors_with_missing_or_extra_keys_and_wrong_width(tmp_path, tiny_models):
    from safetensors.torch import load_file, save_file

    ad = _adapter(tmp_path / "ad")
    w = load_file(str(ad / "model.safetensors"))
    first = sorted(w)[0]
    save_file({k: v for k, v in w.items() if k != first}, str(ad / "model.safetensors"))
    err = _fails(_gen(tiny_models / "sd", ad, tmp_path / "g"), "does not match a SUR-adapter")
    assert first in err
    save_file({**w, "surprise.weight": w[first].clone()}, str(ad / "model.safetensors"))
    err = _fails(_gen(tiny_models / "sd", ad, tmp_path / "g"), "does not match a SUR-adapter")
    assert "surprise.weight" in err
    (ad / "model.safetensors").write_bytes(b"not safetensors at all")
    _fails(_gen(tiny_models / "sd", ad, tmp_path / "g"), "as safetensors")
    wide = _adapter(tmp_path / "wide", width=64)  # the tiny SD's text encoder is 32 wide
    _fails(_gen(tiny_models / "sd", wide, tmp_path / "g"), "the adapter is 64 wide")
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").glob("*.png"))


# --------------------------------------------------------------------------- stores and data


def test_store_from_another_dataset(tmp_path, store, tiny_models, sample_dir):
    for args in (["encode-latents", "--data", sample_dir, "--store", store, "--model", tiny_models / "sd",
                  "--check-images", "header", "--no-progress"],
                 ["extract-llm", "--data", sample_dir, "--store", store, "--model", tiny_models / "llm",
                  "--layers", "1", "--check-images", "header", "--no-progress"]):
        _fails(args, "was made from a different dataset")


def test_prompts_of_0_and_10000_characters_and_non_utf8_metadata(make_surd, tiny_models):
    import torch

    from surpipe.data import open_dataset
    from surpipe.evaluation.render import encode, load_pipeline

    long = "a very long prompt " * 527  # 10,013 characters
    img = png_bytes((16, 16))
    root = make_surd([{"file_name": "a.png", "text": "", "prompt": "x"},
                      {"file_name": "b.png", "text": long[:10000], "prompt": long},
                      b'{"file_name": "c.png", "text": "caf\xe9", "prompt": "y"}',  # latin-1, not UTF-8
                      {"file_name": "d.png", "text": "ok", "prompt": "ok"}],
                     {"a.png": img, "b.png": img, "c.png": img, "d.png": img})
    ds = open_dataset(str(root), check_images="header", progress=False)
    assert [s.simple for s in ds.samples] == [long[:10000], "ok"]
    counts = ds.report.counts
    assert counts.get("invalid UTF-8") == 1 and sum(v for k, v in counts.items() if k.startswith("empty prompt")) == 1
    pipe = load_pipeline(str(tiny_models / "sd"))
    pe, ne = encode(pipe, [ds.samples[0].simple], None)
    assert pe.shape == (1, 77, 32) and torch.isfinite(pe).all()  # CLIP truncates to 77 tokens


# --------------------------------------------------------------------------- safety


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_everywhere_a_user_pt_is_read(tmp_path, store, tiny_models):
    marker = tmp_path / "PWNED"

    def evil(path, payload):
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
        return path

    # import-official: the authors' adapter .pt
    f1 = evil(tmp_path / "official.pt", {"fc.weight": _Evil(marker)})
    err = _fails(["import-official", f1, tmp_path / "o", "--adapter-weight", "0.1"], "refusing")
    # import-prompt2vec: the authors' {prompt: tensor} .pt
    f2 = evil(tmp_path / "p2v.pt", {"a red cube number 1": _Evil(marker)})
    _fails(["import-prompt2vec", f2, "--store", store, "--layer", "3"], "weights_only=True")
    # train: a run folder's checkpoint optimizer.pt (a run folder can come from someone else)
    from stages.cli import main

    out = tmp_path / "run"
    assert main([str(a) for a in _train(store, tiny_models / "sd", out, "--checkpoint-every", "1")]) == 0
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    evil(ckpt / "optimizer.pt", {"optimizer": _Evil(marker)})
    args = _train(store, tiny_models / "sd", out, "--checkpoint-every", "1")
    args[args.index("--max-steps") + 1] = "2"
    err = _fails(args, f"checkpoint {ckpt} cannot be loaded")
    assert "weights_only=True" in err
    assert not marker.exists()  # no payload ran


def test_image_over_the_pixel_limit_is_refused_before_decoding(make_surd, tmp_path, monkeypatch):
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(self, *a, **k):
        decoded.append(self.size)
        return real_load(self, *a, **k)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    root = make_surd([{"file_name": "big.png", "text": "big", "prompt": "big"},
                      {"file_name": "small.png", "text": "small", "prompt": "small"}],
                     {"big.png": png_bytes((64, 64)), "small.png": png_bytes((8, 8))})
    cfg = tmp_path / "pack.json"  # the pack command takes max_pixels from --config (no flag for it)
    cfg.write_text(json.dumps({"max_pixels": 1000, "progress": False}))
    rc, out, err = _run("pack", root, tmp_path / "shards", "--config", cfg)
    assert rc == 0 and "Traceback" not in err
    assert "too many pixels" in out and "4096 pixels > limit 1000" in out
    assert (64, 64) not in decoded and (8, 8) in decoded  # the big one was never decoded
    report = json.loads((tmp_path / "shards" / "pack_report.json").read_text())
    assert report["num_samples"] == 1 and report["scan"]["counts"] == {"too many pixels": 1}


def test_file_name_cannot_leave_the_dataset_folder(make_surd, tmp_path):
    import tarfile

    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes((8, 8), color=(1, 2, 3)))
    root = make_surd([{"file_name": "../secret.png", "text": "a", "prompt": "a"},
                      {"file_name": str(secret), "text": "b", "prompt": "b"},
                      {"file_name": "sub/../../secret.png", "text": "c", "prompt": "c"},
                      {"file_name": "link.png", "text": "d", "prompt": "d"},
                      {"file_name": "ok.png", "text": "e", "prompt": "e"}],
                     {"ok.png": png_bytes((8, 8))}, name="surd")
    os.symlink(secret, root / "link.png")
    cfg = tmp_path / "pack.json"
    cfg.write_text(json.dumps({"progress": False}))
    rc, out, err = _run("pack", root, tmp_path / "shards", "--config", cfg)
    assert rc == 0 and "Traceback" not in err
    report = json.loads((tmp_path / "shards" / "pack_report.json").read_text())
    assert report["num_samples"] == 1 and report["scan"]["counts"] == {"file_name outside the folder": 4}
    names = []
    for t in (tmp_path / "shards").glob("*.tar"):
        with tarfile.open(t) as tf:
            names += tf.getnames()
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    assert json.loads(tf.extractfile(m).read())["text"] == "e"
    assert names and all("secret" not in n for n in names)
    _fails(["pack", root, tmp_path / "strict", "--strict", "--config", cfg], "file_name outside the folder")
