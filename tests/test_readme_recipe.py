"""The README's "own diffusers pipeline" recipe runs as written (tiny model, tiny adapter) and gives
exactly the image that ``surpipe.evaluation.render.render`` gives for the same prompt and seed."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ADAPTER = "runs/my-run/adapter"


def _recipe() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"<!-- recipe:start -->(.*?)<!-- recipe:end -->", text, re.S).group(1)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the recipe section must hold exactly one python block"
    return blocks[0]


def test_recipe_block_is_short_and_uses_the_placeholders():
    code = _recipe()
    assert f'MODEL = "{MODEL}"' in code and f'ADAPTER = "{ADAPTER}"' in code
    assert "SURAdapter.from_pretrained(ADAPTER" in code and "encode_prompt(" in code
    assert "prompt_embeds=" in code and "negative_prompt_embeds=" in code
    assert len([l for l in code.splitlines() if l.strip()]) <= 20


def test_recipe_runs_and_matches_render(tiny_models, tmp_path, monkeypatch):
    from surpipe.evaluation import render
    from surpipe.adapter import SURAdapter

    torch.manual_seed(0)
    ad = SURAdapter(width=32, nhead=4, dim_feedforward=64, adapter_weight=0.5)
    torch.nn.init.normal_(ad.fc.weight, std=0.5)  # non-zero, so the adapter changes the image
    ad.save_pretrained(tmp_path / "adapter")

    code = _recipe()
    assert "num_inference_steps=30" in code
    code = (code.replace(MODEL, str(tiny_models / "sd")).replace(ADAPTER, str(tmp_path / "adapter"))
            .replace("num_inference_steps=30", "num_inference_steps=2, height=32, width=32"))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md recipe", "exec"), ns)
    image = ns["image"]
    assert image.size == (32, 32)
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())

    prompt = re.search(r'encode_prompt\(\s*"([^"]+)"', code).group(1)
    negative = re.search(r'negative_prompt="([^"]*)"', code).group(1)
    pipe = render.load_pipeline(str(tiny_models / "sd"))
    adapter = SURAdapter.from_pretrained(tmp_path / "adapter")
    ref = render.render(pipe, [prompt], adapter=adapter, seeds=[0], steps=2, size=32, negative_prompt=negative)[0]
    assert np.array_equal(np.asarray(image), np.asarray(ref))
    plain = render.render(pipe, [prompt], adapter=None, seeds=[0], steps=2, size=32, negative_prompt=negative)[0]
    assert not np.array_equal(np.asarray(image), np.asarray(plain))
