"""The tiny Stable Diffusion (random weights, real CLIP tokenizer) in the diffusers layout."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from surpipe.errors import SurpipeError
from surpipe.tiny.common import SEED_TEXT, SEED_UNET, SEED_VAE, clean_tokenizer_config, write_marker
from surpipe.tiny.tokenizers import (CLIP_EOS, CLIP_VOCAB_SIZE, clip_vocab_and_merges, write_clip_files,
                                     write_clip_tokenizer)


def tiny_sd_configs(
    text_width: int = 32,
    text_layers: int = 2,
    text_heads: int = 4,
    text_act: str = "quick_gelu",
    channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention_head_dim: int | tuple[int, ...] = 8,
    use_linear_projection: bool = False,
    norm_num_groups: int = 32,
    latent_channels: int = 4,
    image_size: int = 64,
    prediction_type: str = "epsilon",
    scaling_factor: float = 0.18215,
    clip_pad_token: str = CLIP_EOS,
) -> dict[str, dict[str, Any]]:
    """Configs (plain dicts) of the tiny SD components: ``text_encoder``, ``vae``, ``unet``, ``scheduler``,
    ``tokenizer``. Defaults are SD-1.5-like; an SD-2-like variant is e.g.
    ``tiny_sd_configs(text_width=64, text_act="gelu", prediction_type="v_prediction",
    use_linear_projection=True, clip_pad_token="!")``.

    The VAE has ``len(channels)`` blocks and downsamples by ``2 ** (len(channels) - 1)``; the UNet's
    ``sample_size`` is set to match ``image_size``.
    """
    n = len(channels)
    down_factor = 2 ** (n - 1)
    if image_size % down_factor:
        raise SurpipeError(f"image_size {image_size} is not a multiple of the VAE's downsampling {down_factor}")
    text = dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        projection_dim=text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        max_position_embeddings=77,
        hidden_act=text_act,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if clip_pad_token == CLIP_EOS else 0,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
        scaling_factor=scaling_factor,
    )
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    unet = dict(
        sample_size=image_size // down_factor,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=list(channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=text_width,
        attention_head_dim=list(attention_head_dim) if isinstance(attention_head_dim, (tuple, list)) else attention_head_dim,
        use_linear_projection=use_linear_projection,
        norm_num_groups=norm_num_groups,
    )
    scheduler = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    tokenizer = dict(pad_token=clip_pad_token, model_max_length=77)
    return dict(text_encoder=text, vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer)


def build_tiny_sd(out_dir: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random Stable Diffusion in the diffusers layout to ``out_dir``; ``overrides``
    go to :func:`tiny_sd_configs`. Loads with ``StableDiffusionPipeline.from_pretrained(out_dir)``."""
    import torch  # heavy: keeps --help torch-free
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    cfgs = tiny_sd_configs(**overrides)
    with tempfile.TemporaryDirectory(prefix="surpipe-clip-") as d:
        tok = write_clip_tokenizer(d, **cfgs["tokenizer"])
    torch.manual_seed(seed * 1000 + SEED_TEXT)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"])).eval()
    torch.manual_seed(seed * 1000 + SEED_VAE)
    vae = AutoencoderKL(**cfgs["vae"]).eval()
    torch.manual_seed(seed * 1000 + SEED_UNET)
    unet = UNet2DConditionModel(**cfgs["unet"]).eval()
    scheduler = DDPMScheduler(**cfgs["scheduler"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # Keep the classic vocab.json/merges.txt beside tokenizer.json, as SD repos ship them.
    tdir = out / "tokenizer"
    clean_tokenizer_config(tdir)
    write_clip_files(tdir, *clip_vocab_and_merges(), keep_existing=True)
    info = {
        "kind": "tiny-sd",
        "seed": seed,
        "clip_tokenizer_source": "open_clip/bpe_simple_vocab_16e6.txt.gz (open_clip_torch wheel)",
        "vae_downsample": 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1),
        "configs": cfgs,
    }
    write_marker(out, info)
    return out
