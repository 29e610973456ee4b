"""Tiny, randomly initialised models in the standard Hugging Face folder layouts, built offline.

No model hub is needed: the architectures come from configs and the tokenizers are the REAL ones,
rebuilt from files that ship inside two small wheels (found on disk, never imported):

- LLaMA-style SentencePiece (32,000 pieces, adds BOS): ``mistral_common/data/tokenizer.model.v1``
  from ``mistral-common`` (the Mistral-7B v1 / LLaMA-style SentencePiece model).
- CLIP BPE (49,408 tokens, the one Stable Diffusion 1.x/2.x uses):
  ``open_clip/bpe_simple_vocab_16e6.txt.gz`` from ``open_clip_torch``.

Install both with ``pip install --no-deps mistral-common open_clip_torch`` (their own dependencies
are not needed; ``pip check`` will mention them). Without ``mistral-common`` the LLM can use a small
BPE trained here instead (``llm_tokenizer="bpe"``); it is recorded in ``llm/surpipe_tiny.json``.

The folders load with plain ``AutoModelForCausalLM.from_pretrained(out/"llm")``,
``AutoTokenizer.from_pretrained(out/"llm")``, ``StableDiffusionPipeline.from_pretrained(out/"sd")`` and
``StableDiffusionXLPipeline.from_pretrained(out/"sdxl")``.
The same seed gives byte-identical safetensors.

Conventions worth knowing:
- LLM pad token: LLaMA has none; we use ``<unk>`` (id 0), which never appears in real text and is
  distinct from EOS, so masks built from ``input_ids != pad_token_id`` stay right. Always pass the
  attention mask anyway. transformers 5 sets ``padding_side="left"`` for LlamaTokenizer by default.
- Tiny VAE has 2 blocks, so it downsamples by 2 (not 8): a 64x64 image gives 32x32 latents, which is
  the UNet's ``sample_size``. ``scaling_factor`` stays SD's 0.18215.
"""

import importlib.util  # noqa: F401  (tests patch surpipe.tiny.importlib.util.find_spec)
import os
import shutil
import tempfile
import time
from pathlib import Path

from surpipe.errors import SurpipeError
from surpipe.logs import get_logger
from surpipe.tiny.clip import build_tiny_clip, tiny_clip_config
from surpipe.tiny.common import PIP_HINT, TINY_MARKER, clip_bpe_file, llama_sentencepiece_file, wheel_file
from surpipe.tiny.llm import build_tiny_llm, tiny_llm_config
from surpipe.tiny.sd import build_tiny_sd, tiny_sd_configs
from surpipe.tiny.sdxl import build_tiny_sdxl, tiny_sdxl_configs
from surpipe.tiny.tokenizers import (CLIP_BOS, CLIP_EOS, CLIP_VOCAB_SIZE, clip_vocab_and_merges,
                                     load_llama_sentencepiece, train_llama_bpe, write_clip_tokenizer)

__all__ = [
    "CLIP_BOS", "CLIP_EOS", "CLIP_VOCAB_SIZE", "PIP_HINT", "TINY_MARKER", "build_tiny_clip", "build_tiny_llm",
    "build_tiny_sd", "build_tiny_sdxl",
    "clip_bpe_file", "clip_vocab_and_merges", "llama_sentencepiece_file", "load_llama_sentencepiece",
    "make_tiny_models", "tiny_clip_config", "tiny_llm_config", "tiny_sd_configs", "tiny_sdxl_configs",
    "train_llama_bpe", "wheel_file",
    "write_clip_tokenizer",
]


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SurpipeError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SurpipeError(f"output folder {out} is not empty; pass --overwrite to replace llm/, sd/, sdxl/ and clip/ in it")


def make_tiny_models(
    out: str | os.PathLike,
    seed: int = 0,
    overwrite: bool = False,
    llm_tokenizer: str = "sentencepiece",
    llm_overrides: dict | None = None,
    sd_overrides: dict | None = None,
    clip: bool = True,
    sdxl: bool = True,
) -> Path:
    """Build ``out/llm`` (tiny LLaMA + tokenizer), ``out/sd`` (tiny Stable Diffusion), unless ``sdxl``
    is False ``out/sdxl`` (tiny SDXL: two text encoders, text_time UNet) and, unless ``clip`` is False,
    ``out/clip`` (the tiny CLIP image-text model ``eval`` scores with); return ``Path(out)``.

    Refuses a non-empty ``out`` unless ``overwrite`` (which replaces ``llm/``, ``sd/``, ``sdxl/`` and
    ``clip/`` only).
    Each part is built in a temporary folder inside ``out`` and renamed into place when complete.
    """
    out = Path(out)
    _check_out(out, overwrite)
    # Fail early, before the slow imports, if a tokenizer wheel is missing.
    clip_bpe_file()
    if llm_tokenizer == "sentencepiece":
        llama_sentencepiece_file()
    out.mkdir(parents=True, exist_ok=True)
    log = get_logger()
    for name, builder, kw in (
        ("llm", build_tiny_llm, dict(tokenizer=llm_tokenizer, **(llm_overrides or {}))),
        ("sd", build_tiny_sd, dict(sd_overrides or {})),
        *([("sdxl", build_tiny_sdxl, {})] if sdxl else []),
        *([("clip", build_tiny_clip, {})] if clip else []),
    ):
        t0 = time.perf_counter()
        log.info(f"building tiny {name} in {out / name} ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out))
        try:
            builder(tmp, seed=seed, **kw)
            final = out / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # publishes a whole folder (not atomic_path, which is for files)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info(f"wrote {final} ({time.perf_counter() - t0:.1f} s)")
    return out
