"""Identity hashes stage one records with what it stores, so that a later run (or train) can tell
whether the same text encoder, tokenizer and VAE made the values: a config hash without save-time
keys, a hash of a module's weights and a hash of what determines a tokenizer's ids."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Config keys that describe where/how a config was saved, not the model: left out of config hashes.
VOLATILE_KEYS = {"_name_or_path", "transformers_version", "_diffusers_version", "_commit_hash",
                  "torch_dtype", "dtype", "_use_default_values", "_class_name", "name_or_path"}


def config_hash(cfg: dict) -> str:
    """sha256 (16 hex) of a config dict without save-time keys (paths, library versions, dtype)."""
    clean = {k: v for k, v in cfg.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(module) -> str:
    """sha256 (16 hex) of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    import torch  # heavy: keeps --help torch-free

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
