"""The one table of options several commands share: how a command reaches ``--store`` (every
command that takes one), the training reader's local cache, the options both stage-one commands
take, and those generate and eval share. One help text and one range each, so ``--help`` and the
checks cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from surpipe.config import Config, opt

_OPTIONS = {
    "data": dict(help="SURD imagefolder, folder of .tar shards or brace pattern of shards", group="data"),
    "store": dict(help="feature store (Zarr) to create or extend: a folder or an fsspec URL (s3://bucket/x.zarr)",
                  group="output"),
    "storage_options": dict(default=None, help="JSON object of fsspec options for a --store URL (endpoint_url, "
                                               "profile, ...; credentials better from the environment)",
                            group="data"),
    "cache_dir": dict(default=None, help="Local cache of a remote store's chunks (default: "
                                         "~/.cache/surpipe/store-cache).", group="data"),
    "cache_gb": dict(default=20.0, help="Size cap of that cache in GB, least recently used evicted (0: no cache).",
                     group="data", ge=0, le=1 << 20),
    "block_rows": dict(default=None, help="rows per block when this run creates the store [default: 256]",
                       group="output", ge=1, le=1 << 20),
    # auto = full decode when this run creates the store (its rows are fixed then, and encode-latents
    # must be able to decode every one), header check (then full if the row sets differ) otherwise
    "check_images": dict(default="auto", help="image check when opening the dataset (auto: full decode when "
                                              "creating the store)", group="data"),
    "simple_field": dict(default="text", help="metadata field holding the simple prompt (imagefolder)",
                         group="data"),
    "complex_field": dict(default="prompt", help="metadata field holding the complex prompt (imagefolder)",
                          group="data"),
    "shard_blocks": dict(default=None, help="blocks per stored object (zarr sharding) of the groups this run "
                                            "creates; default 1 for a folder, 4 for an object-store URL",
                         group="output", ge=1, le=4096),
    "overwrite": dict(default=False, help="replace groups written with other settings (their values are lost)",
                      group="output"),
    "progress": dict(default=True, help="show progress bars", group="running"),
    # generate and eval
    "model": dict(help="Stable Diffusion model: a diffusers folder or hub id (the one the adapter was trained "
                       "for).", group="model"),
    "adapter": dict(help="Training run folder (uses RUN/adapter) or adapter folder (config.json + "
                         "model.safetensors).", group="model"),
    "adapter_weight": dict(default=None, help="Override the adapter's mixing weight in [0, 1] (0 = no adapter "
                                              "effect).", group="model", ge=0.0, le=1.0),
    "revision": dict(default=None, help="Hub revision (branch, tag or commit) of --model.", group="model"),
    "negative_prompt": dict(default="", help="Negative prompt for every image (also passed through the adapter).",
                            group="inference"),
    "steps": dict(default=30, help="Denoising steps per image.", group="inference", ge=1, le=1000),
    "guidance": dict(default=7.5, help="Classifier-free guidance scale (1 = no guidance).", group="inference",
                     ge=0.0, le=100.0),
    "size": dict(default=None, help="Image side in pixels, a multiple of 8 (default: the model's, 512 for SD 1.5).",
                 group="inference", ge=8, le=4096),
    "scheduler": dict(default="default", help="Sampler; default: the model's own scheduler.", group="inference"),
    "batch_size": dict(default=4, help="Images rendered together (lower it if memory runs out).", group="running",
                       ge=1, le=1024),
    "dtype": dict(default="auto", help="Pipeline dtype; auto: float16 on CUDA, float32 otherwise.", group="running"),
    "device": dict(default="auto", help="Device: auto | cpu | cuda | cuda:I | mps.", group="running"),
}


def option(name: str, **override):
    """The config field ``name`` as every command declares it (``override``: e.g. another help group)."""
    return opt(**{**_OPTIONS[name], **override})


@dataclass(kw_only=True)
class StoreAccess(Config):
    """How a command reaches its ``--store`` (a folder or an fsspec URL): the fsspec options."""

    storage_options: Optional[str] = option("storage_options")


@dataclass(kw_only=True)
class StoreCache(StoreAccess):
    """A reader of a remote store that keeps a bounded local copy of the chunks it fetched."""

    cache_dir: Optional[str] = option("cache_dir")
    cache_gb: float = option("cache_gb")


@dataclass(kw_only=True)
class StageOneCommon(StoreAccess):
    """The fields both stage-one configs end with (keyword-only, so each config keeps its own
    required fields first)."""

    block_rows: Optional[int] = option("block_rows")
    shard_blocks: Optional[int] = option("shard_blocks")
    check_images: Literal["auto", "full", "header", "none"] = option("check_images")
    simple_field: str = option("simple_field")
    complex_field: str = option("complex_field")
    overwrite: bool = option("overwrite")
    progress: bool = option("progress")
