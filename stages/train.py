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
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from surpipe.errors import SurpipeError

# Settings that may change between a run and its resume: they do not change what is learned.
RESUMABLE_CHANGES = {
    "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "tensorboard", "workers",
    "progress", "device", "validation_every", "validation_prompts", "validation_steps",
    "validation_size", "validation_seed", "loss_curve",
}


@dataclass
class TrainConfig:
    """Every hyper-parameter of the authors' run, with their values as defaults (method.md)."""

    store: str
    model: str
    out: str
    llm_layer: int
    llm_group: Optional[str] = None
    clip_group: Optional[str] = None
    vae_group: Optional[str] = None
    revision: Optional[str] = None
    # optimisation (authors: batch 1 x accumulation 4, 5000 steps, AdamW 1e-5 constant, clip 1.0)
    max_steps: int = 5000
    batch_size: int = 1
    grad_accum: int = 4
    learning_rate: float = 1e-5
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    # the adapter (authors: 2 encoder layers, 8 heads, FFN 2048, adapter_weight 0.1)
    adapter_weight: float = 0.1
    token_mixing: Literal["sequence", "tokenwise"] = "sequence"
    nhead: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 2
    dropout: float = 0.1
    # losses (authors: llm 1e-5, prompt 1e-5; denoising loss through the UNet in the paper)
    llm_weight: float = 1e-5
    prompt_weight: float = 1e-5
    gradient_path: Literal["paper", "authors"] = "paper"
    projection: Literal["frozen", "learnable"] = "frozen"
    projection_seed: int = 0
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None
    min_snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    flip: bool = True
    # running
    device: str = "auto"
    workers: Optional[int] = None  # loader processes; None: 0 on CPU, 2 on CUDA (docs/performance.md)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 1
    tensorboard: bool = False
    progress: bool = True
    loss_curve: bool = True
    validation_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 20
    validation_size: Optional[int] = None
    validation_seed: int = 0


def _validate_numbers(cfg: TrainConfig) -> list[str]:
    p = []
    for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
        if getattr(cfg, name) < 1:
            p.append(f"{name} must be >= 1 (got {getattr(cfg, name)})")
    for name in ("learning_rate", "adam_epsilon", "max_grad_norm"):
        if not getattr(cfg, name) > 0:
            p.append(f"{name} must be > 0 (got {getattr(cfg, name)})")
    if not 0.0 <= cfg.adapter_weight <= 1.0:
        p.append(f"adapter_weight must be within [0, 1] (got {cfg.adapter_weight})")
    if cfg.min_snr_gamma is not None and cfg.min_snr_gamma <= 0:
        p.append(f"min_snr_gamma must be > 0 (got {cfg.min_snr_gamma})")
    if cfg.workers is not None and cfg.workers < 0:
        p.append(f"workers must be >= 0 (got {cfg.workers})")
    if cfg.validation_every < 0:
        p.append("validation_every must be >= 0")
    return p


class TrainRecipe:
    """One training program: ``setup`` checks everything and loads, ``train`` loops, ``save`` writes."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)

    # ------------------------------------------------------------------ checks, before any compute
    def check(self) -> None:
        """Find every problem of the setup at once (store, groups, UNet width, options, run folder)."""
        from surpipe.hub import read_model_config
        from surpipe.store import FeatureStore
        from surpipe.train_data import resolve_groups

        cfg = self.cfg
        problems = _validate_numbers(cfg)
        self.store = None
        try:
            self.store = FeatureStore(cfg.store)
        except SurpipeError as e:
            problems.append(str(e))
        self.groups = None
        if self.store is not None:
            self.groups, gp = resolve_groups(
                self.store, llm_layer=cfg.llm_layer, llm_group=cfg.llm_group, clip_group=cfg.clip_group,
                vae_group=cfg.vae_group, use_flip=cfg.flip)
            problems += gp
        unet_cfg = sched_cfg = None
        try:
            unet_cfg = read_model_config(cfg.model, "unet", cfg.revision)
            sched_cfg = read_model_config(cfg.model, "scheduler", cfg.revision)
        except SurpipeError as e:
            problems.append(str(e))
        if unet_cfg is not None and (unet_cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel"
                                     or "cross_attention_dim" not in unet_cfg):
            problems.append(f"{cfg.model}: unet/config.json is not a Stable Diffusion UNet (_class_name "
                            f"{unet_cfg.get('_class_name')!r}, model_type {unet_cfg.get('model_type')!r}); "
                            "give a diffusers Stable Diffusion folder or hub id")
            unet_cfg = None
        g = self.groups
        if g is not None and g.clip_group and "simple" in self.store.group(g.clip_group).array_names:
            simple = self.store.group(g.clip_group).array("simple")
            self.width, self.seq_len = int(simple.shape[-1]), int(simple.shape[-2])
            if unet_cfg is not None:
                cad = unet_cfg.get("cross_attention_dim")
                if isinstance(cad, (list, tuple)):
                    cad = cad[0]
                if cad != self.width:
                    problems.append(f"width mismatch: the store's CLIP embeddings are {self.width} wide but "
                                    f"the UNet of {cfg.model} expects cross_attention_dim {cad}; "
                                    "use the SD model whose text encoder made the store")
            if self.width % cfg.nhead:
                problems.append(f"nhead {cfg.nhead} does not divide the embedding width {self.width}")
        if g is not None and g.llm_group:
            names = self.store.group(g.llm_group).array_names
            if f"layer_{cfg.llm_layer}/pooled" in names:
                self.llm_size = int(self.store.group(g.llm_group).array(f"layer_{cfg.llm_layer}/pooled").shape[-1])
        if g is not None and g.vae_group and "mean" in self.store.group(g.vae_group).array_names:
            vae = self.store.group(g.vae_group)
            self.latent_shape = tuple(vae.array("mean").shape[1:])
            vattrs = {**vae.attrs.get("provenance", {}), **vae.settings}
            if "scaling_factor" not in vattrs:
                problems.append(f"{g.vae_group} does not record the VAE scaling_factor")
            self.scaling_factor = float(vattrs.get("scaling_factor", 1.0))
            self.shift_factor = float(vattrs.get("shift_factor") or 0.0)
            if unet_cfg is not None and unet_cfg.get("in_channels") != self.latent_shape[0]:
                problems.append(f"latent channels mismatch: store {self.latent_shape[0]}, "
                                f"UNet in_channels {unet_cfg.get('in_channels')}")
        if sched_cfg is not None:
            pt = cfg.prediction_type or sched_cfg.get("prediction_type", "epsilon")
            if pt not in ("epsilon", "v_prediction"):
                problems.append(f"prediction type {pt!r} is not supported; valid choices: epsilon, v_prediction")
            self.prediction_type = pt
            self.sched_cfg = sched_cfg
        problems += self._check_run_folder()
        if problems:
            raise SurpipeError("cannot start training:", problems)

    def _settings(self) -> dict:
        from surpipe.config import to_dict

        d = to_dict(self.cfg)
        return {k: v for k, v in d.items() if k not in RESUMABLE_CHANGES}

    def _check_run_folder(self) -> list[str]:
        saved = self.out / "config.json"
        if not saved.exists():
            if self.out.exists() and any(not p.name.startswith(".") for p in self.out.iterdir()):
                return [f"{self.out} exists and is not a surpipe run folder; choose another --out"]
            return []
        try:
            old = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return [f"{saved} is unreadable ({e}); choose another --out"]
        old.pop("_surpipe", None)
        new = self._settings()
        old = {k: v for k, v in old.items() if k not in RESUMABLE_CHANGES}
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return [f"run folder {self.out} was started with other settings ({k}: {old.get(k)!r} there, "
                f"{new.get(k)!r} now); resume with the same settings or choose another --out" for k in diff]

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import numpy as np
        import torch
        from accelerate import Accelerator
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler

        from surpipe.adapter import SURAdapter, SURAdapterConfig
        from surpipe.config import save
        from surpipe.losses import LLMProjection

        cfg = self.cfg
        self.check()
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise SurpipeError(f"device {cfg.device!r} requested but CUDA is not available")
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "no" if cpu else "fp16"  # the authors trained in fp16; CPU has no fast fp16
        # accelerate keeps one state per process; ``run`` may be called again in the same process
        # (tests, notebooks) with another precision, so start from a clean state
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(mixed_precision=mp, cpu=cpu)
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
        self.mixed_precision = mp

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

        try:
            self.unet = UNet2DConditionModel.from_pretrained(cfg.model, subfolder="unet", revision=cfg.revision,
                                                             torch_dtype=self.weight_dtype)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SurpipeError(f"cannot load the UNet of {cfg.model}: {first}") from None
        self.unet.requires_grad_(False)
        self.unet.eval()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.to(self.device)
        self.noise_scheduler = DDPMScheduler.from_config(self.sched_cfg)

        self.adapter = SURAdapter(SURAdapterConfig(
            width=self.width, nhead=cfg.nhead, dim_feedforward=cfg.dim_feedforward, num_layers=cfg.num_layers,
            dropout=cfg.dropout, adapter_weight=cfg.adapter_weight, token_mixing=cfg.token_mixing))
        self.projection = LLMProjection(self.llm_size, self.width, seed=cfg.projection_seed,
                                        learnable=cfg.projection == "learnable")
        params = list(self.adapter.parameters())
        if cfg.projection == "learnable":
            params += list(self.projection.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps)
        self.adapter, self.projection, self.optimizer = self.accelerator.prepare(
            self.adapter, self.projection, self.optimizer)
        self.adapter.train()

        self.step = 0
        self.position = None
        self.out.mkdir(parents=True, exist_ok=True)
        latest = self.latest_checkpoint()
        if latest is not None:
            self.load_checkpoint(latest)
        save(cfg, self.out / "config.json", extra={"store_fingerprint": self.store.fingerprint})

    # ------------------------------------------------------------------ data
    def _stream(self):
        from surpipe.train_data import BlockReader, Position, SampleStream

        reader = BlockReader(self.cfg.store, self.groups, self.store.block_rows)
        pos = Position(**self.position) if self.position else None
        workers = self.cfg.workers
        if workers is None:
            # a block read costs ~0.2 ms against steps of hundreds of ms: on CPU, forked loader
            # processes only compete with the step for cores (bench/store_io.py, docs/performance.md)
            workers = 2 if self.device.type == "cuda" else 0
        return SampleStream(reader, self.cfg.batch_size, self.cfg.seed, workers=workers, position=pos)

    def _batch_to_tensors(self, batch):
        import torch

        dev = self.device
        t = {k: torch.from_numpy(v) for k, v in batch.items()}
        mean, std = t["lat_mean"].float(), t["lat_std"].float()
        bsz = mean.shape[0]
        if self.groups.use_flip:
            flip = torch.rand(bsz, generator=self.gen) < 0.5
            fm = flip.view(-1, *([1] * (mean.dim() - 1)))
            mean = torch.where(fm, t["flip_mean"].float(), mean)
            std = torch.where(fm, t["flip_std"].float(), std)
        eps = torch.randn(mean.shape, generator=self.gen)
        latents = ((mean + std * eps) - self.shift_factor) * self.scaling_factor
        return {
            "latents": latents.to(dev),
            "clip_simple": t["clip_simple"].float().to(dev),
            "clip_complex": t["clip_complex"].float().to(dev),
            "llm": t["llm"].float().to(dev),
        }

    # ------------------------------------------------------------------ one micro-batch
    def loss(self, b):
        """The three losses of one micro-batch (method.md), as a dict of scalar tensors."""
        import torch

        from surpipe import losses as L

        cfg = self.cfg
        latents = b["latents"]
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.gen).to(self.device)
        if cfg.noise_offset:
            noise = L.apply_noise_offset(noise, cfg.noise_offset, self.gen)
        T = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, T, (bsz,), generator=self.gen).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)

        out, e, _ = _adapter_aux(self.adapter, b["clip_simple"])
        llm_loss = L.llm_loss(self.projection(b["llm"]), e)
        prompt_loss = L.prompt_loss(b["clip_complex"], out)
        cond = out if cfg.gradient_path == "paper" else out.detach()
        pred = self.unet(noisy.to(self.weight_dtype), timesteps, cond.to(self.weight_dtype)).sample.float()
        target = L.denoise_target(self.noise_scheduler, latents, noise, timesteps, self.prediction_type)
        weights = None
        if cfg.min_snr_gamma is not None:
            weights = L.min_snr_weights(self.noise_scheduler, timesteps, cfg.min_snr_gamma, self.prediction_type)
        denoise = L.denoise_loss(pred, target.float(), weights)
        total = denoise + cfg.llm_weight * llm_loss + cfg.prompt_weight * prompt_loss
        return {"loss": total, "denoise": denoise, "llm": llm_loss, "prompt": prompt_loss}

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        import torch
        from surpipe.progress import progress_bar

        cfg = self.cfg
        if self.step >= cfg.max_steps:
            if self._final_adapter_stale():  # killed after the last checkpoint, before the adapter was written
                self.save_final()
            msg = f"nothing to do: {self.out} already has {self.step} of {cfg.max_steps} steps"
            print(msg)
            return {"step": self.step, "resumed": True, "nothing_to_do": True}
        stream = self._stream()
        it = iter(stream)
        start_step = self.step
        if start_step:  # steps logged after the checkpoint by a killed run are replayed: drop them
            _drop_metrics_after(self.out / "metrics.jsonl", start_step)
        logger = _RunLogger(self.out, cfg.tensorboard, start_step)
        bar = progress_bar(total=cfg.max_steps, initial=self.step, unit="step",
                           desc="train", disable=not cfg.progress)
        if start_step:
            logger.log_text(f"resumed from step {start_step}")
        t_run = time.perf_counter()
        last = {}
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            wait = fwd = bwd = 0.0
            sums = {"loss": 0.0, "denoise": 0.0, "llm": 0.0, "prompt": 0.0}
            for _ in range(cfg.grad_accum):
                ta = time.perf_counter()
                batch = self._batch_to_tensors(next(it))
                tb = time.perf_counter()
                with self.accelerator.autocast():
                    losses = self.loss(batch)
                tc = time.perf_counter()
                self.accelerator.backward(losses["loss"] / cfg.grad_accum)
                td = time.perf_counter()
                wait += tb - ta
                fwd += tc - tb
                bwd += td - tc
                for k in sums:
                    sums[k] += float(losses[k].detach()) / cfg.grad_accum
            te = time.perf_counter()
            params = [p for p in self.optimizer.param_groups[0]["params"]]
            grad_norm = float(self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.position = stream.position.to_dict()
            step_s = time.perf_counter() - t0
            last = {
                "step": self.step, **sums, "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "step_s": step_s, "data_wait_s": wait, "forward_s": fwd, "backward_s": bwd,
                "optimizer_s": time.perf_counter() - te,
                "samples_per_s": cfg.batch_size * cfg.grad_accum / step_s,
                "epoch": stream.position.epoch,
            }
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                logger.log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.4f}", wait=f"{wait / step_s:.0%}", refresh=False)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
            if cfg.validation_every and (self.step % cfg.validation_every == 0 or self.step == cfg.max_steps):
                self.validate()
        bar.close()
        self.save_final()
        logger.close()
        if cfg.loss_curve:
            _loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        elapsed = time.perf_counter() - t_run
        summary = {"step": self.step, "steps_run": self.step - start_step, "seconds": round(elapsed, 2),
                   "final": last, "adapter": str(self.out / "adapter")}
        print(f"trained {self.step - start_step} steps in {elapsed:.1f}s "
              f"({(self.step - start_step) / max(elapsed, 1e-9):.2f} steps/s); last loss {last.get('loss', float('nan')):.5f}; "
              f"adapter: {self.out / 'adapter'}")
        return summary

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Optional[Path]:
        d = self._ckpt_dir()
        if not d.is_dir():
            return None
        done = sorted(p for p in d.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        """Adapter, projection, optimizer, LR schedule, step, RNG states and data position,
        written under a temporary name and renamed, then older checkpoints pruned."""
        import torch
        from safetensors.torch import save_file

        final = self._ckpt_dir() / f"step-{self.step:08d}"
        tmp = self._ckpt_dir() / f".tmp-step-{self.step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.accelerator.unwrap_model(self.adapter).save_pretrained(tmp / "adapter")
        self.accelerator.unwrap_model(self.projection).save(tmp / "projection.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                    "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None},
                   tmp / "optimizer.pt")
        rng = {"torch_cpu": torch.get_rng_state(), "generator": self.gen.get_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"step": self.step, "position": self.position, "python_random": repr(random.getstate()),
                 "max_steps": self.cfg.max_steps}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpts = sorted(p for p in self._ckpt_dir().iterdir() if p.name.startswith("step-"))
        for old in ckpts[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        import torch
        from safetensors.torch import load_file

        from surpipe.adapter import SURAdapter

        state = json.loads((path / "state.json").read_text())
        src = SURAdapter.from_pretrained(path / "adapter")
        self.accelerator.unwrap_model(self.adapter).load_state_dict(src.state_dict())
        from surpipe.losses import LLMProjection

        saved = LLMProjection.load(path / "projection.safetensors")
        self.accelerator.unwrap_model(self.projection).load_state_dict(saved.state_dict())
        from surpipe.safeload import load_torch_file

        try:  # a run folder can come from someone else: no pickled code runs
            opt = load_torch_file(path / "optimizer.pt", "optimizer state")
        except SurpipeError as e:
            raise SurpipeError(f"checkpoint {path} cannot be loaded ({e}); "
                               f"delete {path.name} to resume from an earlier checkpoint") from None
        self.optimizer.load_state_dict(opt["optimizer"])
        self.lr_scheduler.load_state_dict(opt["lr_scheduler"])
        if opt.get("scaler") and self.accelerator.scaler:
            self.accelerator.scaler.load_state_dict(opt["scaler"])
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        self.gen.set_state(rng["generator"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        self.step = int(state["step"])
        self.position = state["position"]
        print(f"resuming {self.out} from {path.name} (step {self.step})")

    def _final_adapter_stale(self) -> bool:
        """True when OUT/adapter is missing or older than the latest checkpoint."""
        from surpipe.adapter import WEIGHTS_NAME

        final = self.out / "adapter" / WEIGHTS_NAME
        latest = self.latest_checkpoint()
        if not final.is_file():
            return True
        return latest is not None and final.stat().st_mtime_ns < (latest / "state.json").stat().st_mtime_ns

    def save_final(self) -> None:
        """The final adapter in ``OUT/adapter`` (save_pretrained layout) and the projection."""
        tmp = self.out / ".tmp-adapter"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.unwrap_model(self.adapter).save_pretrained(tmp)
        self.accelerator.unwrap_model(self.projection).save(tmp / "llm_projection.safetensors")
        final = self.out / "adapter"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    # ------------------------------------------------------------------ validation pictures
    def validate(self) -> Optional[Path]:
        """Render the validation prompts without and with the adapter (same seeds) into a grid."""
        from surpipe.render import compare_grid

        prompts = self.cfg.validation_prompts or [str(p) for p in self.store.prompts("simple")[:4]]
        adapter = self.accelerator.unwrap_model(self.adapter)
        was_training = adapter.training
        adapter.eval()
        path = self.out / "validation" / f"step-{self.step:08d}.png"
        try:
            compare_grid(self.cfg.model, adapter, prompts, path, unet=self.unet, steps=self.cfg.validation_steps,
                         seed=self.cfg.validation_seed, size=self.cfg.validation_size, revision=self.cfg.revision,
                         device=self.device, dtype=self.weight_dtype, progress=False)
        finally:
            adapter.train(was_training)
        return path


def _adapter_aux(adapter, x):
    """(out, e, fc(a)) of a possibly wrapped adapter: the wrapper's forward keeps autocast hooks."""
    return adapter(x, return_aux=True)


class _RunLogger:
    """metrics.jsonl (one JSON object per logged step) + a human train.log (+ optional TensorBoard)."""

    def __init__(self, out: Path, tensorboard: bool, start_step: int):
        self.metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
        self.human = open(out / "train.log", "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SurpipeError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(out / "tensorboard"))
        self.t0 = time.perf_counter()

    def log_text(self, msg: str) -> None:
        self.human.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
        self.human.flush()

    def log(self, m: dict) -> None:
        self.metrics.write(json.dumps(m) + "\n")
        self.metrics.flush()
        self.log_text(
            f"step {m['step']} loss {m['loss']:.5f} (denoise {m['denoise']:.5f} llm {m['llm']:.4f} "
            f"prompt {m['prompt']:.4f}) lr {m['lr']:.2e} gnorm {m['grad_norm']:.3f} "
            f"{m['samples_per_s']:.1f} samples/s wait {m['data_wait_s'] / m['step_s']:.0%}")
        if self.tb is not None:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, m["step"])

    def close(self) -> None:
        self.metrics.close()
        self.human.close()
        if self.tb is not None:
            self.tb.close()


def _drop_metrics_after(metrics: Path, step: int) -> None:
    """Keep only the rows of metrics.jsonl up to ``step`` (atomically)."""
    if not metrics.is_file():
        return
    keep = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    tmp = metrics.with_name(metrics.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, metrics)


def _loss_curve(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, key in zip(axes, ("loss", "denoise", "llm", "prompt")):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def run(cfg: TrainConfig) -> dict:
    """Check the setup, load the frozen UNet, train (or resume) and save the adapter.

    The run folder is locked while training: a second job on the same ``--out`` is refused.
    """
    from surpipe.parallel import exclusive_lock

    recipe = TrainRecipe(cfg)
    recipe.check()  # every problem at once, before anything is written
    recipe.out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(recipe.out / ".lock", f"run folder {recipe.out}"):
        recipe.setup()
        return recipe.train()
