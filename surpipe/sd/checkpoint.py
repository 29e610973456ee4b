"""Where the parts of a diffusers Stable Diffusion checkpoint are, and which family it is.

A checkpoint is a hub id or a local folder with one subfolder per component (``tokenizer/``,
``text_encoder/``, ``vae/``, SDXL's ``tokenizer_2/`` and ``text_encoder_2/``). This module checks a
local folder before anything is loaded (every problem at once), tells SD 1.x/2.x from SDXL by the
pipeline ``model_index.json`` names, reads one component's ``config.json`` without its weights, and
words load failures in one line. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from surpipe.errors import SurpipeError, first_line
from surpipe.hub import is_local_model as is_local  # one rule for every model argument

# Which files each component needs in a local diffusers folder (any one of the weight files).
WEIGHT_FILES = {
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors",
                     "pytorch_model.fp16.bin", "model.safetensors.index.json"),
    "text_encoder_2": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors",
                       "pytorch_model.fp16.bin", "model.safetensors.index.json"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
}
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))

def validate_folder(model: str, components: Iterable[str], what: str = "") -> None:
    """Check that a local diffusers folder has what ``components`` need; report every problem.

    ``components``: any of ``tokenizer``, ``text_encoder``, ``vae`` (and SDXL's ``tokenizer_2``,
    ``text_encoder_2``). Hub ids are not checked here (``from_pretrained`` reports those). ``what``
    says what the folder was taken for, in the message (e.g. " (an SDXL checkpoint ...)").
    """
    root = Path(model).expanduser()
    if not root.exists():
        raise SurpipeError(f"model folder not found: {model}")
    if not root.is_dir():
        raise SurpipeError(f"model {model} is a file; expected a diffusers Stable Diffusion folder "
                           "(with tokenizer/, text_encoder/ and vae/) or a hub id")
    problems = []
    for comp in components:
        sub = root / comp
        if not sub.is_dir():
            problems.append(f"{comp}/ is missing")
            continue
        if comp.startswith("tokenizer"):
            if not any(all((sub / f).is_file() for f in group) for group in TOKENIZER_FILES):
                problems.append(f"{comp}/ has neither vocab.json + merges.txt nor tokenizer.json")
            continue
        cfg = sub / "config.json"
        if not cfg.is_file():
            problems.append(f"{comp}/config.json is missing")
        else:
            try:
                json.loads(cfg.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problems.append(f"{comp}/config.json is not valid JSON ({e})")
        if not any((sub / f).is_file() for f in WEIGHT_FILES[comp]):
            problems.append(f"{comp}/ has no weights (looked for {', '.join(WEIGHT_FILES[comp])})")
    if problems:
        hint = ("" if (root / "model_index.json").is_file()
                else " (no model_index.json either: is this a diffusers Stable Diffusion folder?)")
        raise SurpipeError(f"model folder {model}{what} cannot be used{hint}:", problems)


def load_error(what: str, model: str, revision: str | None, e: Exception) -> SurpipeError:
    """One-line SurpipeError for a component that failed to load (naming the offline mode when set)."""
    where = model + (f"@{revision}" if revision else "")
    offline = " (HF_HUB_OFFLINE is set: hub ids resolve only from the local cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
    msg = first_line(e)
    return SurpipeError(f"cannot load the {what} of {where}{offline}: {msg}")


def model_index(model: str, revision: str | None) -> dict:
    """model_index.json of the checkpoint ({} when absent or unreadable)."""
    try:
        if is_local(model):
            p = Path(model).expanduser() / "model_index.json"
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
        from huggingface_hub import hf_hub_download  # heavy (its HTTP stack): only hub ids need it

        return json.loads(Path(hf_hub_download(model, "model_index.json", revision=revision)).read_text("utf-8"))
    except Exception:
        return {}


def component_json(model: str, sub: str, revision: str | None) -> dict | None:
    """A component's config.json (e.g. ``unet``) without loading its weights; None when absent."""
    try:
        if is_local(model):
            p = Path(model).expanduser() / sub / "config.json"
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
        from huggingface_hub import hf_hub_download  # heavy (its HTTP stack): only hub ids need it

        return json.loads(Path(hf_hub_download(model, "config.json", subfolder=sub or None,
                                               revision=revision)).read_text("utf-8"))
    except Exception:
        return None


# Pipelines that are not SD 1.x/2.x, with what to call them in the refusal.
_OTHER_PIPELINES = {
    "StableDiffusionXLPipeline": "SDXL", "StableDiffusionXLImg2ImgPipeline": "SDXL",
    "StableDiffusionXLInpaintPipeline": "SDXL", "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux", "KandinskyPipeline": "Kandinsky", "PixArtAlphaPipeline": "PixArt",
    "StableCascadePriorPipeline": "Stable Cascade",
}
SUPPORTED_PIPELINE = "StableDiffusionPipeline"
# The families surpipe handles, by the pipeline class that model_index.json names.
FAMILIES = {"sd": SUPPORTED_PIPELINE, "sdxl": "StableDiffusionXLPipeline"}
_FAMILY_NAMES = {"sd": "Stable Diffusion 1.x / 2.x", "sdxl": "SDXL"}


def check_pipeline_class(model: str, revision: str | None = None, accept: Sequence[str] = ("sd",)) -> str:
    """The family (``"sd"`` or ``"sdxl"``) of a checkpoint, from the pipeline its
    ``model_index.json`` names; refuse one the caller does not ``accept`` (SD 1.x/2.x: ``"sd"``;
    SDXL: ``"sdxl"``) or that surpipe does not know: other pipelines have other text encoders and
    conditioning, and would be silently mis-encoded. A folder without ``model_index.json`` is
    taken for SD (its components are checked when loaded). Shared by encode-latents, train and generate."""
    index = model_index(model, revision)
    cls = index.get("_class_name") if isinstance(index, dict) else None
    family = "sd" if cls is None else next((f for f, c in FAMILIES.items() if c == cls), None)
    if family in accept:
        return family
    name = _OTHER_PIPELINES.get(str(cls))
    if name is None and "XL" in str(cls):
        name = "SDXL"
    what = f"{name} is not supported yet" if name else "this pipeline is not supported"
    if family is not None and name is None:
        name = _FAMILY_NAMES[family]
        what = f"{name} is not supported by this command yet"
    takes = " or ".join(f"{FAMILIES[f]} ({_FAMILY_NAMES[f]})" for f in accept)
    raise SurpipeError(
        f"{model} is a {cls} checkpoint (model_index.json): {what}; this command works with "
        f"{takes} checkpoints only")


def vae_subfolder(vae: str, revision: str | None = None) -> str | None:
    """Where the AutoencoderKL of a ``--vae`` argument lives: None when it is itself a VAE (a folder
    or hub repo with ``config.json`` at its root, as ``madebyollin/sdxl-vae-fp16-fix``), ``"vae"``
    for a model folder or repo holding ``vae/``."""
    if is_local(vae):
        root = Path(vae).expanduser()
        if not root.is_dir():
            raise SurpipeError(f"--vae {vae}: folder not found")
        if (root / "config.json").is_file():
            return None
        if (root / "vae").is_dir():
            return "vae"
        raise SurpipeError(f"--vae {vae} is neither an AutoencoderKL folder (config.json and weights) nor a "
                           "model folder with vae/")
    return None if component_json(vae, "", revision) is not None else "vae"
