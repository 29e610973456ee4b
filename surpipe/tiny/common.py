"""Shared parts of the tiny-model builders: the wheel files the real tokenizers come from, seed
offsets, and the ``surpipe_tiny.json`` marker each built folder holds."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from surpipe.errors import SurpipeError
from surpipe.store import library_versions  # the one list of versions that shape stored values

# The marker file in every folder make-tiny-models writes: generate and eval warn that such
# models' pictures and scores are noise (surpipe.evaluation.render.tiny_model_note).
TINY_MARKER = "surpipe_tiny.json"

PIP_HINT = "pip install --no-deps open_clip_torch mistral-common"

# Seed offsets, so that changing one component never changes the others' weights.
SEED_LLM, SEED_TEXT, SEED_VAE, SEED_UNET = 0, 1, 2, 3


def wheel_file(package: str, relpath: str, pip_name: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package
    (open_clip's ``__init__`` needs torchvision, which we do not need)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / relpath
        if p.is_file():
            return p
    if not locations:
        raise SurpipeError(
            f"the '{pip_name}' package is needed for its bundled tokenizer file {package}/{relpath}; "
            f"install it with: {PIP_HINT}"
        )
    raise SurpipeError(
        f"the installed '{pip_name}' package has no {package}/{relpath} (looked in {', '.join(locations)}); "
        f"reinstall it with: {PIP_HINT}"
    )


def llama_sentencepiece_file() -> Path:
    """The LLaMA-style SentencePiece model (32,000 pieces) shipped in the mistral-common wheel."""
    return wheel_file("mistral_common", "data/tokenizer.model.v1", "mistral-common")


def clip_bpe_file() -> Path:
    """The CLIP BPE merges file shipped in the open_clip_torch wheel."""
    return wheel_file("open_clip", "bpe_simple_vocab_16e6.txt.gz", "open_clip_torch")


def clean_tokenizer_config(folder: Path) -> None:
    """Drop load-time flags that transformers 5 writes into tokenizer_config.json after loading from
    a local folder (``is_local``, ``local_files_only``); they describe our build, not the tokenizer."""
    p = Path(folder) / "tokenizer_config.json"
    if p.is_file():
        data = json.loads(p.read_text(encoding="utf-8"))
        if any(k in data for k in ("is_local", "local_files_only")):
            data.pop("is_local", None)
            data.pop("local_files_only", None)
            p.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_marker(out: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write the ``surpipe_tiny.json`` marker (what was built, from what) with the library versions."""
    info = {**info, "versions": library_versions()}
    (Path(out) / TINY_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
