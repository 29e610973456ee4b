"""``surpipe train``: stage two, the SUR-adapter trained from the feature store.

Tiny CPU run on the bundled sample (after extract-llm and encode-latents):

    surpipe train --store runs/demo/store.zarr --model runs/demo/models/sd --llm-layer 3 \
        --out runs/demo/train --max-steps 50 --batch-size 4 --grad-accum 1

Loads only the frozen UNet and the scheduler config: the LLM features, both CLIP embeddings and
the VAE latent distributions come from the store. Rerunning the same command resumes from the
latest checkpoint in ``--out``; a run folder made with other settings is refused.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from surpipe.config import opt
from surpipe.errors import SurpipeError
# torch-free at import; the names are this module's so tests can replace them
from surpipe.train_log import loss_curve as _loss_curve
from surpipe.train_log import tracker_problem as _tracker_problem

if TYPE_CHECKING:
    from surpipe.train_inputs import TrainingInputs

_SEED_MAX = 2**63 - 1


@dataclass
class TrainConfig:
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
    log_every: int = opt(1, help="Log metrics every N steps (metrics.jsonl, train.log, tracker).",
                         group="running", ge=1)
    report_to: Literal["none", "tensorboard", "wandb"] = opt(
        "none", help="Also send metrics and validation grids to TensorBoard or Weights & Biases "
                     "(pip install 'surpipe[tracking]').", group="running")
    tensorboard: Optional[bool] = opt(None, help="Deprecated: use report_to (true means report_to tensorboard).",
                                      group="running", cli=False)
    progress: bool = opt(True, help="Show a progress bar.", group="running")
    loss_curve: bool = opt(True, help="Draw loss_curve.png at the end of training.", group="output")
    validation_every: int = opt(0, help="Render a with/without-adapter grid every N steps (0: never).",
                                group="validation", ge=0)
    validation_prompts: list[str] = opt(default_factory=list, help="Prompts of the validation grid "
                                        "(default: the first 4 of the store).", group="validation")
    validation_steps: int = opt(20, help="Sampling steps of each validation image.", group="validation",
                                ge=1, le=1000)
    validation_size: Optional[int] = opt(None, help="Validation image size in pixels (default: the model's).",
                                         group="validation", ge=8, le=4096)
    validation_seed: int = opt(0, help="First seed of the validation images (one per prompt).",
                               group="validation", ge=0, le=_SEED_MAX)
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


def _validate_numbers(cfg: TrainConfig) -> list[str]:
    """Every declared range (for configs built in Python, which skip ``from_dict``) and the checks
    that involve several options."""
    from surpipe.config import _range_problems

    p = []
    for f in dataclasses.fields(cfg):
        p += _range_problems(f, getattr(cfg, f.name), f.name)
    if cfg.lr_warmup_steps and cfg.lr_scheduler == "constant":
        p.append(f"lr_warmup_steps: {cfg.lr_warmup_steps} warm-up steps have no effect with lr_scheduler "
                 "constant; use constant_with_warmup (or linear, cosine)")
    problem = _tracker_problem(cfg.report_to)
    if problem:
        p.append(problem)
    return p

def _log_with(report_to: str):
    """The ``log_with`` argument of ``Accelerator`` for ``report_to`` (tests replace this)."""
    return None if report_to == "none" else [report_to]




class TrainRecipe:
    """One training program, read top to bottom: ``check`` (every problem at once, before any
    compute) -> ``setup`` (models, optimizer, resume) -> ``train`` (the loop) -> ``save_final``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.lock_held = False  # set by run() while it holds the run folder's lock
        self.inputs: Optional[TrainingInputs] = None
        self.vset = None  # the held-out ValidationSet (setup), None without a split
        self.last_val: dict = {}  # the latest held-out metrics, with their step

    def __getattr__(self, name: str):
        # after check(): recipe.store, recipe.groups, recipe.width ... are the checked inputs'
        inputs = self.__dict__.get("inputs")
        if inputs is not None and name in inputs.__dataclass_fields__:
            return getattr(inputs, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ check, before any compute
    def check(self) -> TrainingInputs:
        """Find every problem of the setup at once (options, store, groups, UNet width, run folder)
        and return what ``setup`` needs; raises SurpipeError listing them all."""
        from surpipe.run_folder import check_run_folder
        from surpipe.train_inputs import TrainingInputs, gather

        found, problems = gather(self.cfg)
        problems = _validate_numbers(self.cfg) + problems
        problems += check_run_folder(self.cfg, found["store"], found["groups"], split=found.get("split"))
        if problems:
            raise SurpipeError("cannot start training:", problems)
        self.inputs = TrainingInputs(**found)
        return self.inputs

    # ------------------------------------------------------------------ setup
    def setup(self, inputs: Optional[TrainingInputs] = None) -> None:
        """Load the frozen UNet, build the adapter, projection, optimizer and schedule, and resume
        from the latest checkpoint of the run folder (``check`` runs first unless given its result)."""
        import numpy as np
        import torch
        from diffusers import DDPMScheduler

        from surpipe import checkpoint as C
        from surpipe.config import save
        from surpipe.numerics import param_names
        from surpipe.run_folder import run_identity

        inputs = inputs or self.inputs or self.check()
        self.inputs = inputs
        cfg = self.cfg
        self._start_accelerator()
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # data flips, noise, timesteps
        self.unet = self._load_unet()
        self.noise_scheduler = DDPMScheduler.from_config(inputs.sched_config)
        self._build_trainables()
        self.param_names = param_names(adapter=self._unwrapped("adapter"), projection=self._unwrapped("projection"))
        self.step, self.position = 0, None
        self.out.mkdir(parents=True, exist_ok=True)
        if self.lock_held:  # only then can no live writer own a .tmp-step-* folder
            C.clean_stale_tmp(self.out / "checkpoints")
        latest = C.latest(self.out / "checkpoints")
        if latest is not None:
            self.load_checkpoint(latest)
        self.vset = self._validation_set()
        try:
            save(cfg, self.out / "config.json", extra={"store_fingerprint": inputs.store.fingerprint,
                                                       "run": run_identity(cfg, inputs.store, inputs.groups,
                                                                           split=inputs.split)})
        except OSError as e:
            raise SurpipeError(C.write_failure(self.out, "config.json", e)) from None

    def _start_accelerator(self) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        cfg = self.cfg
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise SurpipeError(f"device {cfg.device!r} requested but CUDA is not available")
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "no" if cpu else "fp16"  # the authors trained in fp16; CPU has no fast fp16
        # accelerate keeps one state per process; ``run`` may be called again in the same process
        # (tests, notebooks) with another precision, so start from a clean state
        AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(mixed_precision=mp, cpu=cpu, log_with=_log_with(cfg.report_to),
                                       project_dir=str(self.out))
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
        self.mixed_precision = mp

    def _load_unet(self):
        from diffusers import UNet2DConditionModel

        from surpipe.errors import first_line

        cfg = self.cfg
        try:
            unet = UNet2DConditionModel.from_pretrained(cfg.model, subfolder="unet", revision=cfg.revision,
                                                        torch_dtype=self.weight_dtype)
        except (OSError, ValueError) as e:
            raise SurpipeError(f"cannot load the UNet of {cfg.model}: {first_line(e)}") from None
        unet.requires_grad_(False)
        unet.eval()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet.to(self.device)

    def _build_trainables(self) -> None:
        """The adapter and the LLM projection (seeded by cfg.seed / projection_seed), AdamW and the
        LR schedule, prepared by accelerate."""
        import torch
        from diffusers.optimization import get_scheduler

        from surpipe.adapter import SURAdapter, SURAdapterConfig
        from surpipe.losses import LLMProjection

        cfg, inp = self.cfg, self.inputs
        adapter = SURAdapter(SURAdapterConfig(
            width=inp.width, nhead=cfg.nhead, dim_feedforward=cfg.dim_feedforward, num_layers=cfg.num_layers,
            dropout=cfg.dropout, adapter_weight=cfg.adapter_weight, token_mixing=cfg.token_mixing))
        projection = LLMProjection(inp.llm_size, inp.width, seed=cfg.projection_seed,
                                   learnable=cfg.projection == "learnable")
        params = list(adapter.parameters()) + (list(projection.parameters()) if cfg.projection == "learnable" else [])
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps)
        self.adapter, self.projection, self.optimizer = self.accelerator.prepare(adapter, projection, optimizer)
        self.adapter.train()

    def _unwrapped(self, name: str):
        return self.accelerator.unwrap_model(getattr(self, name))

    # ------------------------------------------------------------------ data
    def _stream(self):
        from surpipe.train_data import BlockReader, Position, SampleStream

        reader = BlockReader(self.cfg.store, self.inputs.groups, self.inputs.store.block_rows)
        pos = Position(**self.position) if self.position else None
        workers = self.cfg.workers
        if workers is None:
            # a block read costs ~0.2 ms against steps of hundreds of ms: on CPU, forked loader
            # processes only compete with the step for cores (bench/store_io.py, docs/performance.md)
            workers = 2 if self.device.type == "cuda" else 0
        return SampleStream(reader, self.cfg.batch_size, self.cfg.seed, workers=workers, position=pos,
                            keep=self._training_mask())

    def _training_mask(self):
        """Bool per store row, False on the held-out rows (None without a split)."""
        import numpy as np

        held = self.inputs.held_out
        if held is None or not len(held):
            return None
        keep = np.ones(self.inputs.store.num_samples, dtype=bool)
        keep[np.asarray(held, dtype=np.int64)] = False
        return keep

    def _batch_to_tensors(self, batch):
        """A loaded batch as tensors on the device, the latents sampled from the stored distributions."""
        import torch

        from surpipe.losses import sample_latents

        dev, inp = self.device, self.inputs
        latents = sample_latents(batch, use_flip=inp.groups.use_flip, scaling_factor=inp.scaling_factor,
                                 shift_factor=inp.shift_factor, generator=self.gen)
        t = {k: torch.from_numpy(batch[k]) for k in ("clip_simple", "clip_complex", "llm")}
        return {
            "latents": latents.to(dev), **{k: v.float().to(dev) for k, v in t.items()},
            # rows whose LLM vector is missing (zeros, matched=false) take no part in the LLM term
            "llm_mask": torch.from_numpy(batch["llm_matched"]).bool().to(dev) if "llm_matched" in batch else None,
        }

    def loss(self, b):
        """The three losses of one micro-batch and their weighted sum, as a dict of scalar tensors."""
        from surpipe.losses import composed_loss

        return composed_loss(b, adapter=self.adapter, projection=self.projection, unet=self.unet,
                             scheduler=self.noise_scheduler, generator=self.gen, cfg=self.cfg,
                             prediction_type=self.inputs.prediction_type, weight_dtype=self.weight_dtype)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train (or resume) to max_steps, then write the final adapter and the loss curve."""
        from surpipe import checkpoint as C
        from surpipe import train_log
        from surpipe.config import to_dict
        from surpipe.progress import progress_bar

        cfg = self.cfg
        if self.step >= cfg.max_steps:
            if C.final_adapter_stale(self.out):  # killed after the last checkpoint, before the adapter was written
                self.save_final()
            print(f"nothing to do: {self.out} already has {self.step} of {cfg.max_steps} steps")
            return {"step": self.step, "resumed": True, "nothing_to_do": True}
        stream = self._stream()
        it = iter(stream)  # loader workers start here, before the trackers
        start_step = self.step
        if start_step:  # steps logged after the checkpoint by a killed run are replayed: drop them
            train_log.drop_metrics_after(self.out / "metrics.jsonl", start_step)
        train_log.init_trackers(self.accelerator, cfg.report_to, to_dict(cfg), self.out)
        logger = train_log.RunLogger(self.out, self.accelerator)
        bar = progress_bar(total=cfg.max_steps, initial=self.step, unit="step", desc="train", disable=not cfg.progress)
        if start_step:
            logger.log_text(f"resumed from step {start_step}")
        t_run = time.perf_counter()
        try:
            last = self._loop(stream, it, logger, bar)
        except SurpipeError as e:
            logger.log_text(f"error: {e}")
            raise
        finally:
            bar.close()
            logger.close()
        self.save_final()
        if cfg.loss_curve:
            from surpipe.render import tiny_model_note

            _loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png", note=tiny_model_note(cfg.model))
        elapsed, n = time.perf_counter() - t_run, self.step - start_step
        print(f"trained {n} steps in {elapsed:.1f}s ({n / max(elapsed, 1e-9):.2f} steps/s); last loss "
              f"{last.get('loss', float('nan')):.5f}; adapter: {self.out / 'adapter'}")
        if self.last_val:
            print(train_log.validation_summary(self.last_val, len(self.vset)))
        return {"step": self.step, "steps_run": n, "seconds": round(elapsed, 2), "final": last,
                "adapter": str(self.out / "adapter")}

    def _loop(self, stream, it, logger, bar) -> dict:
        """Steps until max_steps; stops with a SurpipeError (before anything is saved) on a
        non-finite loss, gradient or weight."""
        from surpipe import numerics as N

        cfg = self.cfg
        last: dict = {}
        skipped = 0  # consecutive optimizer steps skipped by the fp16 loss scaler
        params = list(self.optimizer.param_groups[0]["params"])
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            sums, times = self._accumulate(it)
            # a non-finite term stops the run here, before the optimizer step: the weights and the
            # last checkpoint stay as they were
            self._stop_if(N.loss_problem(sums))
            te = time.perf_counter()
            if self.accelerator.scaler is None:  # with fp16 loss scaling overflows are expected (skipped steps)
                self._stop_if(N.gradient_problem(params, self.param_names))
            grad_norm = float(self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
            self.optimizer.step()
            skipped = skipped + 1 if getattr(self.optimizer, "step_was_skipped", False) else 0
            if skipped >= 30:  # the scale fell by 2**30: the gradients overflow even unscaled
                self._stop_if(f"the fp16 loss scaler skipped {skipped} steps in a row "
                              "(non-finite gradients); try --mixed-precision bf16 or no")
            self._stop_if(N.weight_problem(params, self.param_names))
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.position = stream.position.to_dict()
            step_s = time.perf_counter() - t0
            last = {"step": self.step, **sums, "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "step_s": step_s, **times, "optimizer_s": time.perf_counter() - te,
                    "samples_per_s": cfg.batch_size * cfg.grad_accum / step_s, "epoch": stream.position.epoch}
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                logger.log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.4f}", wait=f"{times['data_wait_s'] / step_s:.0%}", refresh=False)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
            if self.vset is not None and (self.step == cfg.max_steps or (
                    cfg.validation_every and self.step % cfg.validation_every == 0)):
                self.last_val = {"step": self.step, **self.evaluate_held_out()}
                logger.log_validation(self.last_val)
            if cfg.validation_every and (self.step % cfg.validation_every == 0 or self.step == cfg.max_steps):
                logger.log_image("validation", self.validate(), self.step)
        return last

    def _accumulate(self, it) -> tuple[dict, dict]:
        """Forward and backward of grad_accum micro-batches: the mean loss terms and the times spent."""
        cfg = self.cfg
        times = {"data_wait_s": 0.0, "forward_s": 0.0, "backward_s": 0.0}
        sums = {"loss": 0.0, "denoise": 0.0, "llm": 0.0, "prompt": 0.0}
        for _ in range(cfg.grad_accum):
            ta = time.perf_counter()
            batch = self._batch_to_tensors(next(it))
            tb = time.perf_counter()
            with self.accelerator.autocast():
                losses = self.loss(batch)
            tc = time.perf_counter()
            self.accelerator.backward(losses["loss"] / cfg.grad_accum)
            times["data_wait_s"] += tb - ta
            times["forward_s"] += tc - tb
            times["backward_s"] += time.perf_counter() - tc
            for k in sums:
                sums[k] += float(losses[k].detach()) / cfg.grad_accum
        return sums, times

    def _stop_if(self, what: Optional[str]) -> None:
        """Stop the run on a non-finite number (``what`` says where), keeping the last checkpoint."""
        from surpipe.checkpoint import latest as latest_checkpoint

        if what is None:
            return
        latest = latest_checkpoint(self.out / "checkpoints")
        kept = (f"the last good checkpoint {latest} is kept" if latest is not None
                else "no checkpoint had been written yet")
        raise SurpipeError(
            f"training stopped at step {self.step + 1}: {what}. Nothing of this step was saved and {kept}. "
            "Check the store (surpipe verify) and the options (learning_rate, loss weights, noise_offset, "
            "min_snr_gamma); a rerun resumes from the last checkpoint.")

    # ------------------------------------------------------------------ checkpoints and the final adapter
    def _modules(self) -> dict:
        return {"adapter": self._unwrapped("adapter"), "projection": self._unwrapped("projection")}

    def _refuse_nonfinite_weights(self, what: str) -> None:
        """Never write a NaN/Inf adapter or projection: raise naming the tensors instead."""
        from surpipe.numerics import listing, nonfinite_tensors

        bad = nonfinite_tensors(**self._modules())
        if bad:
            raise SurpipeError(f"refusing to write a {what} of {self.out} at step {self.step}: non-finite "
                               f"values in {listing(bad)}")

    def save_checkpoint(self) -> Path:
        """Adapter, projection, optimizer, LR schedule, step, RNG states and data position (atomic;
        older checkpoints pruned to keep_checkpoints)."""
        from surpipe.checkpoint import save_checkpoint

        self._refuse_nonfinite_weights("checkpoint")
        return save_checkpoint(self.out, self.step, **self._modules(), optimizer=self.optimizer,
                               lr_scheduler=self.lr_scheduler, scaler=self.accelerator.scaler, gen=self.gen,
                               position=self.position, max_steps=self.cfg.max_steps, keep=self.cfg.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint (a damaged one raises SurpipeError naming it and the previous one)."""
        from surpipe.checkpoint import load_checkpoint

        self.step, self.position = load_checkpoint(
            path, **self._modules(), optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
            scaler=self.accelerator.scaler, gen=self.gen, num_blocks=self.inputs.store.num_blocks,
            block_rows=self.inputs.store.block_rows)
        print(f"resuming {self.out} from {path.name} (step {self.step})")

    def save_final(self) -> None:
        """The final adapter in ``OUT/adapter`` (save_pretrained layout) and the projection."""
        from surpipe.checkpoint import save_final

        self._refuse_nonfinite_weights("final adapter")
        save_final(self.out, **self._modules())

    # ------------------------------------------------------------------ held-out validation
    def _validation_set(self):
        """The held-out rows with their fixed latents, noise and timesteps (None without a split)."""
        from surpipe.validation import ValidationSet

        inp, cfg = self.inputs, self.cfg
        if inp.held_out is None or not len(inp.held_out):
            return None
        return ValidationSet.from_store(cfg.store, inp.groups, inp.held_out, scaling_factor=inp.scaling_factor,
                                        shift_factor=inp.shift_factor,
                                        num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
                                        seed=cfg.val_seed)

    def evaluate_held_out(self) -> dict:
        """The held-out metrics (surpipe.validation.METRICS) of the adapter as it is now, under the
        training autocast; draws nothing from the training random generators."""
        from surpipe.validation import evaluate

        if self.vset is None:
            raise SurpipeError("no held-out rows: give --val-rows or --val-fraction")
        with self.accelerator.autocast():
            return evaluate(self._unwrapped("adapter"), self._unwrapped("projection"), self.unet,
                            self.noise_scheduler, self.vset, prediction_type=self.inputs.prediction_type,
                            min_snr_gamma=self.cfg.min_snr_gamma, prompt_target=self.cfg.prompt_target,
                            weight_dtype=self.weight_dtype)

    # ------------------------------------------------------------------ validation pictures
    def validate(self) -> Path:
        """Render the validation prompts without and with the adapter (same seeds) into a grid."""
        from surpipe.render import compare_grid

        cfg = self.cfg
        prompts = cfg.validation_prompts or [str(p) for p in self.inputs.store.prompts("simple")[:4]]
        adapter = self._unwrapped("adapter")
        was_training = adapter.training
        adapter.eval()
        path = self.out / "validation" / f"step-{self.step:08d}.png"
        try:
            compare_grid(cfg.model, adapter, prompts, path, unet=self.unet, steps=cfg.validation_steps,
                         seed=cfg.validation_seed, size=cfg.validation_size, revision=cfg.revision,
                         device=self.device, dtype=self.weight_dtype, progress=False)
        finally:
            adapter.train(was_training)
        return path


def run(cfg: TrainConfig) -> dict:
    """Check the setup, load the frozen UNet, train (or resume) and save the adapter.

    The run folder is locked while training: a second job on the same ``--out`` is refused.
    """
    from surpipe.locks import exclusive_lock

    recipe = TrainRecipe(cfg)
    inputs = recipe.check()  # every problem at once, before anything is written
    try:
        recipe.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SurpipeError(f"cannot create run folder {recipe.out}: {e.strerror or e}; choose another --out") from None
    with exclusive_lock(recipe.out / ".lock", f"run folder {recipe.out}"):
        recipe.lock_held = True
        recipe.setup(inputs)
        return recipe.train()
