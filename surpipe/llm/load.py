"""Loading a causal LM's base decoder for feature extraction: dtype, bitsandbytes quantization
(8-bit, 4-bit NF4), truncation after the deepest requested layer, and the decoder layers found
structurally (never from model-name strings)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

from surpipe.devices import resolve_dtype, torch_dtype
from surpipe.errors import SurpipeError, first_line
from surpipe.llm.checks import (check_causal_lm, num_layers_of, quiet_libraries, read_config,
                                resolve_layers, truncated_config)

QUANTS = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "float16", "bfloat16")


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedLLM:
    """A decoder stack ready for feature extraction."""

    model: Any  # the base model (no LM head), truncated after the deepest requested layer
    tokenizer: Any
    layers: Any  # the nn.ModuleList of decoder layers (truncated)
    config: Any  # the FULL model's config
    model_id: str
    num_hidden_layers: int  # of the full model
    hidden_size: int
    device: str
    dtype: str  # compute dtype of the non-quantized parts
    quant: str
    accepts_position_ids: bool
    info: dict = field(default_factory=dict)


def check_cpu_nf4_shapes(model, model_id: str) -> None:
    """bitsandbytes' CPU NF4 kernel packs weights in groups of 32 output rows and fails with a bare
    assertion otherwise; name the offending layers before the first forward instead."""
    bad = sorted({f"{name} (out_features {m.out_features})" for name, m in model.named_modules()
                  if type(m).__name__ == "Linear4bit" and m.out_features % 32})
    if bad:
        raise SurpipeError(
            f"{model_id}: 4-bit (NF4) on CPU needs every quantized layer's output size to be a multiple "
            f"of 32 (a bitsandbytes CPU kernel limit); use --quant 8bit or none here, or a GPU:",
            bad[:10] + ([f"... and {len(bad) - 10} more"] if len(bad) > 10 else []))


def find_decoder_layers(model, n: int):
    """The ``nn.ModuleList`` holding the ``n`` decoder layers of ``model`` (found structurally: the
    first ModuleList of ``n`` modules of one class, looked up in the decoder if the model has one)."""
    import torch.nn as nn  # heavy: keeps --help torch-free

    roots = []
    get_dec = getattr(model, "get_decoder", None)
    if callable(get_dec):
        try:
            dec = get_dec()
            if dec is not None:
                roots.append(dec)
        except Exception:
            pass
    roots.append(model)
    for root in roots:
        for _, mod in root.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) == n and len({type(m) for m in mod}) == 1:
                return mod
    raise SurpipeError(f"cannot find the {n} decoder layers of {type(model).__name__}; "
                       "this architecture is not supported by extract-llm")


def _bnb_config(quant: str, double_quant: bool, compute_dtype):
    from transformers import BitsAndBytesConfig  # heavy: keeps --help torch-free

    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=bool(double_quant))
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(model: str, revision: str | None = None, trust_remote_code: bool = False):
    quiet_libraries()
    from transformers import AutoTokenizer  # heavy: keeps --help torch-free

    try:
        return AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise SurpipeError(f"cannot load the tokenizer of {model}: {first_line(e)}") from None


def default_max_tokens(config, tok) -> int:
    """The longest prompt the model takes: ``max_position_embeddings`` (or the tokenizer's
    ``model_max_length`` when that is smaller and sane)."""
    limits = []
    mpe = getattr(config, "max_position_embeddings", None)
    if isinstance(mpe, int) and mpe > 0:
        limits.append(mpe)
    mml = getattr(tok, "model_max_length", None)
    if isinstance(mml, int) and 0 < mml < 10**7:
        limits.append(mml)
    return min(limits) if limits else 4096


def _load_kwargs(config, keep: int, quant: str, dtype: str, device: str, revision, trust_remote_code: bool,
                 double_quant: bool) -> tuple[dict[str, Any], str, Any]:
    """``from_pretrained`` keyword arguments of the truncated model, the compute dtype's name and the
    4-bit compute dtype: bitsandbytes quantization when asked for (refused with advice when missing)."""
    import torch  # heavy: keeps --help torch-free

    dt = resolve_dtype(dtype, device)
    tdt = torch_dtype(dt)
    on_cuda = str(device).startswith("cuda")
    compute = tdt if on_cuda else torch.float32
    kwargs: dict[str, Any] = dict(config=truncated_config(config, keep), revision=revision,
                                  trust_remote_code=trust_remote_code, dtype=tdt)
    if quant != "none":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:
            raise SurpipeError(f"--quant {quant} needs bitsandbytes ({first_line(e)}); "
                               "pip install bitsandbytes, or use --quant none") from None
        quiet_libraries()
        kwargs["quantization_config"] = _bnb_config(quant, double_quant, compute)
        kwargs["device_map"] = {"": device}
        if not on_cuda:
            kwargs["dtype"] = torch.float32  # non-quantized parts (embeddings, norms) in fp32 on CPU
            dt = "float32"
    return kwargs, dt, compute


def _load_info(m, config, n: int, keep: int, hidden: int, quant: str, double_quant: bool, compute, dt: str,
               device: str) -> dict:
    """What a loaded model records in provenance: classes, sizes, quantization, dtype, attention."""
    return {
        "model_class": type(m).__name__,
        "config_class": type(config).__name__,
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(config, "architectures", None) or []),
        "num_hidden_layers": n,
        "layers_loaded": keep,
        "hidden_size": hidden,
        "quantization": quant,
        "double_quant": bool(double_quant) if quant == "4bit" else None,
        "bnb_4bit_compute_dtype": str(compute).replace("torch.", "") if quant == "4bit" else None,
        "dtype": dt,
        "device": str(device),
        "attn_implementation": getattr(m.config, "_attn_implementation", None),
        "commit_hash": getattr(config, "_commit_hash", None),
    }


def load_llm(
    model: str,
    layers: Sequence[int],
    *,
    quant: str = "none",
    dtype: str = "auto",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    double_quant: bool = True,
    truncate: bool = True,
    config=None,
    tokenizer=None,
) -> LoadedLLM:
    """Load the base decoder of causal LM ``model`` (hub id or folder) for extracting ``layers``.

    The LM head is never loaded; with ``truncate`` (default) neither are the layers above the deepest
    requested one. ``quant``: ``none`` (``dtype`` weights), ``8bit`` (LLM.int8) or ``4bit`` (NF4,
    ``double_quant`` optional) through bitsandbytes; on CPU the 4-bit compute dtype is float32.
    """
    if quant not in QUANTS:
        raise SurpipeError(f"unknown quantization {quant!r}; valid choices: {', '.join(QUANTS)}")
    if dtype not in DTYPES:
        raise SurpipeError(f"unknown dtype {dtype!r}; valid choices: {', '.join(DTYPES)}")
    quiet_libraries()
    from transformers import AutoModel  # heavy: keeps --help torch-free

    config = config if config is not None else read_config(model, revision, trust_remote_code)
    check_causal_lm(config, model)
    n = num_layers_of(config)
    wanted = resolve_layers(layers, n)
    keep = wanted[-1] + 1 if truncate else n
    kwargs, dt, compute = _load_kwargs(config, keep, quant, dtype, device, revision, trust_remote_code, double_quant)
    tok = tokenizer if tokenizer is not None else load_tokenizer(model, revision, trust_remote_code)
    try:
        m = AutoModel.from_pretrained(model, **kwargs)
    except SurpipeError:
        raise
    except Exception as e:  # safetensors, torch and transformers raise many types for damaged weights
        raise SurpipeError(f"cannot load the weights of {model}: {first_line(e)}") from None
    m.eval()
    m.requires_grad_(False)
    if quant == "none":
        m.to(device)
    lay = find_decoder_layers(m, keep)
    if len(lay) != keep:  # pragma: no cover - find_decoder_layers looks for exactly `keep`
        raise SurpipeError(f"expected {keep} decoder layers, found {len(lay)}")
    try:
        params = inspect.signature(m.forward).parameters
        accepts_pos = "position_ids" in params
    except (TypeError, ValueError):
        accepts_pos = False
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    info = _load_info(m, config, n, keep, hidden, quant, double_quant, compute, dt, device)
    return LoadedLLM(model=m, tokenizer=tok, layers=lay, config=config, model_id=model, num_hidden_layers=n,
                     hidden_size=hidden, device=str(device), dtype=dt, quant=quant,
                     accepts_position_ids=accepts_pos, info=info)


def load_causal_lm(model: str, *, quant: str = "4bit", device: str = "cpu", revision: str | None = None,
                   option: str = "--question-model"):
    """(LM with its head, tokenizer) of causal LM ``model`` for generating text, quantized as
    ``extract-llm`` quantizes (``quant``: none, 8bit, 4bit), every layer kept."""
    if quant not in QUANTS:
        raise SurpipeError(f"unknown quantization {quant!r}; valid choices: {', '.join(QUANTS)}")
    quiet_libraries()
    from transformers import AutoModelForCausalLM  # heavy: keeps --help torch-free

    config = read_config(model, revision, False)
    check_causal_lm(config, model)
    kwargs, _, _ = _load_kwargs(config, num_layers_of(config), quant, "auto", device, revision, False, True)
    tok = load_tokenizer(model, revision)
    try:
        lm = AutoModelForCausalLM.from_pretrained(model, **kwargs).eval()
    except Exception as e:  # noqa: BLE001 - safetensors, torch and transformers raise many types
        raise SurpipeError(f"{option} {model}: cannot load it as a causal LM ({first_line(e)})") from None
    if quant == "none":
        lm.to(device)
    return lm, tok
