"""``surpipe pack SRC OUT``: a SURD imagefolder -> webdataset .tar shards, plus a report.

Writes ``OUT/shard-000000.tar`` ..., ``OUT/pack_report.json`` (what was read, kept and skipped,
with line numbers and reasons, the shard list and the dataset fingerprint) and
``OUT/pack_config.json`` (this config, to repeat the run).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

from surpipe.data.images import DEFAULT_MAX_PIXELS
from surpipe.errors import SurpipeError


@dataclass
class PackConfig:
    src: str
    out: str
    samples_per_shard: int = 1000
    strict: bool = False
    overwrite: bool = False
    check_images: Literal["full", "header", "none"] = "full"
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True


def run(cfg: PackConfig) -> dict:
    """Pack ``cfg.src`` into shards in ``cfg.out``; print and return the report."""
    from surpipe import config as cfgmod
    from surpipe.data import open_dataset
    from surpipe.data.shards import existing_shards, write_shards

    if cfg.samples_per_shard < 1:
        raise SurpipeError(f"--samples-per-shard must be at least 1, not {cfg.samples_per_shard}")
    src_real, out_real = os.path.realpath(cfg.src), os.path.realpath(cfg.out)
    if src_real == out_real:
        raise SurpipeError(f"OUT must differ from SRC ({cfg.out})")
    old = existing_shards(cfg.out)
    if old and not cfg.overwrite:  # refuse before the (possibly long) scan
        raise SurpipeError(f"{cfg.out} already holds {len(old)} shards ({old[0]} ...); "
                           "pass --overwrite to replace them, or choose another folder")

    ds = open_dataset(cfg.src, strict=cfg.strict, check_images=cfg.check_images,
                      max_pixels=cfg.max_pixels, progress=cfg.progress)
    shards = write_shards(ds, cfg.out, samples_per_shard=cfg.samples_per_shard,
                          overwrite=cfg.overwrite, progress=cfg.progress)
    report = {
        "source": cfg.src,
        "out": cfg.out,
        "num_samples": len(ds),
        "samples_per_shard": cfg.samples_per_shard,
        "shards": [os.path.basename(s) for s in shards],
        "fingerprint": ds.fingerprint(),
        "scan": ds.report.to_dict(),
    }
    path = os.path.join(cfg.out, "pack_report.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    cfgmod.save(cfg, os.path.join(cfg.out, "pack_config.json"))
    print(ds.report.summary())
    print(f"wrote {len(ds)} samples into {len(shards)} shard(s) in {cfg.out} "
          f"(fingerprint {report['fingerprint'][:16]}...); report: {path}")
    return report
