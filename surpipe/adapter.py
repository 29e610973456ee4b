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
from typing import Literal, Optional, Union

import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from surpipe.adapter_io import (  # noqa: F401  (re-exported: the adapter's public names)
    CLASS_NAME, CONFIG_NAME, TEMPLATE_PREFIX, WEIGHTS_NAME, _load_safetensors, check_state_dict,
    resolve_adapter_dir, split_template_layer)
from surpipe.devices import torch_dtype as parse_dtype  # public name: a dtype name or alias -> torch dtype
from surpipe.config import from_dict, opt, read_json_object
from surpipe.errors import SurpipeError
# Largest sizes a config may ask for (SD text encoders are 768-4096 wide); checked before allocating.
from surpipe.limits import MAX_PARAMETERS, MAX_SIZES  # torch-free home, for CLI ranges
from surpipe.version import __version__

TOKEN_MIXING = ("sequence", "tokenwise")


@dataclass
class SURAdapterConfig:
    """Hyper-parameters of a :class:`SURAdapter` (the authors' values are the defaults, SD1.x width)."""

    # Ranges are checked by problems() (before any allocation), not by opt(): one place for them.
    width: int = opt(768, help="width D of the CLIP embeddings it conditions (768 for SD1.x)", group="model")
    nhead: int = opt(8, help="attention heads of each encoder layer (must divide width)", group="model")
    dim_feedforward: int = opt(2048, help="hidden width of each encoder layer's feed-forward block", group="model")
    num_layers: int = opt(2, help="transformer encoder layers", group="model")
    dropout: float = opt(0.1, help="dropout in the encoder layers (train mode only)", group="model")
    adapter_weight: float = opt(0.1, help="output mix: w * adapter branch + (1 - w) * input", group="model")
    token_mixing: Literal["sequence", "tokenwise"] = opt(
        "sequence", help="encoder attention across a prompt's tokens, or each token alone (authors' checkpoint)",
        group="model")
    pooled_width: Optional[int] = opt(None, help="SDXL: width of the pooled embedding its pooled head maps "
                                                 "(None: no head, the pooled embedding passes through)", group="model")

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
        if self.pooled_width is not None and (isinstance(self.pooled_width, bool) or not isinstance(
                self.pooled_width, numbers.Integral) or not 1 <= self.pooled_width <= MAX_SIZES["width"]):
            p.append(f"pooled_width must be null or an integer in [1, {MAX_SIZES['width']}], got {self.pooled_width!r}")
        if self.token_mixing not in TOKEN_MIXING:
            p.append(f"token_mixing must be one of {', '.join(TOKEN_MIXING)}, got {self.token_mixing!r}")
        return p

    def parameter_count(self) -> int:
        """Number of values in the state dict these sizes give (value_layer included)."""
        d, f = self.width, self.dim_feedforward
        layer = (3 * d * d + 3 * d) + (d * d + d) + (f * d + f) + (d * f + d) + 4 * d
        n = self.num_layers * layer + 5 * (d * d + d) + (d * d + d)
        if isinstance(self.pooled_width, numbers.Integral) and not isinstance(self.pooled_width, bool):
            n += 2 * (self.pooled_width ** 2 + self.pooled_width)
        return n


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


# Hub integration through huggingface_hub's ModelHubMixin rather than diffusers' ModelMixin /
# ConfigMixin: the mixin only asks for two hooks (_save_pretrained, _from_pretrained) and brings hub
# ids, push_to_hub and a model card, while leaving the folder format (config.json with _class_name +
# model.safetensors), the constructor taking a SURAdapterConfig and our loader as they are. ModelMixin
# would rename the weights file (diffusion_pytorch_model.safetensors), need a flat register_to_config
# constructor, and load through its own key checks, which name problems less clearly than
# check_state_dict and allocate before a damaged config.json's sizes are checked.
_MODEL_CARD = """
---
{{ card_data }}
---

A SUR-adapter ([paper]({{ paper_url }})): it maps a Stable Diffusion text encoder's CLIP embeddings
of a simple prompt to embeddings closer to a detailed prompt's. Written by surpipe; load it with

```python
from surpipe import SURAdapter
adapter = SURAdapter.from_pretrained("{{ repo_id | default("owner/name", true) }}")
```

Settings: {{ settings | default("see config.json", true) }}.
"""


class SURAdapter(nn.Module, ModelHubMixin, library_name="surpipe", paper_url="https://arxiv.org/abs/2305.05189",
                 tags=["sur-adapter", "stable-diffusion"], model_card_template=_MODEL_CARD):
    """SUR-adapter: CLIP last hidden state [B, L, D] -> conditioned embeddings [B, L, D].

    ``SURAdapter(config)`` or ``SURAdapter(width=..., nhead=..., ...)``. Calling it returns ``out``
    only (ready for a diffusers pipeline's ``prompt_embeds``); :meth:`forward_with_aux` (or
    ``forward(x, return_aux=True)``) returns ``(out, e, fc(a))`` as the authors' forward did.
    Inputs are cast to the module's dtype; outputs are in the module's dtype.
    ``from_pretrained`` takes a folder, a training run folder or a hub id (``owner/name``);
    ``push_to_hub("owner/name")`` uploads config, weights and a model card.
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
        if config.pooled_width is not None:
            # SDXL's pooled embedding: p + head(p), the last layer zero so that it starts as identity
            pw = config.pooled_width
            self.pooled_head = nn.Sequential(nn.Linear(pw, pw), nn.GELU(), nn.Linear(pw, pw))
            nn.init.zeros_(self.pooled_head[2].weight)
            nn.init.zeros_(self.pooled_head[2].bias)

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

    def pool(self, pooled: torch.Tensor) -> torch.Tensor:
        """SDXL's pooled embedding [B, P] as the UNet should see it: unchanged without a pooled head,
        else ``p + head(p)`` (trained to align with the complex prompt's, ``--pooled aligned``)."""
        if self.config.pooled_width is None:
            return pooled
        if pooled.dim() != 2 or pooled.shape[-1] != self.config.pooled_width:
            raise SurpipeError(f"SURAdapter's pooled head expects [batch, {self.config.pooled_width}], "
                               f"got {list(pooled.shape)}")
        p = pooled.to(self.dtype)
        return p + self.pooled_head(p)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        out, e, f = self.forward_with_aux(x)
        return (out, e, f) if return_aux else out

    # ----------------------------------------------------------------- persistence
    # save_pretrained is overridden (the mixin's would unlink config.json before writing it, so a
    # crash could leave a folder without one, and would always add a README.md): each file is
    # written atomically and the model card is written only when pushing (or when asked).
    def save_pretrained(self, save_directory: Union[str, os.PathLike], *, push_to_hub: bool = False,
                        repo_id: Optional[str] = None, model_card_kwargs: Optional[dict] = None,
                        config=None, **push_to_hub_kwargs):
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into the folder and
        return it; with ``push_to_hub=True`` also upload them to ``repo_id`` (default: the folder's
        name) and return the commit's url. ``model_card_kwargs`` also writes a ``README.md``."""
        if config is not None:
            raise SurpipeError("SURAdapter.save_pretrained writes the adapter's own config; "
                               "change adapter.config instead of passing config=")
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(out)
        if model_card_kwargs is not None and not (out / "README.md").exists():
            self.generate_model_card(**model_card_kwargs).save(out / "README.md")
        if push_to_hub:
            return self.push_to_hub(repo_id or out.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return out

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: Optional[dict] = None, **kwargs) -> str:
        """Upload config, weights and a model card to hub repo ``repo_id`` (see ModelHubMixin)."""
        card = {"repo_id": repo_id, "settings": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.config).items()), **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        out = Path(save_directory)
        cfg = dataclasses.asdict(self.config)
        cfg["_class_name"] = CLASS_NAME
        cfg["_surpipe_version"] = __version__
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        # Not surpipe.config.atomic_path: the two files are published together, both written before
        # either is renamed (weights first), so a failed save leaves the previous pair whole.
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

    # from_pretrained is overridden too: the mixin's reads config.json itself (a plain json.load,
    # before any check) and passes every key to the constructor; a run folder's config.json is the
    # training config. Ours resolves the location once (resolve_adapter_dir) and checks the config.
    @classmethod
    def from_pretrained(cls, pretrained: Union[str, os.PathLike], torch_dtype=None,
                        device: Union[str, torch.device, None] = None, *, dtype=None,
                        revision: Optional[str] = None, cache_dir: Union[str, os.PathLike, None] = None,
                        force_download: bool = False, local_files_only: bool = False,
                        token: Union[str, bool, None] = None) -> "SURAdapter":
        """Load a folder written by :meth:`save_pretrained`, a training run folder (its
        ``adapter/``) or a hub id ``owner/name`` (downloaded to, or read offline from, the Hugging
        Face cache); strict key and shape checks, sizes checked before any allocation.
        ``dtype`` (or ``torch_dtype``): ``torch.float16`` or a name such as ``"bf16"``.

        Returns the module in ``eval()`` mode (dropout off).
        """
        if dtype is not None and torch_dtype is not None and parse_dtype(dtype) != parse_dtype(torch_dtype):
            raise SurpipeError(f"give dtype or torch_dtype, not both ({dtype!r} and {torch_dtype!r})")
        return cls._from_pretrained(model_id=pretrained, revision=revision, cache_dir=cache_dir,
                                    force_download=force_download, local_files_only=local_files_only,
                                    token=token, dtype=dtype if dtype is not None else torch_dtype, device=device)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token,
                         dtype=None, device=None) -> "SURAdapter":
        folder = resolve_adapter_dir(model_id, revision=revision, cache_dir=cache_dir, token=token,
                                     force_download=force_download, local_files_only=local_files_only)
        cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        missing = [p.name for p in (cfg_path, w_path) if not p.is_file()]
        if missing:
            raise SurpipeError(f"{folder} is not a SURAdapter folder: missing {', '.join(missing)}")
        data = read_json_object(cfg_path)
        name = data.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise SurpipeError(f"{cfg_path} describes a {name!r}, not a {CLASS_NAME}")
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        try:
            config = from_dict(SURAdapterConfig, data)
        except SurpipeError as e:
            raise SurpipeError(f"{cfg_path} is not a valid adapter config:", e.problems or [str(e)]) from None
        problems = config.problems()  # before allocating: a damaged file may ask for 10**9 wide
        if problems:
            raise SurpipeError(f"{cfg_path} is not a valid adapter config:", problems)
        model = cls(config)
        state = _load_safetensors(w_path)
        check_state_dict(model, state, str(w_path))
        model.load_state_dict(state, strict=True)
        model.to(device=device, dtype=parse_dtype(dtype))
        return model.eval()
