"""Device and dtype resolution: the one place that turns ``--device`` / ``--dtype`` into what torch
needs. torch is imported only inside the functions, so config validation stays torch-free."""

from __future__ import annotations

from surpipe.errors import SurpipeError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:<index>"
# names and common aliases -> torch dtype attribute name
_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",  # adapters can be loaded in float64
}


def device_problem(device: str) -> str | None:
    """A config-validation message when ``device`` is not auto, cpu, cuda or cuda:<index>."""
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return None
    return f"device: {device!r}; use {DEVICE_CHOICES}"


def resolve_device(device: str, local_rank: int = 0, *, mps: bool = False) -> str:
    """``auto`` -> this process's GPU (``cuda:<local_rank>``) when CUDA is available, else Apple's
    ``mps`` when ``mps`` is allowed and present, else ``cpu``. An explicit CUDA device without CUDA
    is refused; other names pass through."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank}"
        backend = getattr(torch.backends, "mps", None)
        if mps and backend is not None and backend.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SurpipeError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str, *, cuda: str = "bfloat16") -> str:
    """The compute dtype name for ``dtype`` on ``device``: ``auto`` is float32 off CUDA (half
    precision matmuls are slow or missing there) and ``cuda`` on CUDA (bfloat16 falls back to
    float16 on GPUs without it); an explicit name is returned canonical (``fp16`` -> float16)."""
    if dtype != "auto":
        return dtype_name(dtype)
    if not str(device).startswith("cuda"):
        return "float32"
    if cuda == "bfloat16":
        import torch

        # without emulation: pre-Ampere GPUs "support" bf16 by emulating it, far slower than fp16
        index = torch.device(device).index
        with torch.cuda.device(torch.cuda.current_device() if index is None else index):
            return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return dtype_name(cuda)


def dtype_name(dtype) -> str:
    """The canonical name (float32, float16, bfloat16, float64) of a name, an alias or a torch dtype."""
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise SurpipeError(f"unknown dtype {dtype!r}; valid choices: float32, float16, bfloat16, float64 "
                           "(or fp32, fp16, bf16, fp64)")
    return _DTYPE_NAMES[name]


def torch_dtype(dtype):
    """The torch dtype of a name, an alias or a torch dtype (None stays None)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, dtype_name(dtype))


def to_device(t, device):
    """``t`` on ``device`` without stalling the host: a CPU tensor bound for a GPU is pinned and copied
    with ``non_blocking`` (a plain copy from pageable memory waits for every kernel queued before
    it). torch's caching host allocator keeps the pinned buffer until the copy has run; the copy is
    ordered on the current stream, so kernels queued after it see the data."""
    import torch

    device = torch.device(device)
    if t.device == device or (device.index is None and t.device.type == device.type):
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    # a device-to-host copy with non_blocking returns before its data has arrived: only the host
    # reading it could tell, so one bound for the CPU waits
    return t.to(device, non_blocking=device.type != "cpu")
