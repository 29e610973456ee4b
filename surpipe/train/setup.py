"""The pieces ``TrainRecipe.setup`` assembles: accelerate, the frozen UNet, the trainable adapter
and projection with their optimizer and schedule, and the batch tensors of one step."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from surpipe.adapter import SURAdapter, SURAdapterConfig
from surpipe.devices import to_device
from surpipe.errors import SurpipeError, first_line
from surpipe.train.losses import LLMProjection, sample_latents, sdxl_time_ids


@dataclass
class Runtime:
    """The accelerator and the precision a run uses."""

    accelerator: Any
    device: torch.device
    weight_dtype: torch.dtype
    mixed_precision: str


def start_accelerator(cfg, out, log_with=None) -> Runtime:
    """An ``Accelerator`` for ``cfg.device`` / ``cfg.mixed_precision`` (auto: fp16 on CUDA, as the
    authors trained; fp32 on CPU, which has no fast fp16)."""
    # heavy: accelerate (imports every tracker it finds)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SurpipeError(f"device {cfg.device!r} requested but CUDA is not available")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device.startswith("cuda:") and int(cfg.device[5:]) != local:
        # accelerate gives each process the GPU of its local rank: another index would be ignored
        raise SurpipeError(f"--device {cfg.device}: training runs on its process's GPU (cuda:{local}); pick the "
                           f"GPU with CUDA_VISIBLE_DEVICES={cfg.device[5:]} and --device cuda")
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else "fp16"
    # accelerate keeps one state per process; a run may start again in the same process (tests,
    # notebooks) with another precision, so start from a clean state
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(mixed_precision=mp, cpu=cpu, log_with=log_with, project_dir=str(out))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    return Runtime(acc, acc.device, dtype, mp)


def load_unet(cfg, rt: Runtime):
    """The frozen UNet of ``cfg.model`` on the run's device and precision."""
    from diffusers import UNet2DConditionModel  # heavy: diffusers

    try:
        unet = UNet2DConditionModel.from_pretrained(cfg.model, subfolder="unet", revision=cfg.revision,
                                                    torch_dtype=rt.weight_dtype)
    except (OSError, ValueError) as e:
        raise SurpipeError(f"cannot load the UNet of {cfg.model}: {first_line(e)}") from None
    unet.requires_grad_(False)
    unet.eval()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet = unet.to(rt.device)
    if rt.device.type == "cuda" and not getattr(cfg, "compile_unet", False):
        # channels-last convolutions: the bf16 UNet step 8% faster on an H200 (docs/performance.md); the
        # CPU keeps the layout its golden values were computed in, and so does a compiled UNet: torch
        # 2.13's inductor gets its conditioning gradient wrong with channels-last strides (compile_check).
        # Attention is torch's SDPA (flash or memory-efficient kernels on a GPU): diffusers' default
        # processor, checked in tests/train.
        unet = unet.to(memory_format=torch.channels_last)
    return unet


# inductor generates and compiles kernels (minutes on a small CPU); tests of the wiring swap in
# "aot_eager", which traces the same graphs without code generation
COMPILE_BACKEND = "inductor"


def unet_for_loss(unet, cfg):
    """The UNet the training loss calls: ``torch.compile``d with ``--compile-unet``, its gradient
    checked against the eager UNet's at the first step (surpipe.train.compile_check). Validation and
    grids keep the plain module (other shapes, no gradient: compiling them would buy nothing)."""
    from surpipe.train.compile_check import GRAD_RTOL, GRAD_RTOL_FP8, CheckedCompiledUNet

    if not getattr(cfg, "compile_unet", False):
        return unet
    if getattr(cfg, "unet_fp8", False):  # checked first (fp8_problem): a CPU gets here only in tests
        from surpipe.train.fp8 import float8_copy

        # the loss's own module tree, the weights shared: validation and eval keep the bf16 UNet
        unet = float8_copy(unet, emulate=unet.device.type != "cuda")
    mode = getattr(cfg, "compile_mode", "default")
    kw = {}
    if COMPILE_BACKEND == "inductor":  # modes are inductor's: a test's backend takes none
        import torch._inductor as inductor

        # inductor's layout optimisation makes convolutions channels-last, and with channels-last
        # strides torch 2.13 lowers a view of the backward wrongly: the gradient for the adapter came
        # out 53% off (compile_check; seen on a CPU, the lowering is the GPU's too). The UNet stays
        # in its own layout.
        options = {**inductor.list_mode_options(mode), "layout_optimization": False}
        kw = {"options": options}  # a mode is its options (torch.compile takes one or the other)
    rtol = GRAD_RTOL_FP8 if getattr(cfg, "unet_fp8", False) else GRAD_RTOL
    return CheckedCompiledUNet(torch.compile(unet, backend=COMPILE_BACKEND, **kw), unet, rtol)


def build_trainables(cfg, inputs, rt: Runtime):
    """The adapter and the LLM projection (seeded by cfg.seed / projection_seed), AdamW and the LR
    schedule; returns (adapter, projection, optimizer, lr_scheduler), prepared by accelerate."""
    from diffusers.optimization import get_scheduler  # heavy: diffusers

    adapter = SURAdapter(SURAdapterConfig(
        width=inputs.width, nhead=cfg.nhead, dim_feedforward=cfg.dim_feedforward, num_layers=cfg.num_layers,
        dropout=cfg.dropout, adapter_weight=cfg.adapter_weight, token_mixing=cfg.token_mixing,
        pooled_width=inputs.pooled_width if cfg.pooled == "aligned" else None))
    projection = LLMProjection(inputs.llm_size, inputs.width, seed=cfg.projection_seed,
                               learnable=cfg.projection == "learnable")
    params = list(adapter.parameters()) + (list(projection.parameters()) if cfg.projection == "learnable" else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_steps)
    if cfg.projection == "learnable":
        adapter, projection, optimizer = rt.accelerator.prepare(adapter, projection, optimizer)
    else:  # a frozen module has nothing for DDP to synchronise (DDP refuses it): only moved
        adapter, optimizer = rt.accelerator.prepare(adapter, optimizer)
        projection = projection.to(rt.device)
    adapter.train()
    return adapter, projection, optimizer, lr_scheduler


# the arrays of a store batch that the step reads as they are: moved to the device ahead of the step
STAGED = ("clip_simple", "clip_complex", "llm", "lat_mean", "lat_std", "lat_flip_mean", "lat_flip_std",
          "pooled_simple", "pooled_complex")


def stage_batch(batch: dict, device) -> dict:
    """The deterministic part of a loaded batch, started on its way to ``device`` (float32 there,
    copied without a host sync: surpipe.devices.to_device): what can be read ahead of its step. The
    rows' LLM mask and SDXL sizes stay on the host (a mask of all-matched rows becomes None)."""
    staged = {k: to_device(torch.from_numpy(batch[k]), device).float() for k in STAGED if k in batch}
    matched = batch.get("llm_matched")
    # read on the host: a batch whose rows all have an LLM vector needs no mask
    staged["llm_mask"] = None if matched is None or matched.all() else np.asarray(matched, dtype=bool)
    staged.update({k: batch[k] for k in ("original_size", "crop_top_left") if k in batch})
    return staged


def complete_batch(staged: dict, inputs, device, generator: torch.Generator, share=None) -> dict:
    """A staged batch (:func:`stage_batch`) with its random draws: the latents sampled from the stored
    distributions (``share = (global batch, first row)`` on data-parallel ranks:
    surpipe.train.losses._rows) and, for SDXL, the time ids of the drawn flips."""
    latents, flip = sample_latents(staged, use_flip=inputs.groups.use_flip, scaling_factor=inputs.scaling_factor,
                                   shift_factor=inputs.shift_factor, generator=generator, return_flip=True,
                                   share=share)
    out = {"latents": latents, **{k: staged[k] for k in ("clip_simple", "clip_complex", "llm", "llm_mask")},
           "share": share}
    if "pooled_simple" in staged:  # SDXL: the pooled embedding and the micro-conditioning
        out.update({k: to_device(v, device) for k, v in sdxl_conditioning(staged, flip, inputs.resolution).items()})
    return out


def batch_tensors(batch: dict, inputs, device, generator: torch.Generator, share=None) -> dict:
    """A loaded batch as tensors on ``device``: :func:`stage_batch` then :func:`complete_batch`."""
    return complete_batch(stage_batch(batch, device), inputs, device, generator, share)


def sdxl_conditioning(batch: dict, flip, resolution: int) -> dict:
    """SDXL's added conditioning of a batch: the simple prompt's pooled embedding (docs/method-decisions.md),
    the complex prompt's (for ``--pooled aligned``), and the time ids from each row's original size
    and crop (for flipped rows, the crop as diffusers' SDXL example records it)."""
    crop = torch.from_numpy(np.asarray(batch["crop_top_left"])).long()
    if flip is not None:
        # diffusers' SDXL training example records a flipped crop's left offset as resolution - left
        # (it flips the cropped square); the same conditioning here, so its checkpoints and ours agree
        mirrored = torch.stack([crop[:, 0], resolution - crop[:, 1]], dim=1)
        crop = torch.where(flip.view(-1, 1), mirrored, crop)
    orig = torch.from_numpy(np.asarray(batch["original_size"]))
    return {"pooled": torch.as_tensor(batch["pooled_simple"]).float(),
            "pooled_complex": torch.as_tensor(batch["pooled_complex"]).float(),
            "time_ids": sdxl_time_ids(orig, crop, resolution)}


def stopped_message(step: int, what: str, latest) -> str:
    """Why a run stopped on a non-finite number, and what was kept."""
    kept = (f"the last good checkpoint {latest} is kept" if latest is not None
            else "no checkpoint had been written yet")
    return (f"training stopped at step {step}: {what}. Nothing of this step was saved and {kept}. "
            "Check the store (surpipe verify) and the options (learning_rate, loss weights, noise_offset, "
            "min_snr_gamma): a rerun of the same command resumes from the last checkpoint, other values of "
            "those options need another --out.")
