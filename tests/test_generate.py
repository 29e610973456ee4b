"""``surpipe generate``: stock pipeline + adapter, compare grid, generate.json, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

STEPS, SIZE = 2, 32


def _adapter(path: Path, width: int = 32, adapter_weight: float = 0.5) -> Path:
    from surpipe.adapter import SURAdapter

    torch.manual_seed(0)
    ad = SURAdapter(width=width, nhead=4, dim_feedforward=64, adapter_weight=adapter_weight)
    torch.nn.init.normal_(ad.fc.weight, std=0.5)  # non-zero fc: the adapter changes the embeddings
    ad.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run folder: RUN/adapter (save_pretrained layout), RUN/config.json, projection."""
    from safetensors.torch import save_file

    run = tmp_path_factory.mktemp("gen") / "run"
    _adapter(run / "adapter")
    (run / "config.json").write_text(json.dumps({"store": "x.zarr", "model": "sd", "out": str(run), "llm_layer": 1}))
    save_file({"weight": torch.zeros(32, 8)}, str(run / "llm_projection.safetensors"))
    return run


def _cli(args: list[str]) -> int:
    from stages.cli import main

    return main([str(a) for a in args])


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_compare_grid_without_equals_plain_pipeline_and_with_differs(tiny_models, run_dir, tmp_path):
    from surpipe.evaluation import render

    out = tmp_path / "gen"
    prompts = ["a dog jumping over a fence", "a green apple next to a red mug"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("# demo\n" + "\n".join(prompts) + "\n\n")
    rc = _cli(["generate", "--model", tiny_models / "sd", "--adapter", run_dir, "--prompts-file", pf, "--out", out,
               "--steps", STEPS, "--size", SIZE, "--seed", 7, "--compare", "--batch-size", 2])
    assert rc == 0
    rec = json.loads((out / "generate.json").read_text())
    assert rec["grid"] == "compare_grid.png" and (out / "compare_grid.png").is_file()
    grid = Image.open(out / "compare_grid.png")
    assert grid.width > 2 * 160 and grid.height > 2 * 160  # two columns, two captioned rows
    assert rec["seeds"] == [7, 8]
    pipe = render.load_pipeline(str(tiny_models / "sd"))
    for k, (prompt, seed) in enumerate(zip(prompts, rec["seeds"])):
        files = {r["adapter"]: r["file"] for r in rec["images"] if r["index"] == k}
        assert files[False].endswith(f"_s{seed}_without.png") and files[True].endswith(f"_s{seed}_with.png")
        assert files[False].startswith(f"{k:04d}_{prompt.split()[0]}-{prompt.split()[1]}-")
        plain = pipe(prompt=prompt, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        without, with_ = _png(out / files[False]), _png(out / files[True])
        # same seed, same stock pipeline: identical up to batched-vs-single float noise
        assert np.abs(without.astype(int) - np.asarray(plain).astype(int)).max() <= 1
        assert np.abs(without.astype(int) - with_.astype(int)).mean() > 1.0


def test_adapter_weight_zero_gives_identical_images(tiny_models, run_dir, tmp_path):
    from stages.generate import GenerateConfig, run

    rec = run(GenerateConfig(model=str(tiny_models / "sd"), adapter=str(run_dir / "adapter"), out=str(tmp_path),
                             prompt="three cats sitting on a sofa", steps=STEPS, size=SIZE, compare=True,
                             adapter_weight=0.0, images_per_prompt=2))
    assert rec["adapter_weight"] == 0.0 and rec["seeds"] == [0, 1]
    pairs = {}
    for r in rec["images"]:
        pairs.setdefault(r["index"], {})[r["adapter"]] = _png(tmp_path / r["file"])
    assert len(pairs) == 2
    for p in pairs.values():
        assert np.array_equal(p[False], p[True])
    assert not np.array_equal(pairs[0][False], pairs[1][False])  # different seeds, different images


def test_cond_and_uncond_pass_through_the_adapter_separately(tiny_models, run_dir, tmp_path, monkeypatch):
    from stages.generate import GenerateConfig, run
    from surpipe.evaluation import render
    from surpipe.adapter import SURAdapter

    seen = []
    original = SURAdapter.forward

    def spy(self, x, return_aux=False):
        seen.append(x.detach().clone())
        return original(self, x, return_aux)

    monkeypatch.setattr(SURAdapter, "forward", spy)
    run(GenerateConfig(model=str(tiny_models / "sd"), adapter=str(run_dir), out=str(tmp_path), prompt="a red cube",
                       negative_prompt="blurry", steps=STEPS, size=SIZE, batch_size=1))
    assert len(seen) == 2 and all(x.shape == (1, 77, 32) for x in seen)  # never one [uncond, cond] batch
    pipe = render.load_pipeline(str(tiny_models / "sd"))
    cond, uncond = pipe.encode_prompt(["a red cube"], "cpu", 1, True, negative_prompt=["blurry"])
    # the pipeline's own encoder on the same prompt and batch of 1: the same kernels (default float32 tolerance)
    assert torch.allclose(seen[0], cond) and torch.allclose(seen[1], uncond)
    assert not torch.allclose(cond, uncond)


def test_generate_json_records_every_setting(tiny_models, run_dir, tmp_path):
    from stages.generate import GenerateConfig
    from surpipe import config as cfgmod

    pf = tmp_path / "p.jsonl"
    pf.write_text(json.dumps({"prompt": "a boy kicking a football"}) + "\n" + json.dumps({"prompt": "two boats"}) + "\n")
    out = tmp_path / "out"
    assert _cli(["generate", "--model", tiny_models / "sd", "--adapter", run_dir, "--prompt", "a red bird",
                 "--prompts-file", pf, "--out", out, "--steps", STEPS, "--size", SIZE, "--seed", 3,
                 "--guidance", 5.0, "--scheduler", "ddim", "--dtype", "float32", "--device", "cpu",
                 "--negative-prompt", "ugly"]) == 0
    rec = json.loads((out / "generate.json").read_text())
    assert rec["model"] == str(tiny_models / "sd")
    assert Path(rec["adapter"]) == (run_dir / "adapter").resolve()
    assert rec["adapter_config"]["width"] == 32 and rec["adapter_config"]["adapter_weight"] == 0.5
    assert rec["prompts"] == ["a red bird", "a boy kicking a football", "two boats"]
    assert rec["seeds"] == [3, 4, 5] and rec["steps"] == STEPS and rec["guidance"] == 5.0
    assert rec["scheduler"] == "ddim" and rec["scheduler_class"] == "DDIMScheduler"
    assert rec["dtype"] == "float32" and rec["device"] == "cpu" and rec["size"] == [SIZE, SIZE]
    assert rec["negative_prompt"] == "ugly" and rec["compare"] is False and rec["grid"] is None
    assert {"torch", "diffusers", "transformers", "surpipe"} <= set(rec["versions"])
    names = [r["file"] for r in rec["images"]]
    assert names == ["0000_a-red-bird_s3.png", "0001_a-boy-kicking-a-football_s4.png", "0002_two-boats_s5.png"]
    assert all((out / n).is_file() for n in names)
    cfg = cfgmod.load(GenerateConfig, out / "config.json")  # repeatable with --config
    assert cfg.scheduler == "ddim" and cfg.seed == 3


def test_scheduler_choices_are_renders():
    import typing

    from stages.generate import SchedulerName
    from surpipe.evaluation.render import SCHEDULERS

    assert typing.get_args(SchedulerName) == SCHEDULERS


@pytest.mark.parametrize("case", ["width", "missing", "not_sd", "not_adapter", "no_prompt", "bad_jsonl"])
def test_clear_errors(case, tiny_models, run_dir, tmp_path, capsys):
    sd, adapter = tiny_models / "sd", run_dir
    extra = ["--prompt", "a cat"]
    expect = ""
    if case == "width":
        adapter = _adapter(tmp_path / "wide", width=64)
        expect = "64 wide"
    elif case == "missing":
        adapter = tmp_path / "nope"
        expect = "adapter folder not found"
    elif case == "not_sd":
        sd = tmp_path / "junk"
        sd.mkdir()
        (sd / "readme.txt").write_text("hi")
        expect = "not a diffusers Stable Diffusion folder"
    elif case == "not_adapter":
        adapter = tmp_path / "empty"
        adapter.mkdir()
        expect = "neither a training run folder"
    elif case == "no_prompt":
        extra = []
        expect = "--prompt"
    elif case == "bad_jsonl":
        pf = tmp_path / "p.jsonl"
        pf.write_text('{"text": "a cat"}\n')
        extra = ["--prompts-file", pf]
        expect = "line 1"
    rc = _cli(["generate", "--model", sd, "--adapter", adapter, "--out", tmp_path / "o", "--steps", 1, *extra])
    err = capsys.readouterr().err
    assert rc == 1
    assert "surpipe: error:" in err and expect in err and "Traceback" not in err
    assert not (tmp_path / "o" / "generate.json").exists()


@pytest.mark.parametrize("index, expect", [("[]", "must hold a JSON object"), ("{", "is not valid JSON"),
                                           ('{"unet": 1}', "model_index.json has no vae, text_encoder")])
def test_model_folder_with_a_bad_model_index_is_refused_by_name(tmp_path, index, expect):
    from surpipe.errors import SurpipeError
    from surpipe.evaluation.generate import check_sd_model

    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(index)
    with pytest.raises(SurpipeError, match=expect):
        check_sd_model(str(tmp_path / "sd"))
