"""The VAE encoder of a checkpoint (or of a separate ``--vae``) and the latent distribution it gives.

Exactness rule (tests/test_encode_latents.py checks it against plain diffusers): latents are
``vae.encode(x).latent_dist``'s ``mean`` and ``std`` (diffusers' ``DiagonalGaussianDistribution``:
``std = exp(0.5 * clamp(logvar, -30, 20))``), unscaled. Training samples ``z = mean + std * eps`` and
feeds ``(z - shift_factor) * scaling_factor`` to the UNet (``shift_factor`` only when the VAE config
has one), exactly like the online path ``vae.encode(x).latent_dist.sample() * scaling_factor``.
The UNet is never loaded (only its ``config.json`` is read, for the default resolution).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surpipe.devices import torch_dtype
from surpipe.errors import SurpipeError
from surpipe.sd.checkpoint import WEIGHT_FILES, component_json, is_local, load_error, validate_folder
from surpipe.sd.hashes import config_hash, weights_hash

@dataclass
class VaeEncoder:
    model: Any
    latent_channels: int
    downsample: int
    scaling_factor: float
    shift_factor: float | None
    sample_size: int | None
    info: dict = field(default_factory=dict)


def load_vae_encoder(model: str, revision: str | None = None, dtype: str = "float32",
                     device: str = "cpu", variant: str | None = None, subfolder: str | None = "vae") -> VaeEncoder:
    """Load the VAE (``model``'s ``subfolder``; None: ``model`` is an AutoencoderKL folder or repo itself)
    and keep its encoder half (the decoder is dropped after loading)."""
    import torch  # heavy: keeps --help torch-free
    from diffusers import AutoencoderKL

    if is_local(model) and subfolder == "vae":
        validate_folder(model, ["vae"])
    elif is_local(model):
        root = Path(model).expanduser()
        if not any((root / f).is_file() for f in WEIGHT_FILES["vae"]):
            raise SurpipeError(f"VAE folder {model} has no weights (looked for {', '.join(WEIGHT_FILES['vae'])})")
    kw = {} if is_local(model) else {"revision": revision}
    try:
        vae = AutoencoderKL.from_pretrained(model, **({"subfolder": subfolder} if subfolder else {}),
                                            torch_dtype=torch.float32, **kw,
                                            **({"variant": variant} if variant else {}))
    except Exception as e:
        raise load_error("VAE", model, revision, e) from None
    cfg = dict(vae.config)
    # Encoding needs encoder + quant_conv only; free the decoder half.
    vae.decoder = None
    vae.post_quant_conv = None
    vae.eval().requires_grad_(False)
    down = 2 ** (len(cfg["block_out_channels"]) - 1)
    shift = cfg.get("shift_factor")
    info = {
        "vae_class": type(vae).__name__,
        "vae_config_hash": config_hash(cfg),
        "vae_encoder_weights_sha256": weights_hash(vae),
        "commit": cfg.get("_commit_hash"),
    }
    vae.to(device=device)
    if dtype != "float32":
        vae.to(dtype=torch_dtype(dtype))
    return VaeEncoder(vae, int(cfg["latent_channels"]), down, float(cfg.get("scaling_factor", 0.18215)),
                      None if shift is None else float(shift),
                      int(cfg["sample_size"]) if isinstance(cfg.get("sample_size"), int) else None, info)


def default_resolution(model: str, revision: str | None, vae: VaeEncoder) -> int:
    """The pipeline's default image size: ``unet.sample_size * vae_scale_factor`` (read from
    ``unet/config.json`` only), else the VAE config's ``sample_size``, else 512."""
    unet = component_json(model, "unet", revision)
    if unet and isinstance(unet.get("sample_size"), int):
        return int(unet["sample_size"]) * vae.downsample
    if vae.sample_size:
        return vae.sample_size
    return 512


def encode_latent_dist(vae: VaeEncoder, x, device: str = "cpu"):
    """``vae.encode(x).latent_dist`` -> (mean, std), float32 on CPU, shape [B, C, R/f, R/f]."""
    import torch  # heavy: keeps --help torch-free

    m = vae.model
    with torch.inference_mode():
        dist = m.encode(x.to(device=device, dtype=m.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()
