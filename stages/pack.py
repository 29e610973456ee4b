"""``surpipe pack SRC OUT``: a SURD imagefolder -> webdataset .tar shards, plus a report.

Writes ``OUT/shard-000000.tar`` ..., ``OUT/pack_report.json`` (what was read, kept and skipped,
with line numbers and reasons, the shard list and the dataset fingerprint) and
``OUT/pack_config.json`` (this config, to repeat the run). All of it is written into a hidden
sibling folder and published with one rename, so OUT is either absent, the previous pack, or the
complete new one, never a part (a killed pack's leftover is removed by the next pack).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

from surpipe import config as cfgmod
from surpipe.config import Config, opt
from surpipe.data import open_dataset
from surpipe.data.images import DEFAULT_MAX_PIXELS
from surpipe.data.shards import check_out_folder, write_shards
from surpipe.data.surd import DEFAULT_COMPLEX_FIELD, DEFAULT_SIMPLE_FIELD
from surpipe.errors import SurpipeError


@dataclass
class PackConfig(Config):
    src: str = opt(help="SURD imagefolder (a folder with metadata.jsonl), or shards to repack.",
                   group="data", argument=True)
    out: str = opt(help="Output folder for the .tar shards; published in one step when complete.",
                   group="output", argument=True)
    samples_per_shard: int = opt(1000, help="Samples per .tar shard.", group="output", ge=1, le=10_000_000)
    strict: bool = opt(False, help="Stop at the first bad row or damaged shard instead of skipping and counting it.",
                       group="data")
    overwrite: bool = opt(False, help="Replace a previous pack in OUT (only pack's own files may be there).",
                          group="output")
    check_images: Literal["full", "header", "none"] = opt(
        "full", help="Image check while scanning: full decodes every image, header reads headers only.", group="data")
    max_pixels: int = opt(DEFAULT_MAX_PIXELS, help="Refuse images with more pixels, checked before decoding.",
                          group="data", ge=1)
    simple_field: str = opt(DEFAULT_SIMPLE_FIELD, help="Metadata field holding the SIMPLE prompt "
                            "(stored as 'text' in the shards).", group="data")
    complex_field: str = opt(DEFAULT_COMPLEX_FIELD, help="Metadata field holding the COMPLEX prompt "
                             "(stored as 'prompt' in the shards).", group="data")
    progress: bool = opt(True, help="Show progress bars.", group="running")


def run(cfg: PackConfig) -> dict:
    """Pack ``cfg.src`` into shards in ``cfg.out``; print and return the report.

    OUT appears complete (shards, report, config) in one step, or not at all.
    """
    if cfg.samples_per_shard < 1:
        raise SurpipeError(f"--samples-per-shard must be at least 1, not {cfg.samples_per_shard}")
    src_real, out_real = os.path.realpath(cfg.src), os.path.realpath(cfg.out)
    if src_real == out_real:
        raise SurpipeError(f"OUT must differ from SRC ({cfg.out})")
    check_out_folder(out_real, cfg.overwrite)  # refuse before the (possibly long) scan

    ds = open_dataset(cfg.src, strict=cfg.strict, check_images=cfg.check_images,
                      max_pixels=cfg.max_pixels, progress=cfg.progress,
                      simple_field=cfg.simple_field, complex_field=cfg.complex_field)
    report = {
        "source": cfg.src,
        "out": cfg.out,
        "num_samples": len(ds),
        "samples_per_shard": cfg.samples_per_shard,
        "shards": [],
        "fingerprint": ds.fingerprint(),
        "scan": ds.report.to_dict(),
    }

    def add_report(folder: str, shard_names: list[str]) -> None:
        # written inside the unpublished folder, so a published pack always has its report
        report["shards"] = shard_names
        path = os.path.join(folder, "pack_report.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")
        cfgmod.save(cfg, os.path.join(folder, "pack_config.json"))

    shards = write_shards(ds, cfg.out, samples_per_shard=cfg.samples_per_shard,
                          overwrite=cfg.overwrite, progress=cfg.progress, extra=add_report)
    path = os.path.join(cfg.out, "pack_report.json")
    print(ds.report.summary())
    print(f"wrote {len(ds)} samples into {len(shards)} shard(s) in {cfg.out} "
          f"(fingerprint {report['fingerprint'][:16]}...); report: {path}")
    return report
