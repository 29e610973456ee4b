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

The work is ``surpipe.sd.encode``'s. Each group is written by its own resumable block loop (``surpipe.store.blockjob.run_block_job``, shared
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

from surpipe import sd
from surpipe.config import opt
from surpipe.devices import device_problem, resolve_device
from surpipe.errors import SurpipeError
from surpipe.logs import get_logger
from surpipe.sd.encode import EncodeJob, check_model, encode_clip, encode_vae, local_id
from surpipe.options import StageOneCommon, option
from surpipe.store.blockjob import barrier, dist_env, init_distributed
from surpipe.store.location import apply_store_options, canonical
from surpipe.store.opening import discard_new_store_on_error, open_store
from surpipe.store.sidecar import config_file

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

    def problems(self) -> list[str]:
        """Declared types and ranges, then parts, device and group names."""
        problems = super().problems()
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            problems.append(f"parts: {self.parts!r}; choose one or more of {', '.join(PARTS)}")
        if len(set(self.parts)) != len(self.parts):
            problems.append(f"parts: {self.parts!r} lists a part twice")
        if device_problem(self.device):
            problems.append(device_problem(self.device))
        for k in ("name", "vae_name"):
            v = getattr(self, k)
            if v is not None and v != sd.sanitize_name(v):
                problems.append(f"{k}: {v!r} is not a valid group name (letters, digits, '.', '_', '-'; "
                                f"e.g. {sd.sanitize_name(v)!r})")
        return problems


log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


def run(cfg: EncodeLatentsConfig) -> dict[str, Any]:
    """Encode the configured parts into the store; returns a report dict (also printed)."""
    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    cfg.raise_problems("invalid encode-latents options:")
    env = dist_env()
    device = resolve_device(cfg.device, env.local_rank)
    init_distributed(env, device)
    t_start = time.perf_counter()
    want_clip, want_vae = "clip" in cfg.parts, "vae" in cfg.parts
    family = check_model(cfg, want_clip, want_vae)  # before the (slow) dataset scan and any store
    ds, store = open_store(cfg.data, cfg.store, block_rows=cfg.block_rows, check_images=cfg.check_images,
                           images=want_vae, progress=cfg.progress, is_main=env.is_main,
                           simple_field=cfg.simple_field, complex_field=cfg.complex_field)
    with discard_new_store_on_error(store, env.is_main):
        return _encode(cfg, env, device, ds, store, t_start, family)


def _encode(cfg: EncodeLatentsConfig, env, device: str, ds, store, t_start: float, family: str = "sd"
            ) -> dict[str, Any]:
    if "vae" in cfg.parts:
        keys = store.keys()
        if len(keys) != len(ds.samples) or any(k != s.key for k, s in zip(keys.tolist(), ds.samples)):
            raise SurpipeError(f"store {cfg.store}: keys do not match dataset {cfg.data} row by row")
    name = cfg.name or sd.model_basename(cfg.model)
    model_id = local_id(cfg.model)  # recorded absolute, so a resume from another directory matches
    if sd.is_local(cfg.model) and cfg.revision:
        log.info(f"note: --revision {cfg.revision} is ignored for the local folder {cfg.model}")
    data_path = Path(cfg.data).expanduser()
    resolved = dataclasses.replace(cfg, name=name, overwrite=False, model=model_id,
                                   data=str(data_path.resolve()) if data_path.exists() else cfg.data,
                                   store=canonical(cfg.store))
    job = EncodeJob(cfg, env, device, store, family, name, model_id, resolved,
                    config_file(cfg.store, "encode-latents", name))
    report: dict[str, Any] = {"store": str(cfg.store), "rows": store.num_samples, "device": device,
                              "world_size": env.world_size, "config_file": str(job.cfg_path)}
    if "clip" in cfg.parts:
        report["clip"] = encode_clip(job)
    if "vae" in cfg.parts:
        report["vae"] = encode_vae(job, ds)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    barrier(env)
    log.info(f"encode-latents done in {report['seconds']} s; repeat with --config {job.cfg_path}")
    return report
