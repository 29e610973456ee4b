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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from surpipe.config import opt
from surpipe.errors import SurpipeError

# Settings that may change between a run and its resume: they do not change what is learned.
RESUMABLE_CHANGES = {
    "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "tensorboard", "report_to", "workers",
    "progress", "device", "validation_every", "validation_prompts", "validation_steps",
    "validation_size", "validation_seed", "loss_curve",
}

# Settings compared resolved at a resume (``TrainRecipe._run_identity``), not as typed: the same
# store or model given by a relative path, a symlink or with a trailing slash is the same.
IDENTITY_KEYS = {"store", "out", "model", "llm_group", "clip_group", "vae_group", "llm_layer"}

# --report-to choice -> the packages that provide it (any one suffices), as accelerate looks for them
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}

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


def _tracker_problem(report_to: str) -> Optional[str]:
    """Why ``report_to`` cannot be used here (its package is missing), or None."""
    import importlib.util

    if report_to == "none":
        return None
    for mod in TRACKER_PACKAGES[report_to]:
        try:
            if importlib.util.find_spec(mod) is not None:
                return None
        except (ImportError, ValueError):
            continue
    return (f"report_to: {report_to} needs the {report_to} package, which is not installed: "
            f"pip install 'surpipe[tracking]' (or pip install {TRACKER_PACKAGES[report_to][0]})")


def _log_with(report_to: str):
    """The ``log_with`` argument of ``Accelerator`` for ``report_to`` (tests replace this)."""
    return None if report_to == "none" else [report_to]


class TrainRecipe:
    """One training program: ``setup`` checks everything and loads, ``train`` loops, ``save`` writes."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.lock_held = False  # set by run() while it holds the run folder's lock

    # ------------------------------------------------------------------ checks, before any compute
    def check(self) -> None:
        """Find every problem of the setup at once (store, groups, UNet width, options, run folder)."""
        from surpipe.features import ClipFeatures, LLMFeatures, VaeFeatures
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
        unet_cfg = sched_cfg = None
        try:
            from surpipe.sd import check_pipeline_class

            check_pipeline_class(cfg.model, cfg.revision)  # SDXL and others: refused by name
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
        self.groups = None
        if self.store is not None:
            # read after the UNet config: among several CLIP/VAE groups, the one that fits --model is picked
            self.groups, gp = resolve_groups(
                self.store, llm_layer=cfg.llm_layer, llm_group=cfg.llm_group, clip_group=cfg.clip_group,
                vae_group=cfg.vae_group, use_flip=cfg.flip, model=cfg.model, revision=cfg.revision,
                unet_config=unet_cfg)
            problems += gp
        g = self.groups
        shape = ClipFeatures.embedding_shape(self.store.group(g.clip_group)) if g is not None and g.clip_group else None
        if shape is not None:
            self.seq_len, self.width = shape
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
        size = LLMFeatures.width(self.store.group(g.llm_group), g.llm_layer) if g is not None and g.llm_group else None
        if size is not None:  # g.llm_layer: --llm-layer -1 resolved
            self.llm_size = size
        lat = VaeFeatures.latent_params(self.store.group(g.vae_group)) if g is not None and g.vae_group else None
        if lat is not None:
            self.latent_shape = lat.shape
            if lat.scaling_factor is None:
                problems.append(f"{g.vae_group} does not record the VAE scaling_factor")
            self.scaling_factor = 1.0 if lat.scaling_factor is None else lat.scaling_factor
            self.shift_factor = lat.shift_factor
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
        """The settings a resume must share with the run, with the identity keys (store, model,
        groups, layer, out) left out: those are compared resolved, through ``_run_identity``."""
        from surpipe.config import to_dict

        d = to_dict(self.cfg)
        return {k: v for k, v in d.items() if k not in RESUMABLE_CHANGES and k not in IDENTITY_KEYS}

    def _run_identity(self) -> Optional[dict]:
        """What this run trains on, resolved: the store (path, dataset fingerprint, rows, blocks),
        the model, the LLM layer and each group with its settings. Recorded in config.json and
        compared at every resume; None when the store or a group could not be resolved."""
        from surpipe.store import settings_hash
        from surpipe.train_data import model_id

        cfg, g = self.cfg, self.groups
        if self.store is None or g is None or None in (g.llm_group, g.clip_group, g.vae_group):
            return None
        groups = {}
        for kind, path, req in (("llm", g.llm_group, cfg.llm_group), ("clip", g.clip_group, cfg.clip_group),
                                ("vae", g.vae_group, cfg.vae_group)):
            s = self.store.group(path).settings
            if kind == "llm":  # layers added to the group later leave the stored ones unchanged
                s = {k: v for k, v in s.items() if k != "layers"}
            groups[kind] = {"path": path, "picked": "auto" if req is None else "option",
                            "settings_hash": settings_hash(s), "settings": s}
        return {"store": str(Path(cfg.store).expanduser().resolve()),
                "dataset_fingerprint": self.store.fingerprint, "num_samples": self.store.num_samples,
                "block_rows": self.store.block_rows, "model": model_id(cfg.model), "llm_layer": g.llm_layer,
                "groups": groups}

    def _identity_changes(self, old: dict, meta: dict) -> list[str]:
        """What differs between the run folder's recorded identity and this run's (one line each)."""
        new = self._run_identity()
        if new is None:
            return []  # the store or a group is unusable: reported by check() already
        rec = meta.get("run")
        if not isinstance(rec, dict):  # a run folder from before identities were recorded
            fp = meta.get("store_fingerprint")
            changes = []
            if fp is not None and fp != new["dataset_fingerprint"]:
                changes.append(f"the store's dataset changed: fingerprint {str(fp)[:12]} then, "
                               f"{new['dataset_fingerprint'][:12]} now")
            for k, now in (("llm_layer", new["llm_layer"]), ("model", new["model"])):
                then = old.get(k)
                if k == "model" and isinstance(then, str):
                    from surpipe.train_data import model_id

                    then = model_id(then)
                if then != now:
                    changes.append(f"{k}: {then!r} then, {now!r} now")
            for kind in ("llm", "clip", "vae"):
                then = old.get(f"{kind}_group")
                if isinstance(then, str) and not then.startswith(kind + "/"):
                    then = f"{kind}/{then}"
                if then is not None and then != new["groups"][kind]["path"]:
                    changes.append(f"{kind} group: {then!r} then, {new['groups'][kind]['path']!r} now")
            return changes
        changes = []
        if rec.get("dataset_fingerprint") != new["dataset_fingerprint"]:
            changes.append(
                f"the store's dataset changed: {rec.get('store')} held {rec.get('num_samples')} rows (dataset "
                f"fingerprint {str(rec.get('dataset_fingerprint'))[:12]}), {new['store']} holds "
                f"{new['num_samples']} rows (fingerprint {new['dataset_fingerprint'][:12]})")
        else:
            for k in ("num_samples", "block_rows"):
                if rec.get(k) != new[k]:
                    changes.append(f"store {k}: {rec.get(k)!r} then, {new[k]!r} now")
        if rec.get("model") != new["model"]:
            changes.append(f"model: {rec.get('model')!r} then, {new['model']!r} now")
        if rec.get("llm_layer") != new["llm_layer"]:
            hint = " (--llm-layer -1 means the last stored layer, and the group's layers changed)" \
                if self.cfg.llm_layer < 0 else ""
            changes.append(f"llm layer: {rec.get('llm_layer')!r} then, {new['llm_layer']!r} now{hint}")
        old_groups = rec.get("groups") if isinstance(rec.get("groups"), dict) else {}
        for kind in ("llm", "clip", "vae"):
            was, now = old_groups.get(kind), new["groups"][kind]
            if not isinstance(was, dict):
                changes.append(f"{kind} group: not recorded then, {now['path']} now")
                continue
            if was.get("path") != now["path"]:
                how = "picked automatically" if now["picked"] == "auto" else f"given by --{kind}-group"
                changes.append(f"{kind} group: {was.get('path')} then, {now['path']} now ({how})")
            elif was.get("settings_hash") != now["settings_hash"]:
                ws = was.get("settings") if isinstance(was.get("settings"), dict) else {}
                diff = sorted(k for k in set(ws) | set(now["settings"]) if ws.get(k) != now["settings"].get(k))
                what = "; ".join(f"{k}: {ws.get(k)!r} then, {now['settings'].get(k)!r} now" for k in diff[:6])
                changes.append(f"{now['path']} was rewritten with other settings since the run began "
                               f"({what or 'settings hash ' + str(was.get('settings_hash')) + ' then, ' + now['settings_hash'] + ' now'})")
        return changes

    def _check_run_folder(self) -> list[str]:
        from dataclasses import MISSING

        out = self.out
        for folder in (out, *out.parents):  # a file where the run folder (or a folder above it) goes
            if folder.exists() or folder.is_symlink():
                if not folder.is_dir():
                    return [f"--out {out}: {folder} is a file, not a folder; choose another --out"]
                break
        saved = out / "config.json"
        if not saved.exists():
            if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
                return [f"{out} exists and is not a surpipe run folder (no config.json); choose another --out"]
            return []
        damaged = (f"; restore it, or choose another --out (deleting {out} starts the run over)")
        ck = self._ckpt_dir()
        if (ck.exists() or ck.is_symlink()) and not ck.is_dir():
            return [f"{ck} is not a folder (a run folder keeps its checkpoints there){damaged}"]
        try:
            old = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return [f"{saved} is damaged, not the JSON surpipe wrote ({e}){damaged}"]
        meta = old.pop("_surpipe", None) if isinstance(old, dict) else None
        if not isinstance(old, dict) or not isinstance(meta, dict):
            return [f"{saved} is damaged: it does not hold a surpipe training config (a JSON object with "
                    f"its _surpipe record){damaged}"]
        identity = {k: v for k, v in old.items() if k in IDENTITY_KEYS}
        new = self._settings()
        # a key missing from an older run folder holds its default (options added since keep it)
        defaults = {f.name: f.default for f in dataclasses.fields(self.cfg) if f.default is not MISSING}
        old = {k: v for k, v in old.items() if k not in RESUMABLE_CHANGES and k not in IDENTITY_KEYS}
        diff = sorted(k for k in set(old) | set(new) if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k)))
        problems = [f"run folder {out} was started with other settings ({k}: {old.get(k, defaults.get(k))!r} "
                    f"there, {new.get(k)!r} now); resume with the same settings or choose another --out"
                    for k in diff]
        changes = self._identity_changes(identity, meta)
        if changes:
            problems.append(f"run folder {out} was trained on other data than this run would read; a resume "
                            "must see the same store, groups and layer (restore them, or choose another --out "
                            "for a new run). Changed since the run began: " + "; ".join(changes))
        return problems

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
        self.accelerator = Accelerator(mixed_precision=mp, cpu=cpu, log_with=_log_with(cfg.report_to),
                                       project_dir=str(self.out))
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
        # names for the messages of the non-finite checks (the optimizer holds the same tensors)
        self.param_names = {id(p): f"adapter.{n}" for n, p in self.accelerator.unwrap_model(self.adapter).named_parameters()}
        self.param_names |= {id(p): f"projection.{n}"
                             for n, p in self.accelerator.unwrap_model(self.projection).named_parameters()}

        self.step = 0
        self.position = None
        self.out.mkdir(parents=True, exist_ok=True)
        if self.lock_held:  # only then can no live writer own a .tmp-step-* folder
            self.clean_stale_tmp()
        latest = self.latest_checkpoint()
        if latest is not None:
            self.load_checkpoint(latest)
        try:
            save(cfg, self.out / "config.json",
                 extra={"store_fingerprint": self.store.fingerprint, "run": self._run_identity()})
        except OSError as e:
            raise SurpipeError(self._write_failure("config.json", e)) from None

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
            mean = torch.where(fm, t["lat_flip_mean"].float(), mean)
            std = torch.where(fm, t["lat_flip_std"].float(), std)
        eps = torch.randn(mean.shape, generator=self.gen)
        latents = ((mean + std * eps) - self.shift_factor) * self.scaling_factor
        return {
            "latents": latents.to(dev),
            "clip_simple": t["clip_simple"].float().to(dev),
            "clip_complex": t["clip_complex"].float().to(dev),
            "llm": t["llm"].float().to(dev),
            # rows whose LLM vector is missing (zeros, matched=false) take no part in the LLM term
            "llm_mask": t["llm_matched"].bool().to(dev) if "llm_matched" in t else None,
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

        out, e, fc = _adapter_aux(self.adapter, b["clip_simple"])
        llm_loss = L.llm_loss(self.projection(b["llm"]), e, mask=b.get("llm_mask"))
        # prompt_target: the authors compared with fc(a) until 2023-11-29, with out since (method-decisions.md)
        prompt_loss = L.prompt_loss(b["clip_complex"], out if cfg.prompt_target == "out" else fc)
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
        self._init_trackers()
        logger = _RunLogger(self.out, start_step, self.accelerator)
        bar = progress_bar(total=cfg.max_steps, initial=self.step, unit="step",
                           desc="train", disable=not cfg.progress)
        if start_step:
            logger.log_text(f"resumed from step {start_step}")
        t_run = time.perf_counter()
        last = {}
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
        elapsed = time.perf_counter() - t_run
        summary = {"step": self.step, "steps_run": self.step - start_step, "seconds": round(elapsed, 2),
                   "final": last, "adapter": str(self.out / "adapter")}
        print(f"trained {self.step - start_step} steps in {elapsed:.1f}s "
              f"({(self.step - start_step) / max(elapsed, 1e-9):.2f} steps/s); last loss {last.get('loss', float('nan')):.5f}; "
              f"adapter: {self.out / 'adapter'}")
        return summary

    def _loop(self, stream, it, logger: "_RunLogger", bar) -> dict:
        """Steps until max_steps; stops with a SurpipeError (before anything is saved) on a
        non-finite loss, gradient or weight."""
        import torch

        cfg = self.cfg
        last: dict = {}
        skipped = 0  # consecutive optimizer steps skipped by the fp16 loss scaler
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
            # a non-finite term stops the run here, before the optimizer step: the weights and the
            # last checkpoint stay as they were
            bad = [k for k in ("denoise", "llm", "prompt", "loss") if not math.isfinite(sums[k])]
            if bad:
                what = "the total loss" if bad == ["loss"] else f"the {bad[0]} loss"
                self._stop_nonfinite(f"{what} is not finite ({sums[bad[0]]})")
            te = time.perf_counter()
            params = [p for p in self.optimizer.param_groups[0]["params"]]
            if self.accelerator.scaler is None:
                # checked before clipping, which would spread a NaN norm over every gradient; with
                # fp16 loss scaling overflows are expected (the scaler skips the step, lowers its scale)
                with_grad = [p for p in params if p.grad is not None]
                gnorms = torch._foreach_norm([p.grad for p in with_grad])
                if not bool(torch.stack([n.float() for n in gnorms]).isfinite().all()):
                    self._stop_nonfinite(f"the gradient is not finite in {self._nonfinite_names(with_grad, gnorms)}")
            grad_norm = float(self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
            self.optimizer.step()
            if getattr(self.optimizer, "step_was_skipped", False):
                skipped += 1
                if skipped >= 30:  # the scale fell by 2**30: the gradients overflow even unscaled
                    self._stop_nonfinite(f"the fp16 loss scaler skipped {skipped} steps in a row "
                                         "(non-finite gradients); try --mixed-precision bf16 or no")
            else:
                skipped = 0
            norms = torch._foreach_norm([p.detach() for p in params])
            if not bool(torch.stack([n.float() for n in norms]).isfinite().all()):
                self._stop_nonfinite(f"a weight became non-finite after the optimizer step in "
                                     f"{self._nonfinite_names(params, norms)}")
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
                grid = self.validate()
                if grid is not None:
                    logger.log_image("validation", grid, self.step)
        return last

    def _nonfinite_names(self, params, values) -> str:
        """The names (at most 5) of the ``params`` whose entry in ``values`` (a tensor or its norm)
        holds a NaN or an infinity."""
        import torch

        bad = [self.param_names.get(id(p), f"parameter {i}") for i, (p, t) in enumerate(zip(params, values))
               if not bool(torch.isfinite(t).all())]
        return ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") if bad else "(none found)"

    def _stop_nonfinite(self, what: str) -> None:
        latest = self.latest_checkpoint()
        kept = (f"the last good checkpoint {latest} is kept" if latest is not None
                else "no checkpoint had been written yet")
        raise SurpipeError(
            f"training stopped at step {self.step + 1}: {what}. Nothing of this step was saved and {kept}. "
            "Check the store (surpipe verify) and the options (learning_rate, loss weights, noise_offset, "
            "min_snr_gamma); a rerun resumes from the last checkpoint.")

    def _init_trackers(self) -> None:
        """Start the --report-to tracker (TensorBoard under OUT/tensorboard, or a W&B run)."""
        cfg = self.cfg
        if cfg.report_to == "none" and not self.accelerator.log_with:
            return
        from surpipe.config import to_dict

        # trackers take flat scalars: lists and None as text
        values = {k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v))
                  for k, v in to_dict(cfg).items()}
        project = "tensorboard" if cfg.report_to == "tensorboard" else "surpipe"
        try:
            self.accelerator.init_trackers(project, config=values,
                                           init_kwargs={"wandb": {"name": self.out.name, "dir": str(self.out)}})
        except Exception as e:  # e.g. wandb without a login: say so, no traceback
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            hint = " (run `wandb login`, or set WANDB_MODE=offline)" if cfg.report_to == "wandb" else ""
            raise SurpipeError(f"cannot start the {cfg.report_to} tracker: {first}{hint}") from None

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """The checkpoint folders (``step-<8 digits>``), oldest first. They appear by one atomic
        rename, so a damaged one (even without state.json) is reported at load, never skipped."""
        import re

        d = self._ckpt_dir()
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and p.is_dir())

    def latest_checkpoint(self) -> Optional[Path]:
        done = self.checkpoints()
        return done[-1] if done else None

    def clean_stale_tmp(self) -> list[Path]:
        """Delete the ``.tmp-step-*`` folders that killed runs left in the checkpoint folder (only
        those; call it only with the run folder's lock held, so no live writer owns one)."""
        d = self._ckpt_dir()
        if not d.is_dir():
            return []
        stale = [p for p in d.iterdir() if p.name.startswith(".tmp-step-") and p.is_dir() and not p.is_symlink()]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return stale

    def save_checkpoint(self) -> Path:
        """Adapter, projection, optimizer, LR schedule, step, RNG states and data position,
        written under a temporary name and renamed, then older checkpoints pruned.

        A failed write (full disk, I/O error) raises SurpipeError; the earlier checkpoints are kept."""
        import torch
        from safetensors.torch import save_file

        self._refuse_nonfinite_weights("checkpoint")
        final = self._ckpt_dir() / f"step-{self.step:08d}"
        tmp = self._ckpt_dir() / f".tmp-step-{self.step:08d}-{os.getpid()}"
        try:
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
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            raise SurpipeError(self._write_failure(f"checkpoint step-{self.step:08d}", e)) from None
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpts = sorted(p for p in self._ckpt_dir().iterdir() if p.name.startswith("step-"))
        for old in ckpts[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _write_failure(self, what: str, e: Exception) -> str:
        """The message of a failed write into the run folder: what failed, what is kept, what to do."""
        import errno as _errno

        full = getattr(e, "errno", None) == _errno.ENOSPC or "No space left" in str(e)
        why = "no space left on device" if full else f"write failed: {getattr(e, 'strerror', None) or e}"
        prev = self.latest_checkpoint()
        kept = (f"the previous checkpoint {prev.name} (step {prev.name[5:].lstrip('0') or 0}) is intact"
                if prev else "no earlier checkpoint exists")
        return (f"{why} while writing the {what} of run folder {self.out}; nothing of it was kept and {kept}. "
                f"{'Free space' if full else 'Fix the disk'}, then rerun the same command: it resumes from the "
                "latest checkpoint")

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint; a damaged one raises SurpipeError naming the file and the previous
        checkpoint (never a silent fall-back: deleting the damaged folder is the user's choice)."""
        try:
            self._load_checkpoint(path)
        except _Damaged as e:
            earlier = [p for p in self.checkpoints() if p.name < path.name]
            todo = (f"delete {path} to resume from the previous checkpoint {earlier[-1].name}" if earlier
                    else f"it is the only checkpoint: delete {path} to start the run over from step 0")
            raise SurpipeError(f"checkpoint {path} cannot be loaded, it is damaged: {e}; {todo}") from None
        print(f"resuming {self.out} from {path.name} (step {self.step})")

    def _load_checkpoint(self, path: Path) -> None:
        import torch

        from surpipe.safeload import load_torch_file

        # state.json first: cheap, and it says which step the rest must belong to
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Damaged(f"state.json is missing, unreadable or truncated ({e})") from None
        step, pos = (state.get("step"), state.get("position")) if isinstance(state, dict) else (None, None)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1 or f"step-{step:08d}" != path.name:
            raise _Damaged(f"state.json has step {step!r}, not the step of {path.name}")
        if not (isinstance(pos, dict) and set(pos) == {"epoch", "block_idx", "row_idx"}
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pos.values())
                and pos["block_idx"] <= self.store.num_blocks and pos["row_idx"] < self.store.block_rows):
            raise _Damaged(f"state.json has an invalid data position {pos!r}")

        # weights: shapes checked against this run's modules before any tensor is read
        adapter = self.accelerator.unwrap_model(self.adapter)
        try:
            acfg = json.loads((path / "adapter" / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Damaged(f"adapter/config.json is unreadable ({e})") from None
        if not isinstance(acfg, dict):
            raise _Damaged("adapter/config.json does not hold a JSON object")
        for k in ("width", "nhead", "dim_feedforward", "num_layers", "token_mixing", "adapter_weight"):
            if acfg.get(k) != getattr(adapter.config, k):
                raise _Damaged(f"adapter/config.json has {k} {acfg.get(k)!r} where this run's adapter has "
                               f"{getattr(adapter.config, k)!r}")
        _load_weights(adapter, path / "adapter" / "model.safetensors", "adapter/model.safetensors")
        _load_weights(self.accelerator.unwrap_model(self.projection), path / "projection.safetensors",
                      "projection.safetensors")

        # optimizer and schedule: read with weights_only (no pickled code runs), then checked
        try:
            opt = load_torch_file(path / "optimizer.pt", "optimizer state")
        except SurpipeError as e:
            raise _Damaged(str(e)) from None
        if not (isinstance(opt, dict) and isinstance(opt.get("optimizer"), dict)
                and isinstance(opt.get("lr_scheduler"), dict)):
            raise _Damaged("optimizer.pt does not hold an optimizer state (a dict with 'optimizer' and "
                           "'lr_scheduler')")
        try:
            self.optimizer.load_state_dict(opt["optimizer"])
            _check_optimizer(self.optimizer)
            self.lr_scheduler.load_state_dict(dict(opt["lr_scheduler"]))
            last = self.lr_scheduler.get_last_lr()
            if self.lr_scheduler.last_epoch != step or not all(
                    isinstance(x, (int, float)) and math.isfinite(x) for x in last):
                raise ValueError(f"the learning-rate schedule is at step {self.lr_scheduler.last_epoch!r}, "
                                 f"the checkpoint at {step}")
            if opt.get("scaler") and self.accelerator.scaler:
                self.accelerator.scaler.load_state_dict(opt["scaler"])
        except _Damaged:
            raise
        except Exception as e:  # torch raises ValueError, KeyError, TypeError ... for a wrong state
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise _Damaged(f"optimizer.pt does not match this run's optimizer ({first})") from None

        # RNG states
        try:
            from safetensors.torch import load_file

            rng = load_file(str(path / "rng.safetensors"))
        except Exception as e:
            raise _Damaged(f"rng.safetensors is unreadable ({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
        missing = [k for k in ("torch_cpu", "generator") if k not in rng]
        if missing:
            raise _Damaged(f"rng.safetensors lacks {', '.join(missing)}")
        try:
            torch.set_rng_state(rng["torch_cpu"])
            self.gen.set_state(rng["generator"])
            if "torch_cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["torch_cuda"])
        except Exception as e:
            raise _Damaged(f"rng.safetensors holds an invalid RNG state ({type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0]})") from None
        self.step = step
        self.position = pos

    def _final_adapter_stale(self) -> bool:
        """True when OUT/adapter is missing or older than the latest checkpoint."""
        from surpipe.adapter import WEIGHTS_NAME

        final = self.out / "adapter" / WEIGHTS_NAME
        latest = self.latest_checkpoint()
        if not final.is_file():
            return True
        return latest is not None and final.stat().st_mtime_ns < (latest / "state.json").stat().st_mtime_ns

    def _refuse_nonfinite_weights(self, what: str) -> None:
        """Never write a NaN/Inf adapter or projection: raise naming the tensors instead."""
        import torch

        bad = [f"{prefix}.{k}" for prefix, mod in (("adapter", self.adapter), ("projection", self.projection))
               for k, v in self.accelerator.unwrap_model(mod).state_dict().items()
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise SurpipeError(f"refusing to write a {what} of {self.out} at step {self.step}: non-finite "
                               f"values in {', '.join(bad[:5])}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))

    def save_final(self) -> None:
        """The final adapter in ``OUT/adapter`` (save_pretrained layout) and the projection."""
        self._refuse_nonfinite_weights("final adapter")
        tmp = self.out / ".tmp-adapter"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            self.accelerator.unwrap_model(self.adapter).save_pretrained(tmp)
            self.accelerator.unwrap_model(self.projection).save(tmp / "llm_projection.safetensors")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SurpipeError(self._write_failure("final adapter", e)) from None
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


class _Damaged(Exception):
    """A checkpoint file that is not what surpipe wrote (load_checkpoint words the message)."""


def _load_weights(module, path: Path, name: str) -> None:
    """Load a safetensors file into ``module`` strictly, checking names, shapes and finiteness
    before reading any tensor (a damaged header cannot make us allocate)."""
    import torch
    from safetensors import safe_open

    want = module.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if keys != set(want):
                extra, missing = sorted(keys - set(want)), sorted(set(want) - keys)
                raise _Damaged(f"{name} does not hold this run's tensors (unexpected {extra[:3]}, missing {missing[:3]})")
            for k in sorted(keys):
                shape = tuple(f.get_slice(k).get_shape())
                if shape != tuple(want[k].shape):
                    raise _Damaged(f"{name}: tensor {k} has shape {list(shape)}, this run's has {list(want[k].shape)}")
            tensors = {k: f.get_tensor(k) for k in keys}
    except _Damaged:
        raise
    except Exception as e:
        raise _Damaged(f"{name} is unreadable ({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise _Damaged(f"{name} holds non-finite values (in {', '.join(bad[:3])})")
    module.load_state_dict(tensors)


def _check_optimizer(optimizer) -> None:
    """Raise _Damaged when the loaded AdamW state does not fit its parameters (torch checks only the
    group sizes: a moment of another shape would fail at the next step)."""
    import torch

    for group in optimizer.param_groups:
        for k in ("lr", "eps", "weight_decay"):
            v = group.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _Damaged(f"optimizer.pt has an invalid {k} {v!r}")
        betas = group.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and math.isfinite(b) for b in betas)):
            raise _Damaged(f"optimizer.pt has invalid betas {betas!r}")
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    raise _Damaged(f"optimizer.pt: state {k!r} is a {type(v).__name__}, not a tensor")
                if k != "step" and tuple(v.shape) != tuple(p.shape):
                    raise _Damaged(f"optimizer.pt: state {k!r} has shape {list(v.shape)} for a parameter of "
                                   f"shape {list(p.shape)}")
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise _Damaged(f"optimizer.pt: state {k!r} holds non-finite values")


def _adapter_aux(adapter, x):
    """(out, e, fc(a)) of a possibly wrapped adapter: the wrapper's forward keeps autocast hooks."""
    return adapter(x, return_aux=True)


class _RunLogger:
    """metrics.jsonl (one JSON object per logged step) + a human train.log + the accelerate
    trackers of ``--report-to`` (TensorBoard, W&B), which also receive the validation grids."""

    def __init__(self, out: Path, start_step: int, accelerator=None):
        self.metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
        self.human = open(out / "train.log", "a", encoding="utf-8")
        self.accelerator = accelerator if accelerator is not None and accelerator.trackers else None
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
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in m.items() if k != "step" and isinstance(v, (int, float))},
                                 step=m["step"])

    def log_image(self, tag: str, png: Path, step: int) -> None:
        """Send a picture (the validation grid) to the trackers: TensorBoard add_image, W&B wandb.Image."""
        if self.accelerator is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png) as im:
            arr = np.asarray(im.convert("RGB"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, arr, global_step=step, dataformats="HWC")
                tracker.writer.flush()
            else:  # accelerate's W&B tracker wraps each array in a wandb.Image
                tracker.log_images({tag: [arr]}, step=step)

    def close(self) -> None:
        self.metrics.close()
        self.human.close()
        if self.accelerator is not None:
            self.accelerator.end_training()


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


def _smooth(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): ``s_i = w*s_{i-1} + (1-w)*v_i``
    from ``s_{-1} = 0``, divided by ``1 - w**(i+1)`` so the start is not pulled towards 0."""
    out, s = [], 0.0
    for i, v in enumerate(values):
        s = weight * s + (1.0 - weight) * v
        out.append(s / (1.0 - weight ** (i + 1)) if weight else s)
    return out


def _smoothing_weight(n: int) -> float:
    """An EMA weight averaging over about a tenth of ``n`` points (none for 10 points or fewer)."""
    return min(0.98, max(0.0, 1.0 - 10.0 / n)) if n else 0.0


def _loss_curve(metrics: Path, png: Path, note: Optional[str] = None) -> None:
    """The four loss terms per logged step (thin) with their smoothed line; ``note`` (e.g. that the
    models are random tiny ones) goes into the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    weight = _smoothing_weight(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6 if note else 3.2))
    for ax, key in zip(axes, ("loss", "denoise", "llm", "prompt")):
        vals = [r[key] for r in rows]
        ax.plot(steps, vals, lw=0.8, alpha=0.35, marker="." if len(rows) <= 200 else None, ms=3,
                color="tab:blue", label="per step")
        ax.plot(steps, _smooth(vals, weight), lw=1.8, color="tab:orange", label=f"EMA {weight:.2f}")
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    if note:
        fig.suptitle(note, color="red", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def run(cfg: TrainConfig) -> dict:
    """Check the setup, load the frozen UNet, train (or resume) and save the adapter.

    The run folder is locked while training: a second job on the same ``--out`` is refused.
    """
    from surpipe.locks import exclusive_lock

    recipe = TrainRecipe(cfg)
    recipe.check()  # every problem at once, before anything is written
    try:
        recipe.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SurpipeError(f"cannot create run folder {recipe.out}: {e.strerror or e}; choose another --out") from None
    with exclusive_lock(recipe.out / ".lock", f"run folder {recipe.out}"):
        recipe.lock_held = True
        recipe.setup()
        return recipe.train()
