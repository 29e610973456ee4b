"""Stable Diffusion components for stage one: the tokenizer, the CLIP text encoder and the VAE
encoder, loaded from a diffusers checkpoint (hub id or local folder, ``subfolder=`` components).
The UNet is never loaded (only its ``config.json`` may be read, for the default resolution).

Exactness rules (tests/test_encode_latents.py checks each against plain transformers/diffusers):

* Prompts are encoded as ``StableDiffusionPipeline.encode_prompt`` does without ``clip_skip``:
  ``tokenizer(padding="max_length", max_length=tokenizer.model_max_length, truncation=True)``,
  then ``text_encoder(input_ids, attention_mask=mask if config.use_attention_mask else None)[0]``
  (the last hidden state, after the final layer norm). Token counts are taken without truncation
  and include BOS and EOS.
* Images are preprocessed as the diffusers/authors' training transforms do
  (``Resize(R, bilinear)``, ``CenterCrop(R)``, ``ToTensor``, ``Normalize([0.5], [0.5])``), written
  with PIL + numpy because torchvision is not a dependency: the shorter side is resized to R with
  PIL's bilinear filter (long side ``int(R * long / short)``), the crop offsets are
  ``int(round((size - R) / 2))`` (Python's round, as torchvision), and pixels map to
  ``x / 127.5 - 1`` in CHW float32. The horizontally flipped variant is the flip of the cropped
  image (flip after crop, as ``RandomHorizontalFlip`` after ``CenterCrop``).
* Latents are ``vae.encode(x).latent_dist``'s ``mean`` and ``std`` (diffusers'
  ``DiagonalGaussianDistribution``: ``std = exp(0.5 * clamp(logvar, -30, 20))``), unscaled. Training
  samples ``z = mean + std * eps`` and feeds ``(z - shift_factor) * scaling_factor`` to the UNet
  (``shift_factor`` only when the VAE config has one), exactly like the online path
  ``vae.encode(x).latent_dist.sample() * scaling_factor``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from surpipe.devices import torch_dtype
from surpipe.errors import SurpipeError, first_line
from surpipe.hub import is_local_model as is_local  # one rule for every model argument
from surpipe.hub import model_basename, sanitize_name  # noqa: F401  (re-exported: stages name sd.*)

# Which files each component needs in a local diffusers folder (any one of the weight files).
_WEIGHT_FILES = {
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors",
                     "pytorch_model.fp16.bin", "model.safetensors.index.json"),
    "text_encoder_2": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors",
                       "pytorch_model.fp16.bin", "model.safetensors.index.json"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
}
_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))

# Config keys that describe where/how a config was saved, not the model: left out of config hashes.
_VOLATILE_KEYS = {"_name_or_path", "transformers_version", "_diffusers_version", "_commit_hash",
                  "torch_dtype", "dtype", "_use_default_values", "_class_name", "name_or_path"}

# --------------------------------------------------------------------------- model location


def validate_folder(model: str, components: Iterable[str], what: str = "") -> None:
    """Check that a local diffusers folder has what ``components`` need; report every problem.

    ``components``: any of ``tokenizer``, ``text_encoder``, ``vae`` (and SDXL's ``tokenizer_2``,
    ``text_encoder_2``). Hub ids are not checked here (``from_pretrained`` reports those). ``what``
    says what the folder was taken for, in the message (e.g. " (an SDXL checkpoint ...)").
    """
    root = Path(model).expanduser()
    if not root.exists():
        raise SurpipeError(f"model folder not found: {model}")
    if not root.is_dir():
        raise SurpipeError(f"model {model} is a file; expected a diffusers Stable Diffusion folder "
                           "(with tokenizer/, text_encoder/ and vae/) or a hub id")
    problems = []
    for comp in components:
        sub = root / comp
        if not sub.is_dir():
            problems.append(f"{comp}/ is missing")
            continue
        if comp.startswith("tokenizer"):
            if not any(all((sub / f).is_file() for f in group) for group in _TOKENIZER_FILES):
                problems.append(f"{comp}/ has neither vocab.json + merges.txt nor tokenizer.json")
            continue
        cfg = sub / "config.json"
        if not cfg.is_file():
            problems.append(f"{comp}/config.json is missing")
        else:
            try:
                json.loads(cfg.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problems.append(f"{comp}/config.json is not valid JSON ({e})")
        if not any((sub / f).is_file() for f in _WEIGHT_FILES[comp]):
            problems.append(f"{comp}/ has no weights (looked for {', '.join(_WEIGHT_FILES[comp])})")
    if problems:
        hint = ("" if (root / "model_index.json").is_file()
                else " (no model_index.json either: is this a diffusers Stable Diffusion folder?)")
        raise SurpipeError(f"model folder {model}{what} cannot be used{hint}:", problems)


def _load_error(what: str, model: str, revision: str | None, e: Exception) -> SurpipeError:
    where = model + (f"@{revision}" if revision else "")
    offline = " (HF_HUB_OFFLINE is set: hub ids resolve only from the local cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
    msg = first_line(e)
    return SurpipeError(f"cannot load the {what} of {where}{offline}: {msg}")


def _model_index(model: str, revision: str | None) -> dict:
    """model_index.json of the checkpoint ({} when absent or unreadable)."""
    try:
        if is_local(model):
            p = Path(model).expanduser() / "model_index.json"
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "model_index.json", revision=revision)).read_text("utf-8"))
    except Exception:
        return {}


def _component_json(model: str, sub: str, revision: str | None) -> dict | None:
    """A component's config.json (e.g. ``unet``) without loading its weights; None when absent."""
    try:
        if is_local(model):
            p = Path(model).expanduser() / sub / "config.json"
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "config.json", subfolder=sub or None,
                                               revision=revision)).read_text("utf-8"))
    except Exception:
        return None


# Pipelines that are not SD 1.x/2.x, with what to call them in the refusal.
_OTHER_PIPELINES = {
    "StableDiffusionXLPipeline": "SDXL", "StableDiffusionXLImg2ImgPipeline": "SDXL",
    "StableDiffusionXLInpaintPipeline": "SDXL", "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux", "KandinskyPipeline": "Kandinsky", "PixArtAlphaPipeline": "PixArt",
    "StableCascadePriorPipeline": "Stable Cascade",
}
SUPPORTED_PIPELINE = "StableDiffusionPipeline"
# The families surpipe handles, by the pipeline class that model_index.json names.
FAMILIES = {"sd": SUPPORTED_PIPELINE, "sdxl": "StableDiffusionXLPipeline"}
_FAMILY_NAMES = {"sd": "Stable Diffusion 1.x / 2.x", "sdxl": "SDXL"}


def check_pipeline_class(model: str, revision: str | None = None, accept: Sequence[str] = ("sd",)) -> str:
    """The family (``"sd"`` or ``"sdxl"``) of a checkpoint, from the pipeline its
    ``model_index.json`` names; refuse one the caller does not ``accept`` (SD 1.x/2.x: ``"sd"``;
    SDXL: ``"sdxl"``) or that surpipe does not know: other pipelines have other text encoders and
    conditioning, and would be silently mis-encoded. A folder without ``model_index.json`` is
    taken for SD (its components are checked when loaded). Shared by encode-latents, train and generate."""
    index = _model_index(model, revision)
    cls = index.get("_class_name") if isinstance(index, dict) else None
    family = "sd" if cls is None else next((f for f, c in FAMILIES.items() if c == cls), None)
    if family in accept:
        return family
    name = _OTHER_PIPELINES.get(str(cls))
    if name is None and "XL" in str(cls):
        name = "SDXL"
    what = f"{name} is not supported yet" if name else "this pipeline is not supported"
    if family is not None and name is None:
        name = _FAMILY_NAMES[family]
        what = f"{name} is not supported by this command yet"
    takes = " or ".join(f"{FAMILIES[f]} ({_FAMILY_NAMES[f]})" for f in accept)
    raise SurpipeError(
        f"{model} is a {cls} checkpoint (model_index.json): {what}; this command works with "
        f"{takes} checkpoints only")


def config_hash(cfg: dict) -> str:
    """sha256 (16 hex) of a config dict without save-time keys (paths, library versions, dtype)."""
    clean = {k: v for k, v in cfg.items() if k not in _VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(module) -> str:
    """sha256 (16 hex) of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_hash(tok) -> str:
    """sha256 (16 hex) of what determines a tokenizer's ids: its full definition and max length."""
    parts: dict[str, Any] = {"class": type(tok).__name__, "model_max_length": int(tok.model_max_length),
                             "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        d = json.loads(backend.to_str())
        d.pop("truncation", None)
        d.pop("padding", None)
        parts["backend"] = d
    else:
        parts["vocab"] = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- text side


@dataclass
class TextEncoder:
    tokenizer: Any
    model: Any
    max_length: int
    hidden_size: int
    use_attention_mask: bool
    info: dict = field(default_factory=dict)


def load_clip_component(model: str, revision: str | None, tokenizer_sub: str = "tokenizer",
                        encoder_sub: str = "text_encoder", encoder_default: str = "CLIPTextModel",
                        variant: str | None = None) -> tuple[Any, Any, dict]:
    """Load one tokenizer + text encoder pair of a diffusers checkpoint (classes from model_index.json,
    as the pipeline does), in float32 and eval mode; returns (tokenizer, encoder, info), info holding
    the classes, sizes and hashes stage one records. Shared by SD (``tokenizer``/``text_encoder``)
    and SDXL (also ``tokenizer_2``/``text_encoder_2``). The tokenizer's ``model_max_length`` must not
    exceed the encoder's ``max_position_embeddings``."""
    import torch
    import transformers

    index = _model_index(model, revision)
    kw = {} if is_local(model) else {"revision": revision}

    def _cls(comp: str, default: str):
        entry = index.get(comp)
        name = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" else default
        return getattr(transformers, name, None) or getattr(transformers, default)

    tok_cls = _cls(tokenizer_sub, "CLIPTokenizer")
    enc_cls = _cls(encoder_sub, encoder_default)
    what = "" if encoder_sub == "text_encoder" else f" ({encoder_sub})"
    try:
        tok = tok_cls.from_pretrained(model, subfolder=tokenizer_sub, **kw)
    except Exception as e:
        raise _load_error(f"tokenizer{'' if tokenizer_sub == 'tokenizer' else f' ({tokenizer_sub})'}",
                          model, revision, e) from None
    try:
        enc = enc_cls.from_pretrained(model, subfolder=encoder_sub, dtype=torch.float32,
                                      **kw, **({"variant": variant} if variant else {}))
    except Exception as e:
        raise _load_error(f"text encoder{what}", model, revision, e) from None
    enc.eval().requires_grad_(False)
    cfg = enc.config
    max_pos = int(getattr(cfg, "max_position_embeddings", 77))
    max_length = int(tok.model_max_length)
    if max_length > max_pos:
        raise SurpipeError(
            f"{tokenizer_sub} of {model} has model_max_length={tok.model_max_length}, more than the text "
            f"encoder's max_position_embeddings={max_pos}; set \"model_max_length\": {max_pos} in "
            f"{tokenizer_sub}/tokenizer_config.json (Stable Diffusion uses 77)")
    info = {
        "tokenizer_class": type(tok).__name__,
        "text_encoder_class": type(enc).__name__,
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "max_position_embeddings": max_pos,
        "pad_token": str(tok.pad_token),
        "text_encoder_config_hash": config_hash(cfg.to_dict()),
        "tokenizer_hash": tokenizer_hash(tok),
        "text_encoder_weights_sha256": weights_hash(enc),
        "commit": getattr(cfg, "_commit_hash", None),
    }
    return tok, enc, info


def load_text_encoder(model: str, revision: str | None = None, dtype: str = "float32",
                      device: str = "cpu", variant: str | None = None) -> TextEncoder:
    """Load the tokenizer and the CLIP text encoder (classes from model_index.json, as the pipeline does).

    The width D is read from the text encoder's config; the window (77 for SD) from the tokenizer's
    ``model_max_length``, which must not exceed the encoder's ``max_position_embeddings``.
    """
    if is_local(model):
        validate_folder(model, ["tokenizer", "text_encoder"])
    tok, enc, info = load_clip_component(model, revision, variant=variant)
    cfg = enc.config
    enc.to(device=device, dtype=torch_dtype(dtype))
    return TextEncoder(tok, enc, int(tok.model_max_length), int(cfg.hidden_size),
                       bool(getattr(cfg, "use_attention_mask", False)), info)


def token_counts(tok, prompts: Sequence[str]) -> np.ndarray:
    """Token count of each prompt before truncation, BOS and EOS included (int32)."""
    ids = tok(list(prompts), padding=False, truncation=False, verbose=False)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.int32)


def encode_prompts(te: TextEncoder, prompts: Sequence[str], device: str = "cpu"):
    """CLIP last hidden state of each prompt, [B, max_length, D] float32 on CPU, computed exactly as
    ``StableDiffusionPipeline.encode_prompt`` feeds the UNet (padded/truncated to max_length)."""
    import torch

    inputs = te.tokenizer(list(prompts), padding="max_length", max_length=te.max_length,
                          truncation=True, return_tensors="pt")
    mask = inputs.attention_mask.to(device) if te.use_attention_mask else None
    with torch.inference_mode():
        out = te.model(inputs.input_ids.to(device), attention_mask=mask)[0]
    return out.float().cpu()


# --------------------------------------------------------------------------- images


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``resolution`` (torchvision's ``Resize(int)`` rule)."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def center_crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of torchvision's ``CenterCrop`` (its rounding)."""
    left = int(round((width - resolution) / 2.0))
    top = int(round((height - resolution) / 2.0))
    return left, top, left + resolution, top + resolution


def preprocess_pil(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (bilinear) and center-crop a square of that size."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    size = resized_size(*img.size, resolution)
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
    box = center_crop_box(*img.size, resolution)
    return img.crop(box)


def to_tensor(img: Image.Image):
    """8-bit RGB PIL image -> float32 CHW tensor in [-1, 1] (``ToTensor`` + ``Normalize(0.5, 0.5)``)."""
    import torch

    a = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(0.5).div_(0.5)


def preprocess(img: Image.Image, resolution: int):
    """PIL image -> the VAE's input, float32 [3, R, R] in [-1, 1]."""
    return to_tensor(preprocess_pil(img, resolution))


# --------------------------------------------------------------------------- VAE


@dataclass
class VaeEncoder:
    model: Any
    latent_channels: int
    downsample: int
    scaling_factor: float
    shift_factor: float | None
    sample_size: int | None
    info: dict = field(default_factory=dict)


def vae_subfolder(vae: str, revision: str | None = None) -> str | None:
    """Where the AutoencoderKL of a ``--vae`` argument lives: None when it is itself a VAE (a folder
    or hub repo with ``config.json`` at its root, as ``madebyollin/sdxl-vae-fp16-fix``), ``"vae"``
    for a model folder or repo holding ``vae/``."""
    if is_local(vae):
        root = Path(vae).expanduser()
        if not root.is_dir():
            raise SurpipeError(f"--vae {vae}: folder not found")
        if (root / "config.json").is_file():
            return None
        if (root / "vae").is_dir():
            return "vae"
        raise SurpipeError(f"--vae {vae} is neither an AutoencoderKL folder (config.json and weights) nor a "
                           "model folder with vae/")
    return None if _component_json(vae, "", revision) is not None else "vae"


def load_vae_encoder(model: str, revision: str | None = None, dtype: str = "float32",
                     device: str = "cpu", variant: str | None = None, subfolder: str | None = "vae") -> VaeEncoder:
    """Load the VAE (``model``'s ``subfolder``; None: ``model`` is an AutoencoderKL folder or repo itself)
    and keep its encoder half (the decoder is dropped after loading)."""
    import torch
    from diffusers import AutoencoderKL

    if is_local(model) and subfolder == "vae":
        validate_folder(model, ["vae"])
    elif is_local(model):
        root = Path(model).expanduser()
        if not any((root / f).is_file() for f in _WEIGHT_FILES["vae"]):
            raise SurpipeError(f"VAE folder {model} has no weights (looked for {', '.join(_WEIGHT_FILES['vae'])})")
    kw = {} if is_local(model) else {"revision": revision}
    try:
        vae = AutoencoderKL.from_pretrained(model, **({"subfolder": subfolder} if subfolder else {}),
                                            dtype=torch.float32, **kw, **({"variant": variant} if variant else {}))
    except Exception as e:
        raise _load_error("VAE", model, revision, e) from None
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
    unet = _component_json(model, "unet", revision)
    if unet and isinstance(unet.get("sample_size"), int):
        return int(unet["sample_size"]) * vae.downsample
    if vae.sample_size:
        return vae.sample_size
    return 512


def encode_latent_dist(vae: VaeEncoder, x, device: str = "cpu"):
    """``vae.encode(x).latent_dist`` -> (mean, std), float32 on CPU, shape [B, C, R/f, R/f]."""
    import torch

    m = vae.model
    with torch.inference_mode():
        dist = m.encode(x.to(device=device, dtype=m.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()
