"""The SUR-adapter network (arXiv 2305.05189), state-dict compatible with the authors' release.

Architecture (see docs / method notes), for CLIP embeddings ``x`` of shape [B, L, D] (L = 77):

1. ``transformer_encoder``: ``nn.TransformerEncoder`` of ``num_layers`` post-norm ReLU
   ``nn.TransformerEncoderLayer`` (no final norm), ``e = encoder(x)``.
2. ``attention``: ``Q = query_layer(e)``, ``K = key_layer(x)``, ``V = x``;
   ``w = x + softmax(Q K^T / sqrt(D)) V`` (attention over the L tokens of each prompt);
   ``a = output_layer(w) + w`` with ``output_layer = Linear -> ReLU -> Linear``.
   ``value_layer`` exists (the authors' state dict has it) but is unused, as in theirs; it is
   frozen (``requires_grad=False``) so optimizers and DDP never see it.
3. ``fc``: ``Linear(D, D)`` with its weight initialised to zeros (as theirs).
4. ``out = adapter_weight * fc(a) + (1 - adapter_weight) * x``. At initialisation
   ``out = (1 - w) x + w * fc.bias``, not ``x``.

Token mixing in the encoder (the authors' ``batch_first=False`` quirk):

- ``"sequence"``: the encoder's self-attention runs across the L tokens of each prompt (what the
  paper describes).
- ``"tokenwise"``: every token is encoded on its own (self-attention over a length-1 sequence).
  This is exactly what the authors' code computed when trained at batch size 1: they fed
  [1, L, D] to an encoder built with ``batch_first=False``, so torch saw a sequence of length 1
  and a batch of L tokens. Their released checkpoint expects this mode; ``import-official`` sets it.

In both modes rows of a batch never mix (the authors' inference ran the encoder on the
concatenated [uncond, cond] batch, which mixed the two prompts token by token; we do not), so
conditional and unconditional embeddings can share one batch.

Dropout (encoder layers only, p = ``dropout``) is active in ``train()`` mode and off in ``eval()``
mode; ``from_pretrained`` returns the module in ``eval()`` mode.

The authors' module also holds ``encoder_layer``, the template layer ``transformer_encoder`` was
copied from; its 12 tensors are in every state dict they saved but never used. SURAdapter has no
such attribute (36 keys); :func:`split_template_layer` accepts those keys on import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional, Union

import torch
from torch import nn

from surpipe.errors import SurpipeError

TOKEN_MIXING = ("sequence", "tokenwise")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CLASS_NAME = "SURAdapter"
# Largest sizes a config may ask for (SD text encoders are 768-4096 wide); checked before allocating.
from surpipe.limits import MAX_PARAMETERS, MAX_SIZES  # noqa: E402  (torch-free home, for CLI ranges)
# The authors' Adapter keeps its template nn.TransformerEncoderLayer as `encoder_layer`: their
# state dicts carry it (12 keys), but their forward never uses it.
TEMPLATE_PREFIX = "encoder_layer."

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


@dataclass
class SURAdapterConfig:
    """Hyper-parameters of a :class:`SURAdapter` (the authors' values are the defaults, SD1.x width)."""

    width: int = 768
    nhead: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 2
    dropout: float = 0.1
    adapter_weight: float = 0.1
    token_mixing: Literal["sequence", "tokenwise"] = "sequence"

    def problems(self) -> list[str]:
        """Every invalid setting, as messages (empty when the config is valid).

        Sizes are bounded (``MAX_SIZES``, ``MAX_PARAMETERS``) so that a damaged or hostile
        ``config.json`` is refused here, before any weight is allocated.
        """
        p = []

        def size(name: str, lo: int) -> bool:
            v = getattr(self, name)
            hi = MAX_SIZES[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v <= hi:
                p.append(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
                return False
            return True

        ok_w, ok_h, ok_f, ok_n = (size("width", 1), size("nhead", 1), size("dim_feedforward", 1),
                                  size("num_layers", 1))
        if ok_w and ok_h and self.width % self.nhead:
            p.append(f"width {self.width} is not divisible by nhead {self.nhead}")
        if ok_w and ok_f and ok_n:
            n = self.parameter_count()
            if n > MAX_PARAMETERS:
                p.append(f"these sizes make {n:,} parameters (more than {MAX_PARAMETERS:,}): "
                         f"width={self.width}, dim_feedforward={self.dim_feedforward}, num_layers={self.num_layers}")
        for name, lo, hi, closed in (("dropout", 0.0, 1.0, False), ("adapter_weight", 0.0, 1.0, True)):
            v = getattr(self, name)
            good = (not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
                    and lo <= v and (v <= hi if closed else v < hi))
            if not good:
                p.append(f"{name} must be a number in [{lo:g}, {hi:g}{']' if closed else ')'}, got {v!r}")
        if self.token_mixing not in TOKEN_MIXING:
            p.append(f"token_mixing must be one of {', '.join(TOKEN_MIXING)}, got {self.token_mixing!r}")
        return p

    def parameter_count(self) -> int:
        """Number of values in the state dict these sizes give (value_layer included)."""
        d, f = self.width, self.dim_feedforward
        layer = (3 * d * d + 3 * d) + (d * d + d) + (f * d + f) + (d * f + d) + 4 * d
        return self.num_layers * layer + 5 * (d * d + d) + (d * d + d)


class SURAttention(nn.Module):
    """The authors' attention block (attribute names match their state dict)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.query_layer = nn.Linear(width, width)
        self.key_layer = nn.Linear(width, width)
        self.value_layer = nn.Linear(width, width)  # in the authors' state dict; unused, as theirs
        self.value_layer.requires_grad_(False)
        self.output_layer = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        q = self.query_layer(e)
        k = self.key_layer(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.width)  # [B, L, L]
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # softmax in fp32 for half-precision inputs
        probs = torch.softmax(scores, dim=-1).to(x.dtype)
        w = x + torch.matmul(probs, x)
        return self.output_layer(w) + w


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise SurpipeError listing every missing key, unexpected key and shape mismatch."""
    expected = model.state_dict()
    problems = []
    for k in expected:
        if k not in state_dict:
            problems.append(f"missing key: {k}")
    for k in state_dict:
        if k not in expected:
            problems.append(f"unexpected key: {k}")
    for k, v in state_dict.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            problems.append(f"shape mismatch for {k}: {source} has {list(v.shape)}, "
                            f"the model expects {list(expected[k].shape)}")
    if problems:
        raise SurpipeError(f"{source} does not match a SUR-adapter with these settings "
                           f"({_describe(model)}):", problems)


def split_template_layer(model: "SURAdapter", state_dict: Mapping[str, torch.Tensor],
                         source: str) -> tuple[dict, list[str]]:
    """``(state_dict without encoder_layer.*, the encoder_layer.* keys removed)``.

    The authors' ``Adapter`` keeps the template layer it built ``transformer_encoder`` from as
    ``encoder_layer``; their saved state dicts carry its 12 (untrained, unused) tensors. Those are
    accepted only as one complete layer shaped like ``transformer_encoder.layers.0``; a partial or
    misshapen set is refused, as is every other unexpected key (by :func:`check_state_dict`).
    """
    extra = {k: v for k, v in state_dict.items() if k.startswith(TEMPLATE_PREFIX)}
    if not extra:
        return dict(state_dict), []
    layer = model.transformer_encoder.layers[0].state_dict()
    expected = {TEMPLATE_PREFIX + k: tuple(v.shape) for k, v in layer.items()}
    problems = [f"missing key: {k} (the other {TEMPLATE_PREFIX}* keys of the authors' template layer are present)"
                for k in expected if k not in extra]
    for k, v in extra.items():
        if k not in expected:
            problems.append(f"unexpected key: {k}")
        elif tuple(v.shape) != expected[k]:
            problems.append(f"shape mismatch for {k}: {source} has {list(v.shape)}, "
                            f"the authors' template layer has {list(expected[k])}")
    if problems:
        raise SurpipeError(f"{source} does not match a SUR-adapter with these settings "
                           f"({_describe(model)}):", problems)
    return {k: v for k, v in state_dict.items() if k not in extra}, sorted(extra)


def resolve_adapter_dir(path: Union[str, os.PathLike]) -> Path:
    """A training run folder (its ``adapter/`` subfolder) or an adapter folder -> the adapter folder.

    The one rule for every place that takes an adapter (``from_pretrained``, ``generate``, ``eval``).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SurpipeError(f"adapter folder not found: {p} (give a training run folder or an adapter folder)")
    if not p.is_dir():
        raise SurpipeError(f"{p} is not a folder: give a training run folder or an adapter folder "
                           f"({CONFIG_NAME} + {WEIGHTS_NAME}); for the authors' .pt run "
                           f"`surpipe import-official` first")
    if (p / "adapter" / WEIGHTS_NAME).is_file():
        return p / "adapter"
    if (p / WEIGHTS_NAME).is_file() or (p / CONFIG_NAME).is_file():
        return p  # an adapter folder (from_pretrained names what it lacks)
    is_run = (p / "adapter").exists() or (p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file()
    hint = " (a training run without a finished adapter/: run or resume `surpipe train`)" if is_run else ""
    raise SurpipeError(f"{p} is neither a training run folder (with adapter/) nor an adapter folder "
                       f"(with {CONFIG_NAME} and {WEIGHTS_NAME}){hint}")


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return type(model).__name__
    return (f"width={cfg.width}, nhead={cfg.nhead}, dim_feedforward={cfg.dim_feedforward}, "
            f"num_layers={cfg.num_layers}")


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``torch.float16`` or a name such as ``"float16"``/``"fp16"``/``"bf16"`` -> a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise SurpipeError(f"unknown dtype {dtype!r} (valid: {', '.join(sorted(_DTYPES))})")
    return _DTYPES[name]


class SURAdapter(nn.Module):
    """SUR-adapter: CLIP last hidden state [B, L, D] -> conditioned embeddings [B, L, D].

    ``SURAdapter(config)`` or ``SURAdapter(width=..., nhead=..., ...)``. Calling it returns ``out``
    only (ready for a diffusers pipeline's ``prompt_embeds``); :meth:`forward_with_aux` (or
    ``forward(x, return_aux=True)``) returns ``(out, e, fc(a))`` as the authors' forward did.
    Inputs are cast to the module's dtype; outputs are in the module's dtype.
    """

    def __init__(self, config: Optional[SURAdapterConfig] = None, **kwargs):
        super().__init__()
        if config is None:
            config = SURAdapterConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        problems = config.problems()
        if problems:
            raise SurpipeError("invalid SURAdapterConfig:", problems)
        self.config = config
        d = config.width
        layer = nn.TransformerEncoderLayer(
            d_model=d, nhead=config.nhead, dim_feedforward=config.dim_feedforward,
            dropout=config.dropout, activation="relu", batch_first=True, norm_first=False)
        # No final norm (the authors' nn.TransformerEncoder(layer, num_layers=2)): keys are
        # exactly transformer_encoder.layers.{i}.*; enable_nested_tensor changes no keys.
        self.transformer_encoder = nn.TransformerEncoder(
            layer, num_layers=config.num_layers, norm=None, enable_nested_tensor=False)
        self.attention = SURAttention(d)
        self.fc = nn.Linear(d, d)
        nn.init.zeros_(self.fc.weight)

    @property
    def adapter_weight(self) -> float:
        return float(self.config.adapter_weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder output ``e`` for ``x`` [B, L, D], per ``config.token_mixing``."""
        if self.config.token_mixing == "tokenwise":
            b, n, d = x.shape
            return self.transformer_encoder(x.reshape(b * n, 1, d)).reshape(b, n, d)
        return self.transformer_encoder(x)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.config.width:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise SurpipeError(f"SURAdapter expects embeddings of shape [batch, tokens, {self.config.width}], "
                               f"got {shape} (an adapter for another model's text encoder?)")
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return x

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(out, e, fc(a))``: output, encoder output (seen by the LLM loss), adapter branch."""
        x = self._check_input(x)
        e = self.encode(x)
        a = self.attention(x, e)
        f = self.fc(a)
        w = self.adapter_weight
        out = w * f + (1.0 - w) * x
        return out, e, f

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        out, e, f = self.forward_with_aux(x)
        return (out, e, f) if return_aux else out

    # ----------------------------------------------------------------- persistence
    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into the folder."""
        from safetensors.torch import save_file

        from surpipe import __version__

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.asdict(self.config)
        cfg["_class_name"] = CLASS_NAME
        cfg["_surpipe_version"] = __version__
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tag = uuid.uuid4().hex[:8]
        tmp_w = out / f".{WEIGHTS_NAME}.tmp-{tag}"
        tmp_c = out / f".{CONFIG_NAME}.tmp-{tag}"
        try:
            save_file(tensors, str(tmp_w), metadata={"format": "pt", "class": CLASS_NAME})
            tmp_c.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp_w, out / WEIGHTS_NAME)
            os.replace(tmp_c, out / CONFIG_NAME)
        finally:
            for t in (tmp_w, tmp_c):
                if t.exists():
                    t.unlink()
        return out

    @classmethod
    def from_pretrained(cls, pretrained: Union[str, os.PathLike], torch_dtype=None,
                        device: Union[str, torch.device, None] = None) -> "SURAdapter":
        """Load a folder written by :meth:`save_pretrained` (or a training run folder: its
        ``adapter/``); strict key and shape checks, sizes checked before any allocation.

        Returns the module in ``eval()`` mode (dropout off).
        """
        from surpipe import config as cfgmod

        folder = resolve_adapter_dir(pretrained)
        cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        missing = [p.name for p in (cfg_path, w_path) if not p.is_file()]
        if missing:
            raise SurpipeError(f"{folder} is not a SURAdapter folder: missing {', '.join(missing)}")
        try:
            data = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SurpipeError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise SurpipeError(f"{cfg_path} must hold a JSON object")
        name = data.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise SurpipeError(f"{cfg_path} describes a {name!r}, not a {CLASS_NAME}")
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        try:
            config = cfgmod.from_dict(SURAdapterConfig, data)
        except SurpipeError as e:
            raise SurpipeError(f"{cfg_path} is not a valid adapter config:", e.problems or [str(e)]) from None
        problems = config.problems()  # before allocating: a damaged file may ask for 10**9 wide
        if problems:
            raise SurpipeError(f"{cfg_path} is not a valid adapter config:", problems)
        model = cls(config)
        state = _load_safetensors(w_path)
        check_state_dict(model, state, str(w_path))
        model.load_state_dict(state, strict=True)
        dtype = parse_dtype(torch_dtype)
        model.to(device=device, dtype=dtype)
        return model.eval()


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
        raise SurpipeError(f"cannot read {path} as safetensors: {e}") from None
