"""float8 matmuls in the frozen UNet (``surpipe train --unet-fp8``), through torchao's ``Float8Linear``.

Only the UNet's attention and feed-forward linears are converted, in the loss's own copy of the
module tree (the weights shared; validation and eval keep the bf16 UNet): they carry most of its matmul
FLOPs at 512 px and above, and run on thousands of tokens per sample. The convolutions, the time
embedding (a few rows per batch) and the adapter stay in bf16. Weights, inputs and gradients are
cast with dynamic per-tensor scales; the frozen weights keep their bf16 copy, so a checkpoint and
the adapter it trains are the same files as without fp8. torch.compile fuses the casts (eager fp8
is slower than bf16) and drops the weight gradients a frozen UNet never needs.
"""

from __future__ import annotations

# compute capability of the first GPUs with float8 tensor cores (Ada, Hopper and newer)
FP8_CAPABILITY = (8, 9)
FP8_GPUS = "compute capability 8.9 or newer: H100, H200, L4, L40S, RTX 4090"
INSTALL = "pip install 'surpipe[fp8]' (torchao)"


def fp8_problem(device: str) -> str | None:
    """Why ``--unet-fp8`` cannot run on ``device`` (an environment check, like a missing tracker)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("torchao") is None:
        return f"unet_fp8: needs torchao; {INSTALL}"
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not cuda or not torch.cuda.is_available():
        return f"unet_fp8: float8 matmuls need a CUDA GPU of {FP8_GPUS}; this run's device is {device!r}"
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(index)
    if cap < FP8_CAPABILITY:
        return (f"unet_fp8: {torch.cuda.get_device_name(index)} has compute capability {cap[0]}.{cap[1]}; "
                f"float8 matmuls need {FP8_GPUS}")
    return None


def converted(module, fqn: str) -> bool:
    """Whether a UNet submodule gets float8 matmuls: an attention-block linear whose both widths are
    multiples of 16, except the cross-attention keys and values. The float8 GEMM needs every inner
    dimension a multiple of 16, and the weight-gradient GEMM's is the input's rows: batch x 77 text
    tokens there (a negligible share of the FLOPs), batch x latent pixels elsewhere."""
    import torch

    return (isinstance(module, torch.nn.Linear) and ".attentions." in f".{fqn}"
            and not fqn.endswith(("attn2.to_k", "attn2.to_v"))
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def float8_unet(unet, *, emulate: bool = False) -> int:
    """Swap the attention linears of ``unet`` for torchao ``Float8Linear`` in place; returns how many.
    ``emulate``: the same casts with high-precision matmuls (CPU tests of the numerics)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    convert_to_float8_training(unet, config=Float8LinearConfig(emulate=emulate), module_filter_fn=converted)
    return sum(isinstance(m, Float8Linear) for m in unet.modules())


def float8_copy(unet, *, emulate: bool = False):
    """A copy of ``unet``'s module tree sharing its weights and buffers, with :func:`float8_unet`
    applied: the frozen UNet stays as it was for validation, grids and eval."""
    import copy

    memo = {id(t): t for t in [*unet.parameters(), *unet.buffers()]}
    twin = copy.deepcopy(unet, memo)
    float8_unet(twin, emulate=emulate)
    return twin
