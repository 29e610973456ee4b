"""``surpipe import-official FILE.pt OUT --adapter-weight W``: the authors' released adapter
state dict -> a SURAdapter folder (config.json + model.safetensors).

The .pt is read with ``torch.load(weights_only=True)``: a file holding anything but tensors
(and plain containers) is refused without running any of its code. ``adapter_weight`` is not in
their file (their demo parsed it from the folder name), so it is given here. The folder is set to
``token_mixing="tokenwise"``: their encoder (``batch_first=False``, trained at batch size 1)
encoded every token on its own, and the released weights expect that. Their state dicts also
carry the unused template layer ``encoder_layer.*`` (12 tensors): accepted, left out, and reported.
Tensors that are not dense real floating point (sparse, quantized, complex, integer) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from surpipe import config as cfgmod
from surpipe.limits import MAX_SIZES
from surpipe.config import Config, opt
from surpipe.errors import SurpipeError
from surpipe.logs import get_logger
from surpipe.safeload import file_sha256, load_torch_file, tensor_kind_problem

log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "adapter", "module")


@dataclass
class ImportOfficialConfig(Config):
    file: str = opt(help="The authors' released adapter state dict (.pt).", group="data", argument=True)
    out: str = opt(help="Output SURAdapter folder (config.json + model.safetensors).", group="output",
                   argument=True)
    adapter_weight: Optional[float] = opt(
        None, help="Mixing weight the checkpoint was trained with (not stored in it; their release names it "
        "in its folder name, usually 0.1). Required.", group="model", ge=0.0, le=1.0)
    width: Optional[int] = opt(None, help="Expected width D (768 for SD1.x, 1024 for SD2.x); checked "
                               "against the file.", group="model", ge=1, le=MAX_SIZES["width"])
    nhead: int = opt(8, help="Attention heads of the encoder (not recoverable from the weights; the "
                     "authors used 8).", group="model", ge=1, le=MAX_SIZES["nhead"])
    overwrite: bool = opt(False, help="Replace the adapter in a non-empty OUT folder.", group="output")


def read_official(path: str | Path) -> dict:
    """The flat {str: Tensor} state dict in the authors' .pt, or SurpipeError."""
    import torch  # heavy: keeps --help torch-free

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
                           _first(bad))
    bad = [f"{k}: {why}" for k, v in obj.items() if (why := tensor_kind_problem(v))]
    if bad:
        raise SurpipeError(f"{p} holds tensors that are not plain dense floating-point weights "
                           f"(float16/bfloat16/float32/float64):", _first(bad))
    return dict(obj)


def _first(items: list[str], n: int = 20) -> list[str]:
    return items[:n] + ([f"... and {len(items) - n} more"] if len(items) > n else [])


def run(cfg: ImportOfficialConfig) -> Path:
    import torch  # heavy: keeps --help torch-free (surpipe.adapter imports torch too)

    from surpipe.adapter import SURAdapter, SURAdapterConfig, check_state_dict, split_template_layer

    if cfg.adapter_weight is None:
        raise SurpipeError("--adapter-weight is required: the authors' .pt does not store it "
                           "(their release names it in the folder name; 0.1 is their default)")
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
    if acfg.problems():
        raise SurpipeError(f"{src} cannot be imported with these settings:", acfg.problems())
    model = SURAdapter(acfg)
    # Their Adapter also saved its unused template layer (encoder_layer.*, 12 keys): accepted and
    # left out; anything else unexpected or missing is refused.
    state, unused = split_template_layer(model, state, str(src))
    check_state_dict(model, state, str(src))
    src_dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.save_pretrained(out)
    cfgmod.save(cfg, out / "import_config.json",
                extra={"source_sha256": file_sha256(src), "source_dtypes": src_dtypes,
                       "unused_keys": unused,
                       "unused_keys_reason": ("the authors' template layer (Adapter.encoder_layer): saved in "
                                              "their state dict, never used by their forward") if unused else None,
                       "adapter_config": {"width": width, "nhead": cfg.nhead, "dim_feedforward": ff,
                                          "num_layers": 2, "token_mixing": "tokenwise"}})
    n = sum(v.numel() for v in state.values())
    note = (f"; left out {len(unused)} encoder_layer.* tensors: the authors' template layer, which "
            f"their forward never uses" if unused else "")
    log.info(f"imported {src} ({n / 1e6:.2f}M parameters, {'/'.join(src_dtypes)} -> float32, "
             f"width {width}, feed-forward {ff}) into {out} as a SURAdapter "
             f"(token_mixing=tokenwise, adapter_weight={cfg.adapter_weight}){note}")
    return out
