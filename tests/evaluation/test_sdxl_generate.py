"""SDXL at inference: ``surpipe generate`` with the stock StableDiffusionXLPipeline (prompt, negative
and both pooled embeddings), "without" images equal to a plain pipeline call at the same seed, an
adapter with a pooled head mapping the pooled embeddings, and the README's SDXL recipe as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers import REPO, run_cli_err

STEPS, SIZE = 2, 64
MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
ADAPTER = "runs/my-sdxl-run/adapter"


def _adapter(path: Path, pooled_width=None) -> Path:
    from surpipe.adapter import SURAdapter

    torch.manual_seed(0)
    ad = SURAdapter(width=64, nhead=4, dim_feedforward=64, adapter_weight=0.5, pooled_width=pooled_width)
    torch.nn.init.normal_(ad.fc.weight, std=0.5)  # non-zero: the adapter changes the embeddings
    if pooled_width:
        torch.nn.init.normal_(ad.pooled_head[2].weight, std=0.5)
    ad.save_pretrained(path)
    return path


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_sdxl_without_equals_plain_pipeline_and_with_differs(tiny_models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ad, out = _adapter(tmp_path / "ad"), tmp_path / "gen"
    prompt = "a dog jumping over a fence"
    rc, err = run_cli_err("generate", "--model", tiny_models / "sdxl", "--adapter", ad, "--prompt", prompt,
                          "--out", out, "--steps", STEPS, "--size", SIZE, "--seed", 3, "--compare")
    assert rc == 0, err
    rec = json.loads((out / "generate.json").read_text())
    files = {r["adapter"]: r["file"] for r in rec["images"]}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    plain = pipe(prompt=prompt, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    without, with_ = _png(out / files[False]), _png(out / files[True])
    assert np.abs(without.astype(int) - np.asarray(plain).astype(int)).max() <= 1
    assert np.abs(without.astype(int) - with_.astype(int)).mean() > 1.0
    assert (out / "compare_grid.png").is_file()


def test_pooled_head_maps_both_pooled_embeddings(tiny_models, tmp_path, monkeypatch):
    from surpipe.evaluation import render
    from surpipe.adapter import SURAdapter

    pipe = render.load_pipeline(str(tiny_models / "sdxl"))
    plain = SURAdapter.from_pretrained(_adapter(tmp_path / "a"))
    headed = SURAdapter.from_pretrained(_adapter(tmp_path / "b", pooled_width=32))
    assert headed.config.pooled_width == 32
    ref = pipe.encode_prompt(["a cat"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                             negative_prompt=["blurry"])
    a = render.encode_args(pipe, ["a cat"], plain, "blurry")
    b = render.encode_args(pipe, ["a cat"], headed, "blurry")
    # without a head the pooled embeddings are the pipeline's; with it, head(p) for both arms
    assert torch.equal(a["pooled_prompt_embeds"], ref[2]) and torch.equal(a["negative_pooled_prompt_embeds"], ref[3])
    with torch.no_grad():  # the same modules on the same inputs: the same kernels, float32 rounding at most
        assert torch.allclose(b["pooled_prompt_embeds"], headed.pool(ref[2]), atol=1e-6)
        assert torch.allclose(b["negative_pooled_prompt_embeds"], headed.pool(ref[3]), atol=1e-6)
    assert not torch.allclose(b["pooled_prompt_embeds"], ref[2])
    with torch.no_grad():
        assert torch.allclose(a["prompt_embeds"], plain(ref[0]), atol=1e-6)
        assert torch.allclose(a["negative_prompt_embeds"], plain(ref[1]), atol=1e-6)


def test_sd_adapter_on_sdxl_is_refused_clearly(tiny_models, tmp_path):
    from surpipe.adapter import SURAdapter

    SURAdapter(width=32, nhead=4, dim_feedforward=64).save_pretrained(tmp_path / "sd15")
    rc, err = run_cli_err("generate", "--model", tiny_models / "sdxl", "--adapter", tmp_path / "sd15", "--prompt",
                          "x", "--out", tmp_path / "o", "--steps", 1, "--size", SIZE)
    assert rc == 1 and "32 wide" in err and "64" in err and "Traceback" not in err


def _recipe() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"<!-- recipe-sdxl:start -->(.*?)<!-- recipe-sdxl:end -->", text, re.S).group(1)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_sdxl_recipe_runs_and_matches_render(tiny_models, tmp_path, monkeypatch):
    from surpipe.evaluation import render
    from surpipe.adapter import SURAdapter

    _adapter(tmp_path / "adapter", pooled_width=32)
    code = _recipe()
    assert f'MODEL = "{MODEL}"' in code and f'ADAPTER = "{ADAPTER}"' in code and "num_inference_steps=30" in code
    assert len([line for line in code.splitlines() if line.strip()]) <= 22
    code = (code.replace(MODEL, str(tiny_models / "sdxl")).replace(ADAPTER, str(tmp_path / "adapter"))
            .replace("num_inference_steps=30", f"num_inference_steps={STEPS}, height={SIZE}, width={SIZE}"))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md SDXL recipe", "exec"), ns)
    image = ns["image"]
    prompt = re.search(r'encode_prompt\(\s*"([^"]+)"', code).group(1)
    negative = re.search(r'negative_prompt="([^"]*)"', code).group(1)
    pipe = render.load_pipeline(str(tiny_models / "sdxl"))
    adapter = SURAdapter.from_pretrained(tmp_path / "adapter")
    # the recipe keeps SDXL's own default guidance scale (5.0)
    ref = render.render(pipe, [prompt], adapter=adapter, seeds=[0], steps=STEPS, size=SIZE, guidance=5.0,
                        negative_prompt=negative)[0]
    assert np.array_equal(np.asarray(image), np.asarray(ref))
