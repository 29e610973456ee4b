"""``surpipe make-tiny-models OUT``: a tiny LLaMA-architecture LM (OUT/llm), a tiny Stable Diffusion
(OUT/sd), a tiny SDXL (OUT/sdxl) and a tiny CLIP image-text model for ``eval`` (OUT/clip), with real tokenizers, built
offline, in standard Hugging Face folder layouts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from surpipe import config as cfgmod
from surpipe.config import Config, opt
from surpipe.logs import get_logger
from surpipe.tiny import make_tiny_models

log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


@dataclass
class TinyModelsConfig(Config):
    out: str = opt(help="folder to write llm/, sd/, sdxl/ and clip/ into", group="output", argument=True)
    seed: int = opt(0, help="random seed of the weights (the same seed gives the same models)", group="model",
                    ge=0, lt=2**32)
    overwrite: bool = opt(False, help="replace llm/, sd/, sdxl/ and clip/ in a non-empty OUT", group="output")
    # "sentencepiece": the real LLaMA-style tokenizer from the mistral-common wheel;
    # "bpe": a small BPE trained offline (no wheel needed).
    llm_tokenizer: Literal["sentencepiece", "bpe"] = opt(
        "sentencepiece", help="LM tokenizer: sentencepiece (real LLaMA-style, needs mistral-common) or bpe "
        "(trained offline)", group="model")
    clip: bool = opt(True, help="also build the tiny CLIP image-text model eval scores with (OUT/clip)",
                     group="model")
    sdxl: bool = opt(True, help="also build the tiny SDXL (two text encoders, text_time UNet) in OUT/sdxl",
                     group="model")


def run(cfg: TinyModelsConfig) -> Path:
    """Build the tiny models into ``cfg.out``; returns that folder."""
    t0 = time.perf_counter()
    out = make_tiny_models(cfg.out, seed=cfg.seed, overwrite=cfg.overwrite, llm_tokenizer=cfg.llm_tokenizer,
                           clip=cfg.clip, sdxl=cfg.sdxl)
    cfgmod.save(cfg, out / "tiny_models_config.json")
    log.info(f"tiny models ready in {out} ({time.perf_counter() - t0:.1f} s): "
             f"{out / 'llm'} (causal LM), {out / 'sd'} (Stable Diffusion)"
             + (f", {out / 'sdxl'} (SDXL)" if cfg.sdxl else "")
             + (f", {out / 'clip'} (CLIP image-text, for eval)" if cfg.clip else ""))
    return out
