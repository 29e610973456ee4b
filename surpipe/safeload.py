"""Reading ``.pt`` files that users download (the authors' adapter and prompt2vec features):
``torch.load(weights_only=True)`` only, so a file holding anything but tensors and plain
containers is refused without running any of its code."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

from surpipe.errors import SurpipeError, first_line


def load_torch_file(path: str | os.PathLike, what: str):
    """The object in a foreign ``.pt`` file, read with ``weights_only=True``; SurpipeError when the
    file is missing, is not a torch file, or holds objects other than tensors (``what`` names it
    in messages, e.g. ``"checkpoint"``)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise SurpipeError(f"{what} not found: {p}")
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False: keep only the line
        # naming the refused object
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "global" in ln]
        why = f" ({lines[0]})" if lines else ""
        raise SurpipeError(f"refusing {p}: it holds objects other than tensors, which could run code "
                           f"when loaded (read with weights_only=True); nothing from it was executed{why}") from None
    except Exception as e:  # not a torch file, truncated zip, ...
        first = first_line(e)
        raise SurpipeError(f"cannot read {p} as a torch file of tensors (weights_only=True): {first}") from None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tensor_kind_problem(t) -> str | None:
    """Why tensor ``t`` is not a plain dense real floating-point tensor with data (None when it is).

    Sparse, quantized, complex, integer, meta (no data) tensors all load under ``weights_only``;
    converting them with ``.float()`` would densify, dequantize or silently drop imaginary parts.
    """
    import torch

    if t.layout != torch.strided:
        return f"a sparse tensor ({str(t.layout).removeprefix('torch.')})"
    if t.is_quantized:
        return f"a quantized tensor ({str(t.dtype).removeprefix('torch.')})"
    if t.is_complex():
        return f"a complex tensor ({str(t.dtype).removeprefix('torch.')}); its imaginary part would be lost"
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {str(t.dtype).removeprefix('torch.')}, not float16/bfloat16/float32/float64"
    if t.is_meta:
        return "a meta tensor (it holds no values)"
    return None
