"""Names and identity of an LLM: group-name rules (one home: :mod:`surpipe.hub`) and the hashes
recorded in a group's settings (config, tokenizer, weight files), so a later run can tell whether a
store was written by the same model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from surpipe.hub import is_local_model as is_local
from surpipe.hub import model_basename, sanitize_name

__all__ = ["is_local", "model_basename", "sanitize_name", "config_hash", "tokenizer_hash", "weights_fingerprint",
           "tokenizer_settings"]


def _sha(blob: bytes | str, n: int = 16) -> str:
    if isinstance(blob, str):
        blob = blob.encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def config_hash(config) -> str:
    """Hash of the model config as loaded (sorted JSON, without the writer's transformers version)."""
    d = config.to_dict()
    d.pop("transformers_version", None)
    d.pop("_name_or_path", None)
    return _sha(json.dumps(d, sort_keys=True, default=str))


def tokenizer_hash(tok) -> str:
    """Hash of what determines the token ids: the backend tokenizer (fast) or the vocab, and the
    special tokens."""
    parts = [type(tok).__name__]
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        try:
            parts.append(backend.to_str())
        except Exception:
            backend = None
    if backend is None:
        parts.append(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False))
    parts.append(json.dumps({k: str(v) for k, v in sorted(tok.special_tokens_map.items())}))
    return _sha("\n".join(parts))


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def weights_fingerprint(folder: str | os.PathLike) -> str | None:
    """A fast fingerprint of a local model's weight files: name, size and the first and last MiB of
    each (hashing tens of GB in full would cost minutes). None when there are no weight files."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def tokenizer_settings(tok, max_tokens: int) -> dict:
    """What about the tokenizer shapes the stored values, recorded in the group's settings."""
    probe = tok("a")["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    return {
        "class": type(tok).__name__,
        "hash": tokenizer_hash(tok),
        "vocab_size": len(tok),
        "adds_bos": bool(bos is not None and probe[:1] == [bos]),
        "adds_eos": bool(eos is not None and probe[-1:] == [eos]),
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
        "add_special_tokens": True,
        "max_tokens": int(max_tokens),
    }
