"""``surpipe encode-latents``: stage one, Stable Diffusion side (SD 1.x/2.x and SDXL, told apart by
``model_index.json``).

Writes two feature groups of the store (layout: docs/store-format.md):

* ``clip/<name>``: the CLIP text encoder's last hidden state of the simple AND the complex prompt,
  [N, 77, D], exactly as ``StableDiffusionPipeline.encode_prompt`` feeds the UNet, plus each
  prompt's token count before truncation. For SDXL, what ``StableDiffusionXLPipeline.encode_prompt``
  feeds it: both encoders' penultimate states [N, 77, D1+D2] and the pooled embedding [N, P]
  (``surpipe.features.ClipXLFeatures``), and both tokenizers' counts.
* ``vae/<vae_name>`` (default ``<name>-<resolution>``): the VAE latent distribution (``mean``,
  ``std``) of each image resized and center-cropped to the resolution; with ``flip`` also of the
  horizontally flipped crop (``flip_mean``, ``flip_std``). For SDXL also each row's micro-conditioning
  (source size, crop offsets). ``vae`` replaces the model's VAE (e.g. an fp16-fixed SDXL VAE).

Each group is written by its own resumable block loop (``surpipe.store.blockjob.run_block_job``, shared
with extract-llm): data-parallel ranks (torchrun) take disjoint blocks, a rerun computes only the
blocks not yet done, a group written with other settings is refused unless ``overwrite``.
Only the tokenizer, the text encoder and the VAE are loaded; never the UNet.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from surpipe import config as cfgmod
from surpipe.config import opt
from surpipe.stage_one_options import StageOneCommon, option
from surpipe.data.image_loader import BlockFeeder, loader_error
from surpipe.errors import SurpipeError
from surpipe.store.sharding import default_shard_blocks
from surpipe.logs import get_logger

PARTS = ("clip", "vae")


@dataclass
class EncodeLatentsConfig(StageOneCommon):
    data: str = option("data")
    store: str = option("store")
    model: str = opt(help="Stable Diffusion 1.x/2.x or SDXL checkpoint: local diffusers folder or hub id",
                     group="model")
    vae: Optional[str] = opt(None, help="use this VAE instead of the model's: an AutoencoderKL folder or hub id, or "
                             "a model with vae/ (e.g. an fp16-fixed SDXL VAE)", group="model")
    resolution: Optional[int] = opt(None, help="image side in pixels [default: the model's, 512 for SD 1.5]",
                                    group="data", ge=8, le=8192)
    revision: Optional[str] = opt(None, help="hub revision (branch, tag or commit) of --model", group="model")
    variant: Optional[str] = opt(None, help='weight file variant, e.g. "fp16" (model.fp16.safetensors)',
                                 group="model")
    parts: list[str] = opt(help="what to encode: clip (text embeddings), vae (image latents), or both",
                           group="output", default_factory=lambda: ["clip", "vae"])
    name: Optional[str] = opt(None, help="group clip/<name> [default: the model's folder or repo name]",
                              group="output")
    vae_name: Optional[str] = opt(None, help="group vae/<vae_name> [default: <name>-<resolution>, with --vae "
                                  "<name>-<vae name>-<resolution>]", group="output")
    flip: bool = opt(False, help="also store the latents of the flipped crop (training can then random-flip)",
                     group="data")
    batch_size: int = opt(8, help="images per VAE forward", group="running", ge=1, le=65536)
    text_batch_size: int = opt(64, help="prompts per text-encoder forward", group="running", ge=1, le=65536)
    dtype: Literal["float32", "float16", "bfloat16"] = opt("float32", help="compute dtype of the encoders",
                                                           group="model")
    store_dtype: Literal["float16", "float32"] = opt("float16", help="dtype of the stored values", group="output")
    codec: Literal["zstd", "blosc-lz4", "gzip", "none"] = opt("zstd", help="compression of the stored arrays",
                                                              group="output")
    device: str = opt("auto", help="auto, cpu, cuda or cuda:<i> (auto: this rank's GPU if any)", group="running")
    workers: int = opt(2, help="image-decoding loader processes (0: decode in the main process)", group="running",
                       ge=0, le=256)
    loader_timeout: float = opt(300.0, help="seconds to wait for a batch from the loader workers before stopping "
                                "with a message", group="running", gt=0, le=86400)


def _validate(cfg: EncodeLatentsConfig) -> None:
    from surpipe.config import declared_problems

    problems = declared_problems(cfg)  # types and declared ranges, also for configs built in Python
    bad = [p for p in cfg.parts if p not in PARTS]
    if bad or not cfg.parts:
        problems.append(f"parts: {cfg.parts!r}; choose one or more of {', '.join(PARTS)}")
    if len(set(cfg.parts)) != len(cfg.parts):
        problems.append(f"parts: {cfg.parts!r} lists a part twice")
    from surpipe.devices import device_problem

    if device_problem(cfg.device):
        problems.append(device_problem(cfg.device))
    for k in ("name", "vae_name"):
        v = getattr(cfg, k)
        if v is not None:
            from surpipe.sd.components import sanitize_name

            if v != sanitize_name(v):
                problems.append(f"{k}: {v!r} is not a valid group name (letters, digits, '.', '_', '-'; "
                                f"e.g. {sanitize_name(v)!r})")
    if problems:
        raise SurpipeError("invalid encode-latents options:", problems)


log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


def _pending(store, path: str, settings: dict, overwrite: bool, env) -> list[int]:
    """Blocks this rank will compute (what run_block_job will do), so the loader can prefetch them."""
    import json

    from surpipe.store import FeatureGroup

    all_mine = [b for b in range(store.num_blocks) if b % env.world_size == env.rank]
    if overwrite or not store.has_group(path):
        return all_mine
    g = FeatureGroup(store, path)
    if g.settings != json.loads(json.dumps(settings, default=str)):
        return all_mine  # run_block_job refuses it
    return g.pending_blocks(env.rank, env.world_size)


# --------------------------------------------------------------------------- run


def _finish_group(store, path: str, cfg_dict: dict, report: dict, env) -> None:
    """Record the run's config and report in the group's attrs (kept from the run that wrote rows)."""
    if env.is_main and not report.get("already_complete"):
        g = store.root[path]
        g.attrs.update({"config": cfg_dict, "report": report})


def run(cfg: EncodeLatentsConfig) -> dict[str, Any]:
    """Encode the configured parts into the store; returns a report dict (also printed)."""
    from surpipe.store.location import apply_store_options

    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    from surpipe.sd import components as sd
    from surpipe.hub import check_model_source
    from surpipe.store.blockjob import dist_env, init_distributed
    from surpipe.devices import resolve_device
    from surpipe.store.opening import discard_new_store_on_error, open_store

    _validate(cfg)
    env = dist_env()
    device = resolve_device(cfg.device, env.local_rank)
    init_distributed(env, device)
    t_start = time.perf_counter()
    want_clip, want_vae = "clip" in cfg.parts, "vae" in cfg.parts

    # Fail on a bad model (unreachable hub id, broken folder, unsupported pipeline) before the
    # (slow) dataset scan and before any store is created.
    check_model_source(cfg.model)
    family = sd.check_pipeline_class(cfg.model, cfg.revision, accept=("sd", "sdxl"))
    if sd.is_local(cfg.model):
        from surpipe.sd.xl import TEXT_COMPONENTS

        text = list(TEXT_COMPONENTS if family == "sdxl" else TEXT_COMPONENTS[:2])
        sd.validate_folder(cfg.model, (text if want_clip else []) + (["vae"] if want_vae and not cfg.vae else []),
                           " (an SDXL checkpoint: model_index.json names StableDiffusionXLPipeline)"
                           if family == "sdxl" else "")
    if want_vae and cfg.vae:
        check_model_source(cfg.vae, "--vae", "VAE")
        sd.vae_subfolder(cfg.vae)  # a folder that is neither a VAE nor holds one: refused now
    ds, store = open_store(cfg.data, cfg.store, block_rows=cfg.block_rows, check_images=cfg.check_images,
                           images=want_vae, progress=cfg.progress, is_main=env.is_main,
                           simple_field=cfg.simple_field, complex_field=cfg.complex_field)
    with discard_new_store_on_error(store, env.is_main):
        return _encode(cfg, env, device, ds, store, t_start, family)


def _text_side(cfg: EncodeLatentsConfig, family: str, model_id: str, device: str):
    """(feature class, settings, encode(texts) -> (embeddings, pooled or None), count(texts) -> counts
    by tokenizer, loaded info) of the model's text side: SD's one encoder or SDXL's two."""
    from surpipe.sd import components as sd
    from surpipe.sd import xl as sdxl
    from surpipe.features import ClipFeatures, ClipXLFeatures

    ident = dict(model=model_id, revision=cfg.revision, variant=cfg.variant)
    if family == "sdxl":
        te = sdxl.load_text_encoders_xl(cfg.model, cfg.revision, cfg.dtype, device, variant=cfg.variant)
        hashes = {k: te.info[k] for k in te.info if k.removesuffix("_2") in
                  ("text_encoder_config_hash", "tokenizer_hash", "text_encoder_weights_sha256")}
        settings = ClipXLFeatures.settings(max_length=te.max_length, hidden_size=te.hidden_size,
                                           pooled_size=te.pooled_size, store_dtype=cfg.store_dtype, **ident,
                                           **hashes, dtype=cfg.dtype)
        return (ClipXLFeatures, settings,
                lambda texts: tuple(t.numpy() for t in sdxl.encode_prompts_xl(te, texts, device)),
                lambda texts: [sd.token_counts(t, texts) for t in te.tokenizers], te)
    te = sd.load_text_encoder(cfg.model, cfg.revision, cfg.dtype, device, variant=cfg.variant)
    settings = ClipFeatures.settings(
        max_length=te.max_length, hidden_size=te.hidden_size, store_dtype=cfg.store_dtype, **ident,
        text_encoder_config_hash=te.info["text_encoder_config_hash"], tokenizer_hash=te.info["tokenizer_hash"],
        text_encoder_weights_sha256=te.info["text_encoder_weights_sha256"],
        use_attention_mask=te.use_attention_mask, dtype=cfg.dtype)
    return (ClipFeatures, settings, lambda texts: (sd.encode_prompts(te, texts, device).numpy(), None),
            lambda texts: [sd.token_counts(te.tokenizer, texts)], te)


def _encode(cfg: EncodeLatentsConfig, env, device: str, ds, store, t_start: float, family: str = "sd"
            ) -> dict[str, Any]:
    import torch

    from surpipe.sd import components as sd
    from surpipe.features import VaeFeatures
    from surpipe.store.blockjob import barrier, run_block_job

    want_clip, want_vae = "clip" in cfg.parts, "vae" in cfg.parts
    if want_vae:
        keys = store.keys()
        if len(keys) != len(ds.samples) or any(k != s.key for k, s in zip(keys.tolist(), ds.samples)):
            raise SurpipeError(f"store {cfg.store}: keys do not match dataset {cfg.data} row by row")

    name = cfg.name or sd.model_basename(cfg.model)
    # Local paths are recorded absolute, so a resume from another directory matches the settings.
    model_id = str(Path(cfg.model).expanduser().resolve()) if sd.is_local(cfg.model) else cfg.model
    if sd.is_local(cfg.model) and cfg.revision:
        log.info(f"note: --revision {cfg.revision} is ignored for the local folder {cfg.model}")
    report: dict[str, Any] = {"store": str(cfg.store), "rows": store.num_samples, "device": device,
                              "world_size": env.world_size}
    base_prov = {"model": model_id, "revision": cfg.revision, "variant": cfg.variant, "device": device,
                 "world_size": env.world_size}
    from surpipe.store.location import canonical

    data_path = Path(cfg.data).expanduser()
    resolved = dataclasses.replace(cfg, name=name, overwrite=False, model=model_id,
                                   data=str(data_path.resolve()) if data_path.exists() else cfg.data,
                                   store=canonical(cfg.store))

    from surpipe.store.sidecar import config_file

    cfg_path = config_file(cfg.store, "encode-latents", name)

    def save_config() -> None:
        # Saved before each part starts (and completed once the resolution is known), so an
        # interrupted run can be repeated with --config too.
        if env.is_main:
            cfgmod.save(resolved, cfg_path)

    report["config_file"] = str(cfg_path)

    # ---- CLIP ----------------------------------------------------------------------------------
    if want_clip:
        log.info(f"loading tokenizer{'s + text encoders' if family == 'sdxl' else ' + text encoder'} "
                 f"from {cfg.model} ...")
        ClipFeatures, settings, encode, count, te = _text_side(cfg, family, model_id, device)
        L, D = te.max_length, te.hidden_size
        arrays = ClipFeatures.arrays(settings, cfg.codec)
        prompts = {w: store.prompts(w) for w in ClipFeatures.PROMPTS}
        counter = {"prompts": 0}

        def clip_block(start: int, stop: int) -> dict[str, np.ndarray]:
            embs, pooled, lens, lens_2 = {}, {}, {}, {}
            for w in ClipFeatures.PROMPTS:
                texts = [str(t) for t in prompts[w][start:stop]]
                outs = [encode(texts[i:i + cfg.text_batch_size]) for i in range(0, len(texts), cfg.text_batch_size)]
                embs[w] = np.concatenate([o[0] for o in outs])
                pooled[w] = None if outs[0][1] is None else np.concatenate([o[1] for o in outs])
                lens[w], *more = count(texts)
                lens_2[w] = more[0] if more else None
                counter["prompts"] += len(texts)
            return (ClipFeatures.block(embs, lens, pooled, lens_2) if family == "sdxl"
                    else ClipFeatures.block(embs, lens))

        path = f"clip/{name}"
        log.info(f"CLIP -> {path}: [{store.num_samples}, {L}, {D}] x 2 prompts ({cfg.dtype} compute, "
                f"{cfg.store_dtype} stored)")
        prov = {**base_prov, **te.info}
        save_config()
        res = run_block_job(store=store, kind="clip", name=name, settings=settings, arrays=arrays,
                            provenance=prov, overwrite=cfg.overwrite, env=env, compute_block=clip_block,
                            unit="row", desc=f"clip/{name}", stats=lambda: dict(counter), progress=cfg.progress,
                            shard_blocks=default_shard_blocks(cfg.store, cfg.shard_blocks))
        g = store.group(path)
        lens = ClipFeatures.token_lengths(g)
        done = g.done_mask()
        valid = np.zeros(store.num_samples, dtype=bool)
        for b in np.flatnonzero(done):
            s, e = store.block_range(int(b))
            valid[s:e] = True
        clip_report = {
            "group": path, "rows_done_now": res.rows_done_now, "already_complete": res.already_complete,
            "seconds": round(res.seconds, 2), "max_length": L, "hidden_size": D,
            "rows_complete": int(valid.sum()),
            "simple_truncated": int((lens["simple"][valid] > L).sum()),
            "complex_truncated": int((lens["complex"][valid] > L).sum()),
            "simple_max_tokens": int(lens["simple"][valid].max()) if valid.any() else 0,
            "complex_max_tokens": int(lens["complex"][valid].max()) if valid.any() else 0,
        }
        report["clip"] = clip_report
        if res.already_complete:
            log.info(f"{path}: nothing to do (all {store.num_blocks} blocks done)")
        log.info(f"{path}: {clip_report['complex_truncated']} of {clip_report['rows_complete']} complex and "
                f"{clip_report['simple_truncated']} simple prompts exceed {L} tokens and were truncated "
                f"(longest: complex {clip_report['complex_max_tokens']}, simple {clip_report['simple_max_tokens']})")
        _finish_group(store, path, cfgmod.to_dict(resolved), clip_report, env)
        del te
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    # ---- VAE -----------------------------------------------------------------------------------
    if want_vae:
        log.info(f"loading VAE encoder from {cfg.vae or cfg.model} ...")
        if cfg.vae:  # another VAE: its own folder or repo (no --revision/--variant: those are --model's)
            vae = sd.load_vae_encoder(cfg.vae, None, cfg.dtype, device, subfolder=sd.vae_subfolder(cfg.vae))
        else:
            vae = sd.load_vae_encoder(cfg.model, cfg.revision, cfg.dtype, device, variant=cfg.variant)
        R = cfg.resolution or sd.default_resolution(cfg.model, cfg.revision, vae)
        if R % vae.downsample:
            raise SurpipeError(f"resolution {R} is not a multiple of the VAE's downsampling factor {vae.downsample}")
        vae_name = cfg.vae_name or (f"{name}-{sd.model_basename(cfg.vae)}-{R}" if cfg.vae else f"{name}-{R}")
        micro = family == "sdxl"  # SDXL's added time ids need each row's source size and crop offsets
        vae_id = (str(Path(cfg.vae).expanduser().resolve()) if sd.is_local(cfg.vae) else cfg.vae) if cfg.vae else None
        resolved = dataclasses.replace(resolved, resolution=R, vae_name=vae_name)
        h = R // vae.downsample
        C = vae.latent_channels
        settings = VaeFeatures.settings(
            resolution=R, flip=cfg.flip, scaling_factor=vae.scaling_factor, shift_factor=vae.shift_factor,
            latent_channels=C, downsample_factor=vae.downsample, store_dtype=cfg.store_dtype,
            micro_conditioning=micro, model=model_id, revision=cfg.revision, variant=cfg.variant,
            **({"vae": vae_id} if vae_id else {}), vae_config_hash=vae.info["vae_config_hash"],
            vae_encoder_weights_sha256=vae.info["vae_encoder_weights_sha256"], dtype=cfg.dtype)
        arrays = VaeFeatures.arrays(settings, cfg.codec)
        path = f"vae/{vae_name}"
        pending = _pending(store, path, settings, cfg.overwrite, env)
        feeder = (BlockFeeder(ds.samples, store, pending, R, cfg.batch_size, cfg.workers, device.startswith("cuda"),
                               timeout=cfg.loader_timeout) if pending else None)
        counter = {"images": 0}

        def vae_block(start: int, stop: int) -> dict[str, np.ndarray]:
            from surpipe.sd.xl import micro_conditioning_rows

            parts: list[tuple] = []  # (mean, std) of the crops, then of the flipped crops
            sizes: list = []  # each source image's (width, height)
            for _, x, wh in feeder.rows(start, stop, sizes=True):
                n = x.shape[0]
                if cfg.flip:
                    x = torch.cat([x, torch.flip(x, dims=[-1])])
                mean, std = (t.numpy() for t in sd.encode_latent_dist(vae, x, device))
                parts.append((mean[:n], std[:n], mean[n:], std[n:]))
                sizes += wh
                counter["images"] += x.shape[0]
            cols = [np.concatenate(c) for c in zip(*parts)]
            flips = cols[2:] if cfg.flip else (None, None)
            return VaeFeatures.block(*cols[:2], *flips, *(micro_conditioning_rows(sizes, R) if micro else ()))

        log.info(f"VAE -> {path}: [{store.num_samples}, {C}, {h}, {h}] from {R}x{R} center crops"
                f"{' + flipped' if cfg.flip else ''} ({cfg.dtype} compute, {cfg.store_dtype} stored, "
                f"{cfg.workers} loader workers)")
        prov = {**base_prov, **vae.info}
        save_config()
        try:
            res = run_block_job(store=store, kind="vae", name=vae_name, settings=settings, arrays=arrays,
                                provenance=prov, overwrite=cfg.overwrite, env=env, compute_block=vae_block,
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
        vae_report = {"group": path, "rows_done_now": res.rows_done_now, "already_complete": res.already_complete,
                      "seconds": round(res.seconds, 2), "resolution": R, "latent_shape": [C, h, h],
                      "flip": cfg.flip,
                      "images_per_s": round(res.rows_done_now * (2 if cfg.flip else 1) / max(res.seconds, 1e-9), 2)}
        report["vae"] = vae_report
        _finish_group(store, path, cfgmod.to_dict(resolved), vae_report, env)

    report["seconds"] = round(time.perf_counter() - t_start, 2)
    barrier(env)
    log.info(f"encode-latents done in {report['seconds']} s; repeat with --config {cfg_path}")
    return report
