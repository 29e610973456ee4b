"""``surpipe import-official FILE.pt OUT --adapter-weight W``: the authors' released adapter
state dict -> a SURAdapter folder (config.json + model.safetensors).

The .pt is read with ``torch.load(weights_only=True)``: a file holding anything but tensors
(and plain containers) is refused without running any of its code. ``adapter_weight`` is not in
their file (their demo parsed it from the folder name), so it is given here. The folder is set to
``token_mixing="tokenwise"``: their encoder (``batch_first=False``, trained at batch size 1)
encoded every token on its own, and the released weights expect that.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from surpipe import config as cfgmod
from surpipe.errors import SurpipeError
from surpipe.safeload import file_sha256, load_torch_file

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "adapter", "module")


@dataclass
class ImportOfficialConfig:
    file: str
    out: str
    adapter_weight: float = 0.1
    width: Optional[int] = None  # checked against the file's width when given
    nhead: int = 8  # not recoverable from the weights; the authors used 8
    overwrite: bool = False


def read_official(path: str | Path) -> dict:
    """The flat {str: Tensor} state dict in the authors' .pt, or SurpipeError."""
    import torch

    p = Path(path)
    obj = load_torch_file(p, "checkpoint")
    if isinstance(obj, dict) and len(obj) == 1:
        (k, v), = obj.items()
        if k in WRAPPER_KEYS and isinstance(v, dict):
            obj = v
    if not isinstance(obj, dict):
        raise SurpipeError(f"{p} does not hold a state dict (a mapping of names to tensors) "
                           f"but a {type(obj).__name__}")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise SurpipeError(f"{p} is not a flat state dict of tensors; these entries are not tensors:",
                           bad[:20] + ([f"... and {len(bad) - 20} more"] if len(bad) > 20 else []))
    return dict(obj)


def run(cfg: ImportOfficialConfig) -> Path:
    import torch

    from surpipe.adapter import SURAdapter, SURAdapterConfig, check_state_dict

    src, out = Path(cfg.file), Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SurpipeError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise SurpipeError(f"output folder {out} is not empty; pass --overwrite to replace the adapter in it")
    state = read_official(src)

    problems = []
    fc_w = state.get("fc.weight")
    lin1 = state.get("transformer_encoder.layers.0.linear1.weight")
    if fc_w is None or fc_w.dim() != 2 or fc_w.shape[0] != fc_w.shape[1]:
        problems.append("fc.weight is missing or not a square matrix: cannot infer the width")
    if lin1 is None or lin1.dim() != 2:
        problems.append("transformer_encoder.layers.0.linear1.weight is missing: cannot infer dim_feedforward")
    if problems:
        raise SurpipeError(f"{src} is not a SUR-adapter state dict:", problems)
    width, ff = int(fc_w.shape[0]), int(lin1.shape[0])
    if cfg.width is not None and cfg.width != width:
        raise SurpipeError(f"--width {cfg.width} given but {src} holds an adapter of width {width}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise SurpipeError(f"{src} holds NaN or Inf values in:", nonfinite)

    acfg = SURAdapterConfig(width=width, nhead=cfg.nhead, dim_feedforward=ff, num_layers=2,
                            adapter_weight=cfg.adapter_weight, token_mixing="tokenwise")
    model = SURAdapter(acfg)
    check_state_dict(model, state, str(src))
    src_dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.save_pretrained(out)
    cfgmod.save(cfg, out / "import_config.json",
                extra={"source_sha256": file_sha256(src), "source_dtypes": src_dtypes,
                       "adapter_config": {"width": width, "nhead": cfg.nhead, "dim_feedforward": ff,
                                          "num_layers": 2, "token_mixing": "tokenwise"}})
    n = sum(v.numel() for v in state.values())
    print(f"surpipe: imported {src} ({n / 1e6:.2f}M parameters, {'/'.join(src_dtypes)} -> float32, "
          f"width {width}, feed-forward {ff}) into {out} as a SURAdapter "
          f"(token_mixing=tokenwise, adapter_weight={cfg.adapter_weight})", file=sys.stderr, flush=True)
    return out
