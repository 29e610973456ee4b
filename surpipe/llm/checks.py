"""Reading and checking an LLM's config before any weights load: the clear errors for the usual
mistakes, the causal-LM check, layer indices and the truncated config."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Sequence

from surpipe.errors import SurpipeError, first_line
from surpipe.hub import is_local_model as is_local

_QUIET_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


def quiet_libraries() -> None:
    """Silence per-call warnings (bitsandbytes int8 cast notice, optional-kernel notices) and the
    weight-loading progress bars of transformers; real errors still surface."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers  # heavy: keeps --help torch-free

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported by the loader
        pass


def read_config(model: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig`` (no weights), with clear errors for the usual mistakes."""
    quiet_libraries()
    from transformers import AutoConfig  # heavy: keeps --help torch-free

    if is_local(model):
        p = Path(model).expanduser()
        if not p.exists():
            raise SurpipeError(f"model folder not found: {model}")
        if not p.is_dir():
            raise SurpipeError(f"--model {model} is a file; give the model's folder (with config.json) or a hub id")
        if not (p / "config.json").is_file():
            raise SurpipeError(f"{model} is not a Hugging Face model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as e:
        msg = str(e)
        if "trust_remote_code" in msg:
            raise SurpipeError(f"{model} needs custom code from its repository; if you trust it, pass "
                               "--trust-remote-code") from None
        raise SurpipeError(f"cannot read the config of {model}: {first_line(e)}") from None
    except Exception as e:
        offline = " (HF_HUB_OFFLINE is set: only cached or local models can be used)" \
            if os.environ.get("HF_HUB_OFFLINE") and not is_local(model) else ""
        raise SurpipeError(f"cannot read the config of {model}{offline}: {first_line(e)}") from None


def num_layers_of(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise SurpipeError(f"model config ({type(config).__name__}) has no num_hidden_layers; "
                           "not a decoder-only causal LM surpipe can read")
    return n


def check_causal_lm(config, model: str) -> None:
    """Refuse configs that are not decoder-only causal LMs, judged from the config (its class and
    its ``architectures``), never from the model's name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # heavy: keeps --help torch-free

    kind = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise SurpipeError(f"{model} is an encoder-decoder model ({kind}); extract-llm needs a decoder-only "
                           "causal LM (LLaMA, Mistral, Qwen2 ...)")
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForCausalLM" in auto_map:  # remote code that declares a causal LM
        return
    try:
        causal_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        causal_cls = None
    if causal_cls is None:
        raise SurpipeError(f"{model} is not a causal language model (config type {kind} has no causal-LM "
                           "architecture in transformers); extract-llm needs a decoder-only LM")
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        causal_names = set()
        for v in MODEL_FOR_CAUSAL_LM_MAPPING.values():
            for c in (v if isinstance(v, (tuple, list)) else (v,)):
                causal_names.add(getattr(c, "__name__", str(c)))
        if not any(a in causal_names for a in archs):
            raise SurpipeError(
                f"{model} is not a causal language model: its config lists architectures "
                f"{', '.join(archs)} (model type {kind}), none of which is a causal LM; extract-llm needs "
                "a decoder-only LM such as LLaMA, Mistral or Qwen2")


def resolve_layers(layers: Sequence[int], num_hidden_layers: int) -> list[int]:
    """Sorted unique layer indices; negative ones count from the end (-1 = last decoder layer)."""
    if not layers:
        raise SurpipeError("no layers requested; give --layers L[,L...] (0-based decoder layer indices)")
    out = []
    for L in layers:
        r = L + num_hidden_layers if L < 0 else L
        if not 0 <= r < num_hidden_layers:
            raise SurpipeError(f"layer {L} is out of range: this model has {num_hidden_layers} decoder layers, "
                               f"valid indices 0..{num_hidden_layers - 1} (or -{num_hidden_layers}..-1 from the end)")
        out.append(r)
    return sorted(set(out))


def truncated_config(config, keep: int):
    """A copy of ``config`` with only the first ``keep`` decoder layers (per-layer lists such as
    ``layer_types`` cut too), so deeper layers are never built nor loaded."""
    cfg = copy.deepcopy(config)
    n = num_layers_of(config)
    if keep >= n:
        return cfg
    for k, v in list(vars(cfg).items()):
        if isinstance(v, (list, tuple)) and len(v) == n and k not in ("architectures",):
            setattr(cfg, k, type(v)(v[:keep]))
    cfg.num_hidden_layers = keep
    return cfg
