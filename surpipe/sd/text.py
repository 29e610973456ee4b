"""SD 1.x/2.x's text side: the tokenizer and the CLIP text encoder of a diffusers checkpoint (classes
from ``model_index.json``, as the pipeline does), and prompts encoded exactly as the pipeline feeds
the UNet.

Exactness rule (tests/test_encode_latents.py checks it against plain transformers): prompts are
encoded as ``StableDiffusionPipeline.encode_prompt`` does without ``clip_skip``:
``tokenizer(padding="max_length", max_length=tokenizer.model_max_length, truncation=True)``, then
``text_encoder(input_ids, attention_mask=mask if config.use_attention_mask else None)[0]`` (the last
hidden state, after the final layer norm). Token counts are taken without truncation and include BOS
and EOS. SDXL's two encoders reuse ``load_clip_component`` (``surpipe.sd.xl``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from surpipe.devices import torch_dtype
from surpipe.errors import SurpipeError
from surpipe.sd.checkpoint import is_local, load_error, model_index, validate_folder
from surpipe.sd.hashes import config_hash, tokenizer_hash, weights_hash

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
    import torch  # heavy: keeps --help torch-free
    import transformers

    index = model_index(model, revision)
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
        raise load_error(f"tokenizer{'' if tokenizer_sub == 'tokenizer' else f' ({tokenizer_sub})'}",
                          model, revision, e) from None
    try:
        enc = enc_cls.from_pretrained(model, subfolder=encoder_sub, dtype=torch.float32,
                                      **kw, **({"variant": variant} if variant else {}))
    except Exception as e:
        raise load_error(f"text encoder{what}", model, revision, e) from None
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
    import torch  # heavy: keeps --help torch-free

    inputs = te.tokenizer(list(prompts), padding="max_length", max_length=te.max_length,
                          truncation=True, return_tensors="pt")
    mask = inputs.attention_mask.to(device) if te.use_attention_mask else None
    with torch.inference_mode():
        out = te.model(inputs.input_ids.to(device), attention_mask=mask)[0]
    return out.float().cpu()
