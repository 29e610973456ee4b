"""Causal-LM features for SUR-adapter: load any Hugging Face decoder-only LM (optionally quantized
with bitsandbytes, truncated after the deepest requested layer) and pool its decoder layers' raw
outputs over each prompt's tokens.

The stored value for layer L (0-based) is the raw output of decoder layer L: the residual stream
*before* the model's final norm, for every L including the last (``output_hidden_states`` would give
the normed state for the last entry). It is taken with forward hooks on the decoder layers, found
generically (the ``nn.ModuleList`` of ``num_hidden_layers`` blocks), never from model-name strings.
Pooling is over the tokens the tokenizer produces by default (BOS included where it adds one),
padding excluded by selection (padded positions may hold NaN under SDPA), with explicit
``position_ids`` so that left padding does not shift RoPE positions. Prompts are batched by length
(sorted buckets), and a prompt's vector does not depend on its batch, its padding or the padding
side.

Heavy libraries (torch, transformers, bitsandbytes) are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from surpipe.errors import SurpipeError

QUANTS = ("none", "8bit", "4bit")
POOLINGS = ("mean", "last", "tokens")
DTYPES = ("auto", "float32", "float16", "bfloat16")
PADDING_SIDES = ("right", "left")

_QUIET_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


def quiet_libraries() -> None:
    """Silence per-call warnings (bitsandbytes int8 cast notice, optional-kernel notices) and the
    weight-loading progress bars of transformers; real errors still surface."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported by the loader
        pass


# --------------------------------------------------------------------------- names and identity


def is_local(model: str) -> bool:
    """A local folder (existing path, or anything written as a path) rather than a hub id."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~"))


def sanitize_name(name: str) -> str:
    """Letters, digits, ``.``, ``_`` and ``-`` only (others become ``-``), no leading dot."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lstrip(".")
    return s or "model"


def model_basename(model: str) -> str:
    """A group-name-safe name for a model: its folder name or hub repo name, sanitised."""
    base = Path(model.rstrip("/\\")).expanduser().resolve().name if is_local(model) else model.rstrip("/").split("/")[-1]
    return sanitize_name(base or "model")


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


# --------------------------------------------------------------------------- config checks


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_config(model: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig`` (no weights), with clear errors for the usual mistakes."""
    quiet_libraries()
    from transformers import AutoConfig

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
        raise SurpipeError(f"cannot read the config of {model}: {_first_line(e)}") from None
    except Exception as e:
        offline = " (HF_HUB_OFFLINE is set: only cached or local models can be used)" \
            if os.environ.get("HF_HUB_OFFLINE") and not is_local(model) else ""
        raise SurpipeError(f"cannot read the config of {model}{offline}: {_first_line(e)}") from None


def num_layers_of(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise SurpipeError(f"model config ({type(config).__name__}) has no num_hidden_layers; "
                           "not a decoder-only causal LM surpipe can read")
    return n


def check_causal_lm(config, model: str) -> None:
    """Refuse configs that are not decoder-only causal LMs, judged from the config (its class and
    its ``architectures``), never from the model's name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

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
    import copy

    cfg = copy.deepcopy(config)
    n = num_layers_of(config)
    if keep >= n:
        return cfg
    for k, v in list(vars(cfg).items()):
        if isinstance(v, (list, tuple)) and len(v) == n and k not in ("architectures",):
            setattr(cfg, k, type(v)(v[:keep]))
    cfg.num_hidden_layers = keep
    return cfg


# --------------------------------------------------------------------------- dtype / device


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: float32 on CPU (bf16 matmuls are slow there), bfloat16 on CUDA when supported, else
    float16."""
    if dtype != "auto":
        return dtype
    if not str(device).startswith("cuda"):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


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
    import torch.nn as nn

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
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=bool(double_quant))
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


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


def load_tokenizer(model: str, revision: str | None = None, trust_remote_code: bool = False):
    quiet_libraries()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise SurpipeError(f"cannot load the tokenizer of {model}: {_first_line(e)}") from None


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
    import inspect

    import torch
    from transformers import AutoModel

    config = config if config is not None else read_config(model, revision, trust_remote_code)
    check_causal_lm(config, model)
    n = num_layers_of(config)
    wanted = resolve_layers(layers, n)
    keep = wanted[-1] + 1 if truncate else n
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
            raise SurpipeError(f"--quant {quant} needs bitsandbytes ({_first_line(e)}); "
                               "pip install bitsandbytes, or use --quant none") from None
        quiet_libraries()
        kwargs["quantization_config"] = _bnb_config(quant, double_quant, compute)
        kwargs["device_map"] = {"": device}
        if not on_cuda:
            kwargs["dtype"] = torch.float32  # non-quantized parts (embeddings, norms) in fp32 on CPU
            dt = "float32"
    tok = tokenizer if tokenizer is not None else load_tokenizer(model, revision, trust_remote_code)
    try:
        m = AutoModel.from_pretrained(model, **kwargs)
    except SurpipeError:
        raise
    except Exception as e:  # safetensors, torch and transformers raise many types for damaged weights
        raise SurpipeError(f"cannot load the weights of {model}: {_first_line(e)}") from None
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
    info = {
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
    return LoadedLLM(model=m, tokenizer=tok, layers=lay, config=config, model_id=model, num_hidden_layers=n,
                     hidden_size=hidden, device=str(device), dtype=dt, quant=quant,
                     accepts_position_ids=accepts_pos, info=info)


# --------------------------------------------------------------------------- tokens and batches


def tokenize(tok, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt as the tokenizer makes them by default (special tokens included),
    truncated to ``max_tokens``."""
    if not texts:
        return []
    enc = tok(list(texts), add_special_tokens=True, truncation=True, max_length=int(max_tokens))
    ids = [list(x) for x in enc["input_ids"]]
    for t, x in zip(texts, ids):
        if not x:
            raise SurpipeError(f"prompt {t!r} gives no tokens with this tokenizer")
    return ids


def length_buckets(lengths: Sequence[int], batch_size: int, bucket: bool = True) -> list[list[int]]:
    """Batches of indices. With ``bucket``, indices sorted by length (longest first, ties in input
    order) and cut into batches of ``batch_size``: similar lengths share a batch, minimising padding."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if bucket else list(range(len(lengths)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_stats(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> tuple[int, int]:
    """(real tokens, padded slots computed) for ``batches`` of indices into ``lengths``."""
    real = padded = 0
    for b in batches:
        ls = [lengths[i] for i in b]
        real += sum(ls)
        padded += max(ls) * len(ls)
    return real, padded


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right"):
    """(input_ids [B, T], attention_mask [B, T]) as int64 tensors, padded on ``side``."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
    return ids, mask


def _pad_id(tok) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if v is not None:
            return int(v)
    return 0


# --------------------------------------------------------------------------- the forward pass


def layer_states(llm: LoadedLLM, ids, mask, layers: Sequence[int]) -> dict[int, Any]:
    """Raw outputs [B, T, H] of decoder ``layers`` (hooked; before the final norm) for one padded batch."""
    import torch

    got: dict[int, Any] = {}
    hooks = []

    def make(L):
        def hook(_mod, _args, out):
            got[L] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    for L in layers:
        hooks.append(llm.layers[L].register_forward_hook(make(L)))
    try:
        dev = llm.device
        kw = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        if llm.accepts_position_ids:
            # Positions count real tokens only, so left padding does not shift RoPE positions.
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(dev)
        with torch.inference_mode():
            llm.model(**kw)
    finally:
        for h in hooks:
            h.remove()
    missing = [L for L in layers if L not in got]
    if missing:  # pragma: no cover - a model whose forward skips layers
        raise RuntimeError(f"decoder layers {missing} did not run")
    return got


def pool(h, mask, pooling: str):
    """Pool hidden states ``h`` [B, T, H] over real tokens (``mask`` [B, T]) in float32.

    Padded positions are excluded by selection (never multiplied: they may hold NaN)."""
    import torch

    m = mask.to(h.device).bool()
    h32 = h.float()
    if pooling == "mean":
        s = torch.where(m[..., None], h32, torch.zeros((), dtype=h32.dtype, device=h32.device)).sum(1)
        return s / m.sum(1, keepdim=True).to(h32.dtype)
    if pooling == "last":
        last = m.long().cumsum(-1).argmax(-1)  # first position reaching the full count: the last real token
        return h32[torch.arange(h32.shape[0], device=h32.device), last]
    raise ValueError(f"unknown pooling {pooling!r}")


@dataclass
class Extracted:
    """Features of a list of prompts, in input order (numpy float32)."""

    pooled: dict[int, np.ndarray]  # layer -> [n, H]
    tokens: dict[int, list[np.ndarray]] | None  # layer -> per-prompt [len_i, H] (pooling "tokens")
    lengths: list[int]
    real_tokens: int = 0
    padded_tokens: int = 0


def extract(
    llm: LoadedLLM,
    token_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    pooling: str = "mean",
    batch_size: int = 16,
    padding_side: str = "right",
    bucket: bool = True,
    on_batch=None,
) -> Extracted:
    """Features of prompts given as token id lists. ``pooling``: ``mean`` or ``last`` give one vector
    per prompt and layer; ``tokens`` gives every token's state (and the mean in ``pooled``).
    ``on_batch(n_prompts, n_tokens)`` is called after each forward (progress counters)."""
    if pooling not in POOLINGS:
        raise SurpipeError(f"unknown pooling {pooling!r}; valid choices: {', '.join(POOLINGS)}")
    if padding_side not in PADDING_SIDES:
        raise SurpipeError(f"unknown padding side {padding_side!r}; valid choices: {', '.join(PADDING_SIDES)}")
    layers = list(layers)
    n = len(token_ids)
    lengths = [len(t) for t in token_ids]
    H = llm.hidden_size
    pooled = {L: np.zeros((n, H), dtype=np.float32) for L in layers}
    toks: dict[int, list] | None = {L: [None] * n for L in layers} if pooling == "tokens" else None
    pad = _pad_id(llm.tokenizer)
    real = padded = 0
    for batch in length_buckets(lengths, batch_size, bucket):
        ids, mask = pad_batch([token_ids[i] for i in batch], pad, padding_side)
        states = layer_states(llm, ids, mask, layers)
        m = mask.to(llm.device).bool()
        for L in layers:
            p = pool(states[L], mask, "last" if pooling == "last" else "mean").cpu().numpy()
            pooled[L][batch] = p
            if toks is not None:
                h = states[L].float()
                for j, i in enumerate(batch):
                    toks[L][i] = h[j][m[j]].cpu().numpy()
        real += int(mask.sum())
        padded += int(mask.numel())
        if on_batch is not None:
            on_batch(len(batch), int(mask.sum()))
    return Extracted(pooled=pooled, tokens=toks, lengths=lengths, real_tokens=real, padded_tokens=padded)
