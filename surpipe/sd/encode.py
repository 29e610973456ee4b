"""encode-latents' work: the two store groups it writes (layout: docs/store-format.md).

* ``clip/<name>``: the text encoder's embeddings of the simple AND the complex prompt, as the
  pipeline feeds the UNet (SD's one encoder, SDXL's two plus the pooled embedding), and each
  prompt's token count before truncation (:func:`encode_clip`).
* ``vae/<vae_name>``: the VAE latent distribution of each image's center crop (and of its flip),
  images decoded in loader workers; for SDXL also each row's micro-conditioning (:func:`encode_vae`).

Each group is written by the resumable block loop (``surpipe.store.blockjob.run_block_job``).
The stage (``stages/encode_latents.py``) checks the options and the model (:func:`check_model`),
opens the store, and hands an :class:`EncodeJob` to these functions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from surpipe import config as cfgmod
from surpipe import sd  # the components through the package: tests replace sd.load_* there
from surpipe.data.image_loader import BlockFeeder, loader_error
from surpipe.errors import SurpipeError
from surpipe.hub import check_model_source
from surpipe.features import ClipFeatures, ClipXLFeatures, VaeFeatures, open_group
from surpipe.logs import get_logger
from surpipe.store import FeatureGroup
from surpipe.store.blockjob import DistEnv, run_block_job
from surpipe.store.sharding import default_shard_blocks

log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


@dataclass
class EncodeJob:
    """What both groups share: the options (``EncodeLatentsConfig``), where this rank runs, the store,
    and the names resolved from the options; ``resolved`` is what ``--config`` repeats."""

    cfg: Any
    env: DistEnv
    device: str
    store: Any  # FeatureStore
    family: str  # "sd" or "sdxl"
    name: str  # the clip/<name> group; vae/<name>-<resolution> by default
    model_id: str  # --model, a local folder made absolute (a resume from elsewhere matches)
    resolved: Any
    cfg_path: Path

    def provenance(self, info: dict) -> dict:
        """Provenance of a group: where and from what it was computed, plus the loaded part's ``info``."""
        cfg = self.cfg
        return {"model": self.model_id, "revision": cfg.revision, "variant": cfg.variant, "device": self.device,
                "world_size": self.env.world_size, **info}

    def save_config(self) -> None:
        """Save the resolved options before a part starts, so an interrupted run repeats with --config."""
        if self.env.is_main:
            cfgmod.save(self.resolved, self.cfg_path)

    def finish_group(self, path: str, report: dict) -> None:
        """Record the run's options and report in the group's attrs (kept from the run that wrote rows)."""
        if self.env.is_main and not report.get("already_complete"):
            self.store.root[path].attrs.update({"config": cfgmod.to_dict(self.resolved), "report": report})


def check_model(cfg, want_clip: bool, want_vae: bool) -> str:
    """encode-latents' checks of --model (and --vae), made before the (slow) dataset scan and before any
    store is created: an unreachable hub id, a broken folder or an unsupported pipeline is refused.
    Returns the family ("sd" or "sdxl")."""
    check_model_source(cfg.model)
    family = sd.check_pipeline_class(cfg.model, cfg.revision, accept=("sd", "sdxl"))
    if sd.is_local(cfg.model):
        text = list(sd.TEXT_COMPONENTS if family == "sdxl" else sd.TEXT_COMPONENTS[:2])
        sd.validate_folder(cfg.model, (text if want_clip else []) + (["vae"] if want_vae and not cfg.vae else []),
                           " (an SDXL checkpoint: model_index.json names StableDiffusionXLPipeline)"
                           if family == "sdxl" else "")
    if want_vae and cfg.vae:
        check_model_source(cfg.vae, "--vae", "VAE")
        sd.vae_subfolder(cfg.vae)  # a folder that is neither a VAE nor holds one: refused now
    return family


def local_id(model: str) -> str:
    """A model argument as recorded in settings: a local folder absolute, a hub id as given."""
    return str(Path(model).expanduser().resolve()) if sd.is_local(model) else model


def pending_blocks(store, path: str, settings: dict, overwrite: bool, env: DistEnv) -> list[int]:
    """Blocks this rank will compute (what run_block_job will do), so the loader can prefetch them."""
    all_mine = [b for b in range(store.num_blocks) if b % env.world_size == env.rank]
    if overwrite or not store.has_group(path):
        return all_mine
    g = FeatureGroup(store, path)
    if g.settings != json.loads(json.dumps(settings, default=str)):
        return all_mine  # run_block_job refuses it
    return g.pending_blocks(env.rank, env.world_size)


# --------------------------------------------------------------------------- clip/<name>


def text_side(job: EncodeJob):
    """(feature class, settings, encode(texts) -> (embeddings, pooled or None), count(texts) -> counts
    by tokenizer, loaded encoder(s)) of the model's text side: SD's one encoder or SDXL's two."""
    cfg, device = job.cfg, job.device
    ident = dict(model=job.model_id, revision=cfg.revision, variant=cfg.variant)
    if job.family == "sdxl":
        te = sd.load_text_encoders_xl(cfg.model, cfg.revision, cfg.dtype, device, variant=cfg.variant)
        hashes = {k: te.info[k] for k in te.info if k.removesuffix("_2") in
                  ("text_encoder_config_hash", "tokenizer_hash", "text_encoder_weights_sha256")}
        settings = ClipXLFeatures.settings(max_length=te.max_length, hidden_size=te.hidden_size,
                                           pooled_size=te.pooled_size, store_dtype=cfg.store_dtype, **ident,
                                           **hashes, dtype=cfg.dtype)
        return (ClipXLFeatures, settings,
                lambda texts: tuple(t.numpy() for t in sd.encode_prompts_xl(te, texts, device)),
                lambda texts: [sd.token_counts(t, texts) for t in te.tokenizers], te)
    te = sd.load_text_encoder(cfg.model, cfg.revision, cfg.dtype, device, variant=cfg.variant)
    settings = ClipFeatures.settings(
        max_length=te.max_length, hidden_size=te.hidden_size, store_dtype=cfg.store_dtype, **ident,
        text_encoder_config_hash=te.info["text_encoder_config_hash"], tokenizer_hash=te.info["tokenizer_hash"],
        text_encoder_weights_sha256=te.info["text_encoder_weights_sha256"],
        use_attention_mask=te.use_attention_mask, dtype=cfg.dtype)
    return (ClipFeatures, settings, lambda texts: (sd.encode_prompts(te, texts, device).numpy(), None),
            lambda texts: [sd.token_counts(te.tokenizer, texts)], te)


def _clip_block_fn(job: EncodeJob, features, encode: Callable, count: Callable, counter: dict):
    """compute_block(start, stop) of the clip group: both prompts' embeddings and token counts."""
    prompts = {w: job.store.prompts(w) for w in features.PROMPTS}
    batch = job.cfg.text_batch_size

    def clip_block(start: int, stop: int) -> dict[str, np.ndarray]:
        embs, pooled, lens, lens_2 = {}, {}, {}, {}
        for w in features.PROMPTS:
            texts = [str(t) for t in prompts[w][start:stop]]
            outs = [encode(texts[i:i + batch]) for i in range(0, len(texts), batch)]
            embs[w] = np.concatenate([o[0] for o in outs])
            pooled[w] = None if outs[0][1] is None else np.concatenate([o[1] for o in outs])
            lens[w], *more = count(texts)
            lens_2[w] = more[0] if more else None
            counter["prompts"] += len(texts)
        return (features.block(embs, lens, pooled, lens_2) if job.family == "sdxl"
                else features.block(embs, lens))
    return clip_block


def _clip_report(store, path: str, features, res, L: int, D: int) -> dict:
    """The clip group's report: rows complete, prompts truncated and the longest, by prompt."""
    g = open_group(store, path)
    lens = features.token_lengths(g)
    valid = np.zeros(store.num_samples, dtype=bool)
    for b in np.flatnonzero(g.done_mask()):
        s, e = store.block_range(int(b))
        valid[s:e] = True
    return {
        "group": path, "rows_done_now": res.rows_done_now, "already_complete": res.already_complete,
        "seconds": round(res.seconds, 2), "max_length": L, "hidden_size": D,
        "rows_complete": int(valid.sum()),
        "simple_truncated": int((lens["simple"][valid] > L).sum()),
        "complex_truncated": int((lens["complex"][valid] > L).sum()),
        "simple_max_tokens": int(lens["simple"][valid].max()) if valid.any() else 0,
        "complex_max_tokens": int(lens["complex"][valid].max()) if valid.any() else 0,
    }


def encode_clip(job: EncodeJob) -> dict:
    """Write group ``clip/<name>``: load the text side, encode every pending block; returns its report."""
    import torch  # heavy: keeps --help torch-free

    cfg, store, name = job.cfg, job.store, job.name
    log.info(f"loading tokenizer{'s + text encoders' if job.family == 'sdxl' else ' + text encoder'} "
             f"from {cfg.model} ...")
    features, settings, encode, count, te = text_side(job)
    L, D = te.max_length, te.hidden_size
    counter = {"prompts": 0}
    path = f"clip/{name}"
    log.info(f"CLIP -> {path}: [{store.num_samples}, {L}, {D}] x 2 prompts ({cfg.dtype} compute, "
             f"{cfg.store_dtype} stored)")
    job.save_config()
    res = run_block_job(store=store, kind="clip", name=name, settings=settings,
                        arrays=features.arrays(settings, cfg.codec), provenance=job.provenance(te.info),
                        overwrite=cfg.overwrite, env=job.env,
                        compute_block=_clip_block_fn(job, features, encode, count, counter),
                        unit="row", desc=f"clip/{name}", stats=lambda: dict(counter), progress=cfg.progress,
                        shard_blocks=default_shard_blocks(cfg.store, cfg.shard_blocks))
    report = _clip_report(store, path, features, res, L, D)
    if res.already_complete:
        log.info(f"{path}: nothing to do (all {store.num_blocks} blocks done)")
    log.info(f"{path}: {report['complex_truncated']} of {report['rows_complete']} complex and "
             f"{report['simple_truncated']} simple prompts exceed {L} tokens and were truncated "
             f"(longest: complex {report['complex_max_tokens']}, simple {report['simple_max_tokens']})")
    job.finish_group(path, report)
    del te
    if job.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return report


# --------------------------------------------------------------------------- vae/<vae_name>


def load_vae(job: EncodeJob):
    """The VAE encoder: --vae's own folder or repo (without --revision/--variant, which are --model's),
    else --model's vae/."""
    cfg = job.cfg
    log.info(f"loading VAE encoder from {cfg.vae or cfg.model} ...")
    if cfg.vae:
        return sd.load_vae_encoder(cfg.vae, None, cfg.dtype, job.device, subfolder=sd.vae_subfolder(cfg.vae))
    return sd.load_vae_encoder(cfg.model, cfg.revision, cfg.dtype, job.device, variant=cfg.variant)


def vae_settings(job: EncodeJob, vae, resolution: int) -> dict:
    """The vae group's settings: resolution, flip, the VAE's factors and identity, micro-conditioning."""
    cfg = job.cfg
    return VaeFeatures.settings(
        resolution=resolution, flip=cfg.flip, scaling_factor=vae.scaling_factor, shift_factor=vae.shift_factor,
        latent_channels=vae.latent_channels, downsample_factor=vae.downsample, store_dtype=cfg.store_dtype,
        micro_conditioning=job.family == "sdxl", model=job.model_id, revision=cfg.revision, variant=cfg.variant,
        **({"vae": local_id(cfg.vae)} if cfg.vae else {}), vae_config_hash=vae.info["vae_config_hash"],
        vae_encoder_weights_sha256=vae.info["vae_encoder_weights_sha256"], dtype=cfg.dtype)


def _vae_block_fn(job: EncodeJob, vae, feeder, resolution: int, counter: dict):
    """compute_block(start, stop) of the vae group: the crops' (and flips') mean and std, and for
    SDXL each row's source size and crop offsets (its added time ids)."""
    import torch  # heavy: keeps --help torch-free

    flip, micro = job.cfg.flip, job.family == "sdxl"

    def vae_block(start: int, stop: int) -> dict[str, np.ndarray]:
        parts: list[tuple] = []  # (mean, std) of the crops, then of the flipped crops
        sizes: list = []  # each source image's (width, height)
        for _, x, wh in feeder.rows(start, stop, sizes=True):
            n = x.shape[0]
            if flip:
                x = torch.cat([x, torch.flip(x, dims=[-1])])
            mean, std = (t.numpy() for t in sd.encode_latent_dist(vae, x, job.device))
            parts.append((mean[:n], std[:n], mean[n:], std[n:]))
            sizes += wh
            counter["images"] += x.shape[0]
        cols = [np.concatenate(c) for c in zip(*parts)]
        flips = cols[2:] if flip else (None, None)
        return VaeFeatures.block(*cols[:2], *flips, *(sd.micro_conditioning_rows(sizes, resolution) if micro else ()))
    return vae_block


def encode_vae(job: EncodeJob, ds) -> dict:
    """Write group ``vae/<vae_name>`` from dataset ``ds``'s images; returns its report. Fills the
    resolution and vae_name into ``job.resolved``."""
    cfg, store, device = job.cfg, job.store, job.device
    vae = load_vae(job)
    R = cfg.resolution or sd.default_resolution(cfg.model, cfg.revision, vae)
    if R % vae.downsample:
        raise SurpipeError(f"resolution {R} is not a multiple of the VAE's downsampling factor {vae.downsample}")
    vae_name = cfg.vae_name or (f"{job.name}-{sd.model_basename(cfg.vae)}-{R}" if cfg.vae else f"{job.name}-{R}")
    job.resolved = dataclasses.replace(job.resolved, resolution=R, vae_name=vae_name)
    h, C = R // vae.downsample, vae.latent_channels
    settings = vae_settings(job, vae, R)
    path = f"vae/{vae_name}"
    pending = pending_blocks(store, path, settings, cfg.overwrite, job.env)
    feeder = (BlockFeeder(ds.samples, store, pending, R, cfg.batch_size, cfg.workers, device.startswith("cuda"),
                          timeout=cfg.loader_timeout) if pending else None)
    counter = {"images": 0}
    log.info(f"VAE -> {path}: [{store.num_samples}, {C}, {h}, {h}] from {R}x{R} center crops"
             f"{' + flipped' if cfg.flip else ''} ({cfg.dtype} compute, {cfg.store_dtype} stored, "
             f"{cfg.workers} loader workers)")
    job.save_config()
    try:
        res = run_block_job(store=store, kind="vae", name=vae_name, settings=settings,
                            arrays=VaeFeatures.arrays(settings, cfg.codec), provenance=job.provenance(vae.info),
                            overwrite=cfg.overwrite, env=job.env,
                            compute_block=_vae_block_fn(job, vae, feeder, R, counter),
                            unit="img", desc=path, stats=lambda: dict(counter), progress=cfg.progress,
                            shard_blocks=default_shard_blocks(cfg.store, cfg.shard_blocks))
    except RuntimeError as e:
        err = loader_error(e, cfg.workers, cfg.loader_timeout)
        if err is None:
            raise
        raise err from None
    finally:
        if feeder is not None:
            feeder.close()
    if res.already_complete:
        log.info(f"{path}: nothing to do (all {store.num_blocks} blocks done)")
    report = {"group": path, "rows_done_now": res.rows_done_now, "already_complete": res.already_complete,
              "seconds": round(res.seconds, 2), "resolution": R, "latent_shape": [C, h, h], "flip": cfg.flip,
              "images_per_s": round(res.rows_done_now * (2 if cfg.flip else 1) / max(res.seconds, 1e-9), 2)}
    job.finish_group(path, report)
    return report
