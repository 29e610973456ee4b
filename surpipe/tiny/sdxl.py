"""The tiny SDXL (random weights, real CLIP tokenizers) in the diffusers ``StableDiffusionXLPipeline`` layout.

Laid out as ``stabilityai/stable-diffusion-xl-base-1.0``: ``tokenizer`` + ``text_encoder``
(``CLIPTextModel``, quick_gelu, pads with ``<|endoftext|>``), ``tokenizer_2`` + ``text_encoder_2``
(``CLIPTextModelWithProjection``, gelu, pads with ``"!"``), a ``text_time`` UNet whose cross-attention
width is D1 + D2 and whose added embedding takes 6 time ids plus the pooled projection, a VAE with
SDXL's ``scaling_factor`` 0.13025 and SDXL's ``EulerDiscreteScheduler`` config. As for the tiny SD, the
VAE has 2 blocks (downsamples by 2): 64x64 images give the UNet's 32x32 latents.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from surpipe.errors import SurpipeError
from surpipe.tiny.common import SEED_TEXT, SEED_UNET, SEED_VAE, clean_tokenizer_config, write_marker
from surpipe.tiny.tokenizers import (CLIP_EOS, CLIP_VOCAB_SIZE, clip_vocab_and_merges, write_clip_files,
                                     write_clip_tokenizer)

SDXL_SCALING_FACTOR = 0.13025
SEED_TEXT_2 = 4  # beside common's offsets, so the second encoder never changes the others' weights


def _text_config(width: int, layers: int, heads: int, act: str, pad_id: int, projection_dim: int) -> dict:
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=4 * width,
                projection_dim=projection_dim, num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id)


def tiny_sdxl_configs(
    text_width: int = 32,
    text_width_2: int = 32,
    text_layers: int = 2,
    text_heads: int = 4,
    projection_dim: int = 32,
    addition_time_embed_dim: int = 8,
    channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention_head_dim: int | tuple[int, ...] = (2, 4),
    norm_num_groups: int = 32,
    latent_channels: int = 4,
    image_size: int = 64,
    prediction_type: str = "epsilon",
    scaling_factor: float = SDXL_SCALING_FACTOR,
) -> dict[str, dict[str, Any]]:
    """Configs (plain dicts) of the tiny SDXL components: ``text_encoder``, ``text_encoder_2``, ``vae``,
    ``unet``, ``scheduler``, ``tokenizer``, ``tokenizer_2``."""
    n = len(channels)
    down_factor = 2 ** (n - 1)
    if image_size % down_factor:
        raise SurpipeError(f"image_size {image_size} is not a multiple of the VAE's downsampling {down_factor}")
    text = _text_config(text_width, text_layers, text_heads, "quick_gelu", 49407, projection_dim)
    text_2 = _text_config(text_width_2, text_layers, text_heads, "gelu", 0, projection_dim)  # "!" is id 0
    vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
               up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(channels),
               layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
               sample_size=image_size, scaling_factor=scaling_factor, force_upcast=True)
    # SDXL's layout: no cross-attention in the first (highest-resolution) block.
    unet = dict(
        sample_size=image_size // down_factor, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        block_out_channels=list(channels), layers_per_block=layers_per_block,
        attention_head_dim=(list(attention_head_dim) if isinstance(attention_head_dim, (tuple, list))
                            else attention_head_dim),
        use_linear_projection=True, norm_num_groups=norm_num_groups,
        cross_attention_dim=text_width + text_width_2,
        addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
        # 6 time ids (original size, crop top-left, target size) + the pooled projection
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim,
    )
    scheduler = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type=prediction_type, interpolation_type="linear", steps_offset=1,
                     timestep_spacing="leading", use_karras_sigmas=False)
    return dict(text_encoder=text, text_encoder_2=text_2, vae=vae, unet=unet, scheduler=scheduler,
                tokenizer=dict(pad_token=CLIP_EOS, model_max_length=77),
                tokenizer_2=dict(pad_token="!", model_max_length=77))


def build_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random SDXL in the diffusers layout to ``out_dir``; ``overrides`` go to
    :func:`tiny_sdxl_configs`. Loads with ``StableDiffusionXLPipeline.from_pretrained(out_dir)``."""
    import torch  # heavy: keeps --help torch-free
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    cfgs = tiny_sdxl_configs(**overrides)
    with tempfile.TemporaryDirectory(prefix="surpipe-clip-") as d:
        tok = write_clip_tokenizer(Path(d) / "1", **cfgs["tokenizer"])
        tok_2 = write_clip_tokenizer(Path(d) / "2", **cfgs["tokenizer_2"])
    torch.manual_seed(seed * 1000 + SEED_TEXT)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"])).eval()
    torch.manual_seed(seed * 1000 + SEED_TEXT_2)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder_2"])).eval()
    torch.manual_seed(seed * 1000 + SEED_VAE)
    vae = AutoencoderKL(**cfgs["vae"]).eval()
    torch.manual_seed(seed * 1000 + SEED_UNET)
    unet = UNet2DConditionModel(**cfgs["unet"]).eval()
    scheduler = EulerDiscreteScheduler(**cfgs["scheduler"])
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out, safe_serialization=True)
    vocab_merges = clip_vocab_and_merges()
    for sub in ("tokenizer", "tokenizer_2"):  # the classic files beside tokenizer.json, as SDXL ships them
        clean_tokenizer_config(out / sub)
        write_clip_files(out / sub, *vocab_merges, keep_existing=True)
    write_marker(out, {
        "kind": "tiny-sdxl",
        "seed": seed,
        "clip_tokenizer_source": "open_clip/bpe_simple_vocab_16e6.txt.gz (open_clip_torch wheel)",
        "vae_downsample": 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1),
        "configs": cfgs,
    })
    return out
