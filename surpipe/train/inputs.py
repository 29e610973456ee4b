"""What a training run reads before any compute, checked at once: the store, its resolved groups,
the UNet and scheduler configs, the shapes and latent parameters. ``gather`` reports every problem
together; ``TrainingInputs`` holds the result that ``TrainRecipe.setup`` needs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.features import LLMFeatures, VaeFeatures, clip_features, open_group
from surpipe.hub import read_model_config
from surpipe.sd import check_pipeline_class
from surpipe.store import FeatureStore
from surpipe.train.groups import resolve_groups
from surpipe.train.validation.split import held_out_rows, split_record


@dataclass(frozen=True)
class TrainingInputs:
    """The checked inputs of one training run (returned by ``TrainRecipe.check``)."""

    store: Any  # surpipe.store.FeatureStore
    groups: Any  # surpipe.train.groups.StoreGroups: llm/clip/vae group paths, resolved llm_layer, use_flip
    unet_config: dict
    sched_config: dict
    seq_len: int  # CLIP tokens (77)
    width: int  # CLIP embedding width = the UNet's cross_attention_dim
    llm_size: int  # width of the LLM layer fed to the LLM-alignment loss
    latent_shape: tuple  # (channels, height, width) of the stored VAE latents
    scaling_factor: float
    shift_factor: float
    prediction_type: str  # epsilon or v_prediction
    held_out: Any = None  # sorted row indices of the validation rows (numpy int64; empty: no split)
    split: Optional[dict] = None  # surpipe.train.validation.split.split_record of the split, recorded in the run folder
    resolution: Optional[int] = None  # pixels of the stored latents' square crops (SDXL's target size)
    pooled_width: Optional[int] = None  # SDXL: width of the pooled text embedding (None: SD 1.x/2.x)


def _model_configs(cfg, problems: list[str]) -> tuple[Optional[dict], Optional[dict]]:
    """The UNet and scheduler configs of ``cfg.model`` (None where unreadable, the problem noted)."""
    unet_cfg = sched_cfg = None
    family = None
    try:
        family = check_pipeline_class(cfg.model, cfg.revision, accept=("sd", "sdxl"))  # others: refused by name
        unet_cfg = read_model_config(cfg.model, "unet", cfg.revision)
        sched_cfg = read_model_config(cfg.model, "scheduler", cfg.revision)
    except SurpipeError as e:
        problems.append(str(e))
    if unet_cfg is not None and family is not None:
        # a folder whose model_index.json and UNet disagree is damaged or mislabelled: never guess
        text_time = unet_cfg.get("addition_embed_type") == "text_time"
        if (family == "sdxl") != text_time:
            named = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
            problems.append(f"{cfg.model}: model_index.json names {named} but its UNet is "
                            f"{'SDXL' if text_time else 'an SD 1.x/2.x'} UNet (addition_embed_type "
                            f"{unet_cfg.get('addition_embed_type')!r}); fix model_index.json or give the right folder")
            unet_cfg = None
    if unet_cfg is not None and (unet_cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel"
                                 or "cross_attention_dim" not in unet_cfg):
        problems.append(f"{cfg.model}: unet/config.json is not a Stable Diffusion UNet (_class_name "
                        f"{unet_cfg.get('_class_name')!r}, model_type {unet_cfg.get('model_type')!r}); "
                        "give a diffusers Stable Diffusion folder or hub id")
        unet_cfg = None
    return unet_cfg, sched_cfg


def _split(cfg, store, found: dict, problems: list[str]) -> None:
    """The held-out validation rows of ``--val-rows``/``--val-fraction`` (chosen from the sample
    keys, surpipe.train.validation.split.held_out_rows) and their record, into ``found``."""
    rows, fraction, seed = cfg.val_rows, cfg.val_fraction, cfg.val_seed
    try:
        keys = store.keys() if (rows or fraction) else np.zeros(0, dtype=object)
        held = held_out_rows(keys, rows=rows, fraction=fraction, seed=seed)
    except SurpipeError as e:
        problems.append(str(e))
        return
    found["held_out"] = held
    found["split"] = split_record(keys, held, rows=rows, fraction=fraction, seed=seed, keep_best=cfg.keep_best)


def gather(cfg) -> tuple[dict, list[str]]:
    """Read and check everything ``cfg`` (a TrainConfig) trains on. Returns the fields of
    ``TrainingInputs`` found (possibly partial) and every problem, without raising."""
    problems: list[str] = []
    found: dict = {"store": None, "groups": None}
    try:
        found["store"] = store = FeatureStore(cfg.store)
    except SurpipeError as e:
        problems.append(str(e))
        store = None
    if store is not None:
        _split(cfg, store, found, problems)
    unet_cfg, sched_cfg = _model_configs(cfg, problems)
    found["unet_config"] = unet_cfg
    g = None
    if store is not None:
        # read after the UNet config: among several CLIP/VAE groups, the one that fits --model is picked
        g, gp = resolve_groups(store, llm_layer=cfg.llm_layer, llm_group=cfg.llm_group, clip_group=cfg.clip_group,
                               vae_group=cfg.vae_group, use_flip=cfg.flip, model=cfg.model, revision=cfg.revision,
                               unet_config=unet_cfg)
        found["groups"] = g
        problems += gp
    clip = open_group(store, g.clip_group) if g is not None and g.clip_group else None
    shape = clip_features(clip.settings).embedding_shape(clip) if clip is not None else None
    if shape is not None:
        found["seq_len"], found["width"] = seq_len, width = shape
        if unet_cfg is not None:
            cad = unet_cfg.get("cross_attention_dim")
            if isinstance(cad, (list, tuple)):
                cad = cad[0]
            if cad != width:
                problems.append(f"width mismatch: the store's CLIP embeddings are {width} wide but "
                                f"the UNet of {cfg.model} expects cross_attention_dim {cad}; "
                                "use the SD model whose text encoder made the store")
        if width % cfg.nhead:
            problems.append(f"nhead {cfg.nhead} does not divide the embedding width {width}")
    size = LLMFeatures.width(open_group(store, g.llm_group), g.llm_layer) if g is not None and g.llm_group else None
    if size is not None:  # g.llm_layer: --llm-layer -1 resolved
        found["llm_size"] = size
    lat = VaeFeatures.latent_params(open_group(store, g.vae_group)) if g is not None and g.vae_group else None
    if lat is not None:
        found["latent_shape"] = lat.shape
        if lat.scaling_factor is None:
            problems.append(f"{g.vae_group} does not record the VAE scaling_factor")
        found["scaling_factor"] = 1.0 if lat.scaling_factor is None else lat.scaling_factor
        found["shift_factor"] = lat.shift_factor
        if unet_cfg is not None and unet_cfg.get("in_channels") != lat.shape[0]:
            problems.append(f"latent channels mismatch: store {lat.shape[0]}, "
                            f"UNet in_channels {unet_cfg.get('in_channels')}")
        if unet_cfg is not None and not cfg.allow_other_vae:
            problems += _other_vae(cfg, g.vae_group, lat)
    if g is not None and clip is not None and g.vae_group:
        _sdxl(cfg, clip, open_group(store, g.vae_group), unet_cfg, found, problems)
    if sched_cfg is not None:
        pt = cfg.prediction_type or sched_cfg.get("prediction_type", "epsilon")
        if pt not in ("epsilon", "v_prediction"):
            problems.append(f"prediction type {pt!r} is not supported; valid choices: epsilon, v_prediction")
        found["prediction_type"] = pt
        found["sched_config"] = sched_cfg
    return found, problems


def _other_vae(cfg, group: str, lat) -> list[str]:
    """A latent group made by a VAE whose latent space is not that of ``cfg.model``'s VAE (another
    scaling factor, shift or channel count, e.g. SDXL's VAE, 0.13025, under an SD 1.5 UNet, 0.18215):
    the frozen UNet only knows its own VAE's latents, so training on these silently learns the
    wrong thing (as a text-encoder group must match the model: store_groups.clip_matcher). Only
    the numbers that define the latent space are compared, not the VAE's config hash: a fine-tuned
    VAE given to encode-latents with --vae (sd-vae-ft-mse for SD 1.5) shares the latent space."""
    try:
        vae = read_model_config(cfg.model, "vae", cfg.revision)
        want = {"scaling_factor": float(vae.get("scaling_factor", 0.18215)),  # diffusers' defaults
                "shift_factor": float(vae.get("shift_factor") or 0.0),
                "latent_channels": int(vae.get("latent_channels", 4))}
    except (SurpipeError, TypeError, ValueError):
        return []  # no readable vae/ (a UNet-only folder): nothing to compare with
    have = {"scaling_factor": lat.scaling_factor, "shift_factor": lat.shift_factor, "latent_channels": lat.shape[0]}
    diff = [f"{k} {have[k]} there, {want[k]} in {cfg.model}'s VAE" for k in want
            if have[k] is not None and not math.isclose(have[k], want[k], rel_tol=1e-6)]
    if not diff:
        return []
    return [f"{group} holds latents of another VAE than the model's ({'; '.join(diff)}): the UNet would "
            "train on latents it was never trained with; use a VAE group encoded for this model (surpipe "
            f"encode-latents --model {cfg.model}), or train with --allow-other-vae if you mean it"]


def _sdxl(cfg, clip, vae, unet_cfg: Optional[dict], found: dict, problems: list[str]) -> None:
    """SDXL's extra inputs (the pooled width, the training resolution) and their agreement with the
    UNet: a text_time UNet needs the pooled embeddings and the micro-conditioning, and takes
    6 time ids plus the pooled width; an SD 1.x/2.x UNet takes neither."""
    found["resolution"] = vae.settings.get("resolution")
    kind = clip_features(clip.settings)
    pooled = kind.pooled_size(clip) if hasattr(kind, "pooled_size") else None
    found["pooled_width"] = pooled
    if unet_cfg is None:
        return
    text_time = unet_cfg.get("addition_embed_type") == "text_time"
    if text_time and (pooled is None or not VaeFeatures.has_micro_conditioning(vae)):
        what = "pooled embeddings" if pooled is None else "micro-conditioning (original sizes, crops)"
        problems.append(f"the UNet of {cfg.model} is SDXL's (text_time conditioning) but the store has no SDXL "
                        f"{what}: run encode-latents with this SDXL model")
    elif not text_time and pooled is not None:
        problems.append(f"the store holds SDXL embeddings but the UNet of {cfg.model} is not SDXL's; "
                        "train with the SDXL model whose text encoders made the store")
    elif text_time:
        want = unet_cfg.get("projection_class_embeddings_input_dim")
        have = 6 * int(unet_cfg.get("addition_time_embed_dim") or 0) + pooled
        if want != have:
            problems.append(f"the UNet of {cfg.model} takes {want} added-conditioning values, the store's pooled "
                            f"embeddings give {have} (6 time ids x {unet_cfg.get('addition_time_embed_dim')} + "
                            f"{pooled}); use the SDXL model whose text encoders made the store")
        if not isinstance(found["resolution"], int):
            problems.append(f"{vae.path if hasattr(vae, 'path') else 'the VAE group'} does not record its resolution")
