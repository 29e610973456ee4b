"""The options of ``surpipe train`` (stage two), with the authors' values as defaults.

Lives in the library because the recipe's helpers (inputs, run folder, losses) all read it; the
CLI and ``surpipe run`` take it from ``stages.train``, which re-exports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from surpipe.config import _range_problems, opt
from surpipe.errors import SurpipeError
from surpipe.options import StoreCache

_SEED_MAX = 2**63 - 1


@dataclass
class TrainConfig(StoreCache):
    """Every hyper-parameter of the authors' run, with their values as defaults (method.md)."""

    # data
    store: str = opt(help="Feature store (Zarr) made by extract-llm and encode-latents.", group="data")
    model: str = opt(help="Stable Diffusion folder or hub id whose frozen UNet is trained against "
                          "(the one whose text encoder filled the store).", group="model")
    out: str = opt(help="Run folder: checkpoints, final adapter, metrics; rerunning resumes from it.",
                   group="output")
    llm_layer: int = opt(help="Which stored LLM layer feeds the LLM-alignment loss (-1: the last stored one).",
                         group="data")
    llm_group: Optional[str] = opt(None, help="LLM feature group of the store (default: the only one).",
                                   group="data")
    clip_group: Optional[str] = opt(None, help="CLIP embedding group of the store (default: the one matching "
                                               "--model).", group="data")
    vae_group: Optional[str] = opt(None, help="VAE latent group of the store (default: the only one).", group="data")
    allow_other_vae: bool = opt(False, help="Train on a VAE group whose latents come from another VAE than --model's "
                                            "(other scaling factor, shift or latent channels); refused without it.",
                                group="data")
    revision: Optional[str] = opt(None, help="Hub revision (branch, tag or commit) of --model.", group="model")
    flip: bool = opt(True, help="Use the stored horizontally flipped latents for half the samples (augmentation).",
                     group="data")
    # optimisation (authors: batch 1 x accumulation 4, 5000 steps, AdamW 1e-5 constant, clip 1.0)
    max_steps: int = opt(5000, help="Optimizer steps to train (raise it and rerun to continue a finished run).",
                         group="optimisation", ge=1)
    batch_size: int = opt(1, help="Samples per micro-batch.", group="optimisation", ge=1)
    grad_accum: int = opt(4, help="Micro-batches accumulated per optimizer step (effective batch = "
                                  "batch-size x grad-accum).", group="optimisation", ge=1)
    learning_rate: float = opt(1e-5, help="AdamW learning rate.", group="optimisation", gt=0, le=1)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = opt(
        "constant", help="Learning-rate schedule over max-steps.", group="optimisation")
    lr_warmup_steps: int = opt(0, help="Linear warm-up steps of the learning rate (not with the constant "
                                       "schedule).", group="optimisation", ge=0)
    adam_beta1: float = opt(0.9, help="AdamW beta1 (first-moment decay).", group="optimisation", ge=0, lt=1)
    adam_beta2: float = opt(0.999, help="AdamW beta2 (second-moment decay).", group="optimisation", ge=0, lt=1)
    weight_decay: float = opt(1e-2, help="AdamW decoupled weight decay.", group="optimisation", ge=0)
    adam_epsilon: float = opt(1e-8, help="AdamW epsilon (denominator floor).", group="optimisation", gt=0, le=1)
    max_grad_norm: float = opt(1.0, help="Clip the gradient norm to this value before each step.",
                               group="optimisation", gt=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = opt(
        "auto", help="UNet/autocast precision; auto: fp16 on CUDA (as the authors), fp32 on CPU.", group="running")
    gradient_checkpointing: bool = opt(False, help="Recompute UNet activations in backward: less memory, "
                                                   "slower steps.", group="running")
    compile_unet: bool = opt(False, help="torch.compile the frozen UNet for the training loss (H200, SD 1.5, bf16, "
                                         "batch 8: forward+backward 1.54x faster, less memory; the first step "
                                         "compiles, about 1.5 min).", group="running")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = opt(
        "default", help="torch.compile mode of --compile-unet: reduce-overhead and max-autotune replay CUDA "
                        "graphs (less launch overhead, more memory); max-autotune also searches kernels "
                        "(a longer first step).", group="running")
    unet_fp8: bool = opt(False, help="float8 matmuls (torchao) in the frozen UNet's attention and feed-forward "
                                     "linears, on GPUs of compute capability 8.9+ (H100, L40S, RTX 4090); needs "
                                     "--compile-unet and --mixed-precision bf16.", group="running")
    seed: int = opt(0, help="Seed of the data order, noise, timesteps and adapter initialisation.",
                    group="optimisation", ge=0, le=2**32 - 1)
    # the adapter (authors: 2 encoder layers, 8 heads, FFN 2048, adapter_weight 0.1)
    adapter_weight: float = opt(0.1, help="Mix of the adapter branch in the output: out = w*fc(a) + (1-w)*x.",
                                group="model", ge=0, le=1)
    token_mixing: Literal["sequence", "tokenwise"] = opt(
        "sequence", help="Adapter attention across the 77 tokens (sequence, the paper) or per token (tokenwise, "
                         "the authors' code).", group="model")
    nhead: int = opt(8, help="Attention heads of the adapter (must divide the CLIP width).", group="model",
                     ge=1, le=256)
    dim_feedforward: int = opt(2048, help="Feed-forward width of the adapter's encoder layers.", group="model",
                               ge=1, le=65536)
    num_layers: int = opt(2, help="Transformer encoder layers in the adapter.", group="model", ge=1, le=64)
    dropout: float = opt(0.1, help="Dropout inside the adapter's encoder layers while training.", group="model",
                         ge=0, lt=1)
    # losses (authors: llm 1e-5, prompt 1e-5; denoising loss through the UNet in the paper)
    llm_weight: float = opt(1e-5, help="Weight of the LLM-alignment KL loss.", group="losses", ge=0)
    prompt_weight: float = opt(1e-5, help="Weight of the prompt-alignment KL loss (complex prompt vs adapter).",
                               group="losses", ge=0)
    prompt_target: Literal["out", "fc"] = opt(
        "out", help="What the prompt-alignment loss compares with the complex prompt: the adapter output (out) or "
                    "its fc branch (fc, the authors' code before 2023-11-29).", group="losses")
    gradient_path: Literal["paper", "authors"] = opt(
        "paper", help="paper: the denoising loss trains the adapter; authors: the UNet sees a detached output "
                      "(only the KL losses train it).", group="losses")
    pooled: Literal["simple", "aligned"] = opt(
        "simple", help="SDXL's pooled embedding: the simple prompt's, unchanged (simple), or through a small "
                       "head trained toward the complex prompt's (aligned; its KL joins the prompt term).",
        group="model")
    log_denoise_every: int = opt(50, help="With --gradient-path authors the denoising loss cannot reach the "
                                          "adapter: run the UNet for it only on the first and every N-th step, for "
                                          "the log (1: every step).", group="losses", ge=1)
    projection: Literal["frozen", "learnable"] = opt(
        "frozen", help="The LLM-to-CLIP-width projection: seeded random and frozen (authors) or trained.",
        group="model")
    projection_seed: int = opt(0, help="Seed of the LLM projection's random weights.", group="model", ge=0,
                               le=_SEED_MAX)
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = opt(
        None, help="UNet target (default: the model's scheduler config).", group="losses")
    min_snr_gamma: Optional[float] = opt(None, help="Min-SNR loss weighting with this gamma (e.g. 5; default: "
                                                    "off, plain MSE).", group="losses", gt=0)
    noise_offset: float = opt(0.0, help="Noise offset: add this times a per-channel N(0,1) shift to the noise "
                                        "(0: off).", group="losses", ge=0)
    # running
    device: str = opt("auto", help="auto (CUDA if available), cpu, cuda or cuda:N.", group="running")
    workers: Optional[int] = opt(None, help="Loader processes (default: 0 on CPU, 2 on CUDA).", group="running",
                                 ge=0, le=256)
    checkpoint_every: int = opt(500, help="Write a resumable checkpoint every N steps (and at the end).",
                                group="running", ge=1)
    keep_checkpoints: int = opt(3, help="Keep the newest N checkpoints, delete older ones.", group="running", ge=1)
    log_every: int = opt(0, help="Log metrics every N steps (metrics.jsonl, train.log, tracker); 0 (auto): every "
                                 "step on a CPU, every 10 on a GPU, where each log waits for the device.",
                         group="running", ge=0)
    report_to: Literal["none", "tensorboard", "wandb"] = opt(
        "none", help="Also send metrics and validation grids to TensorBoard or Weights & Biases "
                     "(pip install 'surpipe[tracking]').", group="running")
    tensorboard: Optional[bool] = opt(None, help="Deprecated: use report_to (true means report_to tensorboard).",
                                      group="running", cli=False)
    progress: bool = opt(True, help="Show a progress bar.", group="running")
    loss_curve: bool = opt(True, help="Draw loss_curve.png at the end of training.", group="output")
    validation_every: int = opt(0, help="Every N steps: the held-out losses (with a split) and a with/without-"
                                         "adapter grid (0: only at the end, losses only).",
                                group="validation", ge=0)
    validation_prompts: list[str] = opt(default_factory=list, help="Prompts of the validation grid "
                                        "(default: the first 4 held-out rows; without a split and without "
                                        "these, no grid: training rows would flatter it).", group="validation")
    validation_steps: int = opt(20, help="Sampling steps of each validation image.", group="validation",
                                ge=1, le=1000)
    validation_size: Optional[int] = opt(None, help="Validation image size in pixels (default: the model's).",
                                         group="validation", ge=8, le=4096)
    validation_seed: int = opt(0, help="First seed of the validation images (one per prompt).",
                               group="validation", ge=0, le=_SEED_MAX)
    validation_images: bool = opt(True, help="Render the grid at each --validation-every (off: only the held-out "
                                             "losses are computed).", group="validation")
    keep_best: bool = opt(False, group="validation", help=(
        "Also keep the adapter of the lowest val/prompt + val/llm on half of the held-out rows in OUT/best (eval "
        "--store reports on the other half; needs --val-rows or --val-fraction)."))
    val_rows: int = opt(0, help="Hold out this many store rows (never trained on) for validation losses "
                                "(0: off).", group="validation", ge=0)
    val_fraction: float = opt(0.0, help="Hold out about this fraction of the store rows instead of --val-rows "
                                        "(0: off).", group="validation", ge=0, le=0.5)
    val_seed: int = opt(0, help="Seed choosing the held-out rows and their fixed validation noise.",
                        group="validation", ge=0, le=2**32 - 1)

    def __post_init__(self):
        # config files written before report_to existed hold "tensorboard": true/false
        if self.tensorboard is not None:
            if self.tensorboard and self.report_to not in ("none", "tensorboard"):
                raise SurpipeError(f"tensorboard: true conflicts with report_to {self.report_to!r}; "
                                   "tensorboard is replaced by report_to: keep only report_to")
            if self.tensorboard:
                self.report_to = "tensorboard"
            self.tensorboard = None

    def on_device(self, cuda: bool) -> "TrainConfig":
        """This config with its automatic values resolved for the device (``log_every`` 0)."""
        return dataclasses.replace(self, log_every=self.log_every or (10 if cuda else 1))

    def problems(self) -> list[str]:
        """Every declared range (also for configs built in Python, which skip ``from_dict``), then the
        checks that involve several options."""
        p = [q for f in dataclasses.fields(self) for q in _range_problems(f, getattr(self, f.name), f.name)]
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            p.append(f"lr_warmup_steps: {self.lr_warmup_steps} warm-up steps have no effect with lr_scheduler "
                     "constant; use constant_with_warmup (or linear, cosine)")
        if self.compile_mode != "default" and not self.compile_unet:
            p.append(f"compile_mode: {self.compile_mode} applies to the compiled UNet; add --compile-unet")
        if self.unet_fp8 and not (self.compile_unet and self.mixed_precision == "bf16"):
            p.append("unet_fp8: float8 matmuls run in the compiled bf16 UNet (eager casts cost more than the fp8 "
                     "matmuls save); add --compile-unet --mixed-precision bf16")
        if self.keep_best and not (self.val_rows or self.val_fraction):
            p.append("keep_best: needs a held-out split to choose by; give --val-rows N or --val-fraction F (a run "
                     "keeps the split it began with: to a run folder begun without one, only in another --out)")
        return p
