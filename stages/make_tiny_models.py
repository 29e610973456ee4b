"""``surpipe make-tiny-models OUT``: a tiny LLaMA-architecture LM (OUT/llm) and a tiny Stable
Diffusion (OUT/sd) with real tokenizers, built offline, in standard Hugging Face folder layouts."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from surpipe import config as cfgmod


@dataclass
class TinyModelsConfig:
    out: str
    seed: int = 0
    overwrite: bool = False
    # "sentencepiece": the real LLaMA-style tokenizer from the mistral-common wheel;
    # "bpe": a small BPE trained offline (no wheel needed).
    llm_tokenizer: Literal["sentencepiece", "bpe"] = "sentencepiece"


def run(cfg: TinyModelsConfig) -> Path:
    from surpipe.tiny import make_tiny_models

    t0 = time.perf_counter()
    out = make_tiny_models(cfg.out, seed=cfg.seed, overwrite=cfg.overwrite, llm_tokenizer=cfg.llm_tokenizer)
    cfgmod.save(cfg, out / "tiny_models_config.json")
    print(f"surpipe: tiny models ready in {out} ({time.perf_counter() - t0:.1f} s): "
          f"{out / 'llm'} (causal LM), {out / 'sd'} (Stable Diffusion)", file=sys.stderr, flush=True)
    return out
