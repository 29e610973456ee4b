"""The tiny LLaMA-architecture causal LM (random weights, real tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from surpipe.errors import SurpipeError
from surpipe.tiny.common import SEED_LLM, clean_tokenizer_config, llama_sentencepiece_file, write_marker
from surpipe.tiny.tokenizers import load_llama_sentencepiece, train_llama_bpe


def tiny_llm_config(vocab_size: int = 32000, **overrides: Any):
    """LlamaConfig of the tiny LM: 64 wide, 4 layers, 4 heads, 2 KV heads (GQA), MLP 128."""
    from transformers import LlamaConfig  # heavy: keeps --help torch-free

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_llm(out_dir: str | os.PathLike, seed: int = 0, tokenizer: str = "sentencepiece", **overrides: Any) -> Path:
    """Write a tiny random LLaMA-architecture causal LM plus its tokenizer to ``out_dir``.

    ``tokenizer``: ``"sentencepiece"`` (real LLaMA-style, from the mistral-common wheel) or
    ``"bpe"`` (small BPE trained here; no wheel needed). ``overrides`` go to ``LlamaConfig``.
    Returns ``Path(out_dir)``.
    """
    import torch  # heavy: keeps --help torch-free
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "sentencepiece":
        tok = load_llama_sentencepiece()
        source = "mistral_common/data/tokenizer.model.v1 (mistral-common wheel)"
    elif tokenizer == "bpe":
        tok = train_llama_bpe()
        source = "BPE trained by surpipe.tiny.train_llama_bpe on a built-in prompt corpus"
    else:
        raise SurpipeError(f"unknown tiny LLM tokenizer {tokenizer!r} (use 'sentencepiece' or 'bpe')")
    tok.pad_token = tok.unk_token  # LLaMA has no pad token; <unk> (id 0) never occurs in text
    overrides.setdefault("vocab_size", len(tok))
    overrides.setdefault("pad_token_id", tok.pad_token_id)
    overrides.setdefault("bos_token_id", tok.bos_token_id)
    overrides.setdefault("eos_token_id", tok.eos_token_id)
    cfg = tiny_llm_config(**overrides)
    tok.model_max_length = cfg.max_position_embeddings

    torch.manual_seed(seed * 1000 + SEED_LLM)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    clean_tokenizer_config(out)
    if tokenizer == "sentencepiece":  # real LLaMA repos ship the SentencePiece model too
        shutil.copyfile(llama_sentencepiece_file(), out / "tokenizer.model")
    info = {
        "kind": "tiny-llm",
        "seed": seed,
        "tokenizer": tokenizer,
        "tokenizer_source": source,
        "vocab_size": len(tok),
        "pad_token": tok.pad_token,
        "add_bos_token": True,
        "config_overrides": {k: v for k, v in overrides.items() if isinstance(v, (int, float, str, bool))},
    }
    write_marker(out, info)
    return out
