"""Reading model configs by hub id or local folder, without loading weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

from surpipe.errors import SurpipeError

_CONFIG_NAMES = {"scheduler": "scheduler_config.json"}


def read_model_config(model: str, subfolder: str, revision: str | None = None) -> dict:
    """The JSON config of component ``subfolder`` (``unet``, ``scheduler`` ...) of a diffusers
    checkpoint given as a local folder or a hub id; a clear SurpipeError when it is not there."""
    fname = _CONFIG_NAMES.get(subfolder, "config.json")
    local = Path(model).expanduser()
    if local.exists() or model.startswith((".", "/", "~")):
        if not local.is_dir():
            raise SurpipeError(f"model folder not found: {model}")
        path = local / subfolder / fname
        if not path.is_file():
            kind = "" if (local / "model_index.json").is_file() else \
                " (no model_index.json: is this a diffusers Stable Diffusion folder?)"
            raise SurpipeError(f"{model} has no {subfolder}/{fname}{kind}")
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, fname, subfolder=subfolder, revision=revision))
        except Exception as e:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SurpipeError(f"cannot read {subfolder}/{fname} of {model}{offline}: {first}") from None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurpipeError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise SurpipeError(f"{path} does not hold a JSON object")
    return cfg
