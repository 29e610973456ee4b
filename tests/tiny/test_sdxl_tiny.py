"""The tiny SDXL that make-tiny-models builds: a real ``StableDiffusionXLPipeline`` folder (two text
encoders with the real CLIP tokenizer, a text_time UNet) that loads and renders on CPU."""

from __future__ import annotations

import json
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_tiny_sdxl_loads_in_the_stock_pipeline_and_renders(tiny_models):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    d = tiny_models / "sdxl"
    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert json.loads((d / "surpipe_tiny.json").read_text())["kind"] == "tiny-sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(d)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.vae.config.scaling_factor == 0.13025
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    # the real CLIP BPE in both tokenizers; the second pads with "!" as SDXL's does
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    u = pipe.unet.config
    d1, d2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert u.addition_embed_type == "text_time" and u.cross_attention_dim == d1 + d2
    assert u.projection_class_embeddings_input_dim == 6 * u.addition_time_embed_dim + \
        pipe.text_encoder_2.config.projection_dim
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    img = pipe("a red cube", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()
    assert time.perf_counter() - t0 < 60


def test_tiny_sdxl_is_fast_and_deterministic(tmp_path):
    from surpipe.tiny import build_tiny_sdxl

    t0 = time.perf_counter()
    a = build_tiny_sdxl(tmp_path / "a", seed=0)
    took = time.perf_counter() - t0
    b = build_tiny_sdxl(tmp_path / "b", seed=0)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix == ".safetensors")
    assert len(files) == 4  # text_encoder, text_encoder_2, unet, vae
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert took < 30  # about 2 s alone; generous for a loaded 2-core machine
