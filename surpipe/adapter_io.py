"""Adapter files: where an adapter argument points (folder, training run folder or hub id), the
state-dict checks that name every problem, dtype names and the safetensors reader.

Kept apart from :mod:`surpipe.adapter` (the network and its save/load methods), which re-exports
these names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from surpipe.errors import SurpipeError, first_line
from surpipe.hub import _cache_dir, check_model_source, looks_like_hub_id
from surpipe.train.run_layout import ADAPTER, has_run_parts  # the run-folder names: a torch-free leaf

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CLASS_NAME = "SURAdapter"
# The authors' Adapter keeps its template nn.TransformerEncoderLayer as `encoder_layer`: their
# state dicts carry it (12 keys), but their forward never uses it.
TEMPLATE_PREFIX = "encoder_layer."

def _refuse_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple],
                     source: str, whose: str, missing_note: str = "") -> None:
    """Raise SurpipeError listing every missing key, unexpected key and shape mismatch."""
    problems = [f"missing key: {k}{missing_note}" for k in expected if k not in state_dict]
    problems += [f"unexpected key: {k}" for k in state_dict if k not in expected]
    problems += [f"shape mismatch for {k}: {source} has {list(v.shape)}, {whose} {list(expected[k])}"
                 for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k])]
    if problems:
        raise SurpipeError(f"{source} does not match a SUR-adapter with these settings "
                           f"({_describe(model)}):", problems)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise SurpipeError listing every missing key, unexpected key and shape mismatch."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _refuse_mismatch(model, state_dict, expected, source, "the model expects")


def split_template_layer(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
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
    _refuse_mismatch(model, extra, expected, source, "the authors' template layer has",
                     f" (the other {TEMPLATE_PREFIX}* keys of the authors' template layer are present)")
    return {k: v for k, v in state_dict.items() if k not in extra}, sorted(extra)


def resolve_adapter_dir(path: Union[str, os.PathLike], **hub_kwargs) -> Path:
    """A training run folder (its ``adapter/`` subfolder), an adapter folder or a hub id
    ``owner/name`` (its cached snapshot, downloaded when needed) -> the adapter folder.

    The one rule for every place that takes an adapter (``from_pretrained``, ``generate``, ``eval``).
    ``hub_kwargs`` (``revision``, ``cache_dir``, ``token``, ``force_download``,
    ``local_files_only``) go to ``huggingface_hub.snapshot_download``.
    """
    p = Path(path).expanduser()
    # Only a string shaped owner/name that is no existing path is a hub id: a bare name stays a
    # (missing) folder, so a typo in a run folder's name is reported as such.
    if isinstance(path, str) and "/" in path and looks_like_hub_id(path):
        return _download_adapter(path, **hub_kwargs)
    if not p.exists():
        raise SurpipeError(f"adapter folder not found: {p} (give a training run folder or an adapter folder)")
    if not p.is_dir():
        raise SurpipeError(f"{p} is not a folder: give a training run folder or an adapter folder "
                           f"({CONFIG_NAME} + {WEIGHTS_NAME}); for the authors' .pt run "
                           f"`surpipe import-official` first")
    if (p / ADAPTER / WEIGHTS_NAME).is_file():
        return p / ADAPTER
    if (p / WEIGHTS_NAME).is_file() or (p / CONFIG_NAME).is_file():
        return p  # an adapter folder (from_pretrained names what it lacks)
    hint = " (a training run without a finished adapter/: run or resume `surpipe train`)" if has_run_parts(p) else ""
    raise SurpipeError(f"{p} is neither a training run folder (with adapter/) nor an adapter folder "
                       f"(with {CONFIG_NAME} and {WEIGHTS_NAME}){hint}")


def _download_adapter(repo_id: str, revision: Optional[str] = None, cache_dir=None, token=None,
                      force_download: bool = False, local_files_only: bool = False) -> Path:
    """The snapshot folder of hub adapter ``repo_id``: config, weights and any llm projection."""
    from huggingface_hub import snapshot_download

    try:
        if not local_files_only:
            check_model_source(repo_id, option="adapter", what="adapter")  # fails fast offline/unreachable
        # cache_dir from the environment at call time (huggingface_hub reads it once, at import)
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir or _cache_dir(), token=token,
                                   allow_patterns=[CONFIG_NAME, "*.safetensors"], force_download=force_download,
                                   local_files_only=local_files_only)
    except SurpipeError as e:
        raise SurpipeError(f"adapter folder not found: {repo_id}, and as a hub id: {e}") from None
    except Exception as e:  # hub errors: missing repo or revision, not cached offline, network
        first = first_line(e)
        raise SurpipeError(f"adapter folder not found: {repo_id}, and the hub id {repo_id} cannot be "
                           f"loaded: {first}") from None
    return Path(folder)


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return type(model).__name__
    return (f"width={cfg.width}, nhead={cfg.nhead}, dim_feedforward={cfg.dim_feedforward}, "
            f"num_layers={cfg.num_layers}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
        raise SurpipeError(f"cannot read {path} as safetensors: {e}") from None
