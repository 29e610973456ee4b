"""SDXL components for stage one: both tokenizers and text encoders, loaded from a diffusers
``StableDiffusionXLPipeline`` checkpoint (hub id or local folder). The VAE and the image side are
SD's (``surpipe.sd.vae``, ``surpipe.sd.image``); SDXL adds the micro-conditioning each row's image needs (``micro_conditioning``).

Exactness rules (tests/test_sdxl_encode.py checks each against ``StableDiffusionXLPipeline.encode_prompt``):

* Each prompt goes through both tokenizers (``padding="max_length"``, ``max_length`` the tokenizer's
  ``model_max_length``, truncation) and both encoders with ``output_hidden_states=True``, no attention
  mask; the embeddings are both encoders' ``hidden_states[-2]`` (penultimate layer, before the final
  norm) concatenated on the last axis, [B, 77, D1 + D2]; the pooled embedding is the second encoder's
  projected output (``text_embeds``) [B, P]. That is ``encode_prompt`` with ``clip_skip=None``.
* Token counts are taken per tokenizer, without truncation, BOS and EOS included.
* Micro-conditioning is what diffusers' SDXL training example records with ``--center_crop``:
  ``original_size`` = (height, width) of the source image, ``crop_top_left`` = (top, left) of the
  center crop in the image resized to the resolution (``int(round((size - R) / 2))``). The example
  flips the cropped square and records the left offset as ``R - left``; training derives that for
  flipped rows, so only the unflipped offsets are stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from surpipe.devices import torch_dtype
from surpipe.errors import SurpipeError
from surpipe.sd.checkpoint import is_local, validate_folder
from surpipe.sd.image import center_crop_box, resized_size
from surpipe.sd.text import load_clip_component

TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


@dataclass
class TextEncodersXL:
    """SDXL's two tokenizer + text encoder pairs."""

    tokenizers: tuple[Any, Any]
    models: tuple[Any, Any]
    max_length: int  # 77
    hidden_size: int  # D1 + D2, the width of the embeddings the UNet cross-attends to
    hidden_sizes: tuple[int, int]  # D1, D2
    pooled_size: int  # P, the second encoder's projection_dim
    info: dict = field(default_factory=dict)


def load_text_encoders_xl(model: str, revision: str | None = None, dtype: str = "float32",
                          device: str = "cpu", variant: str | None = None) -> TextEncodersXL:
    """Load both tokenizers and text encoders of an SDXL checkpoint (classes from model_index.json).

    ``info`` records for BOTH encoders what ``load_text_encoder`` records (classes, sizes, config,
    tokenizer and weights hashes); the second encoder's keys end in ``_2``."""
    if is_local(model):
        validate_folder(model, TEXT_COMPONENTS)
    tok1, enc1, info1 = load_clip_component(model, revision, "tokenizer", "text_encoder", "CLIPTextModel", variant)
    tok2, enc2, info2 = load_clip_component(model, revision, "tokenizer_2", "text_encoder_2",
                                            "CLIPTextModelWithProjection", variant)
    if int(tok1.model_max_length) != int(tok2.model_max_length):
        raise SurpipeError(f"the tokenizers of {model} have different model_max_length ({tok1.model_max_length} "
                           f"and {tok2.model_max_length}); SDXL concatenates both encoders' sequences, so they "
                           "must be equal (77)")
    proj = getattr(enc2.config, "projection_dim", None)
    if not hasattr(enc2, "text_projection") or not isinstance(proj, int):
        raise SurpipeError(f"text_encoder_2 of {model} is a {type(enc2).__name__}, which has no text projection: "
                           "SDXL's pooled embedding is the projected output of CLIPTextModelWithProjection")
    d1, d2 = int(enc1.config.hidden_size), int(enc2.config.hidden_size)
    info = {**info1, **{f"{k}_2": v for k, v in info2.items()}, "projection_dim": int(proj)}
    for enc in (enc1, enc2):
        enc.to(device=device, dtype=torch_dtype(dtype))
    return TextEncodersXL((tok1, tok2), (enc1, enc2), int(tok1.model_max_length), d1 + d2, (d1, d2), int(proj), info)


def encode_prompts_xl(te: TextEncodersXL, prompts: Sequence[str], device: str = "cpu"):
    """(embeddings [B, L, D1+D2], pooled [B, P]), float32 on CPU, exactly as
    ``StableDiffusionXLPipeline.encode_prompt`` computes them for ``prompts`` (``clip_skip=None``)."""
    import torch  # heavy: keeps --help torch-free

    hidden, pooled = [], None
    with torch.inference_mode():
        for tok, enc in zip(te.tokenizers, te.models):
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projected pooled output (CLIPTextModelWithProjection's text_embeds)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1).float().cpu(), pooled.float().cpu()


def micro_conditioning(width: int, height: int, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((height, width) of the source image, (top, left) of the center crop in the resized image),
    as diffusers' SDXL training example records them (``original_sizes``, ``crop_top_lefts``)."""
    w, h = resized_size(width, height, resolution)
    left, top, _, _ = center_crop_box(w, h, resolution)
    return (int(height), int(width)), (max(0, top), max(0, left))


def micro_conditioning_rows(sizes: Sequence[tuple[int, int]], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """``micro_conditioning`` of images of (width, height) ``sizes``: (original_size [n, 2], crop_top_left
    [n, 2]), int32."""
    rows = [micro_conditioning(w, h, resolution) for w, h in sizes]
    return (np.array([r[0] for r in rows], dtype=np.int32).reshape(-1, 2),
            np.array([r[1] for r in rows], dtype=np.int32).reshape(-1, 2))
