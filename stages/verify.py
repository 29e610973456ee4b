"""``surpipe verify STORE [--repair] [--json]``: check a whole feature store against its contract.

    surpipe verify runs/demo/store.zarr
    surpipe verify runs/demo/store.zarr --repair   # mark damaged blocks incomplete, then rerun the stage

Exit status 0 when the store is sound (incomplete blocks are warnings: a stage has not finished),
1 with the list of problems (array, block, rows, chunk) otherwise. ``--repair`` recomputes nothing:
it sets ``done[b] = False`` for every done block with a damaged (checksum mismatch), missing or
non-finite chunk, or one completed by another generation of its group, so
rerunning the stage that wrote the group redoes exactly those blocks. The checks live in
``surpipe.store.verify``.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass

from surpipe.config import opt
from surpipe.errors import SurpipeError
from surpipe.options import StoreAccess
from surpipe.store.location import apply_store_options
from surpipe.features import RULES
from surpipe.store.verify import verify_store


@dataclass
class VerifyConfig(StoreAccess):
    store: str = opt(help="Feature store (Zarr) to check: a folder or an fsspec URL (s3://...).", group="data", argument=True)
    repair: bool = opt(False, help="Mark damaged blocks incomplete (done=false) so rerunning the stage "
                       "redoes only them; recomputes nothing.", group="running")
    json: bool = opt(False, help="Print the report as JSON.", group="output")


def run(cfg: VerifyConfig) -> dict:
    """Verify (and with ``repair`` mark damaged blocks incomplete); raise SurpipeError listing every
    problem left, so the CLI exits 1. Returns the report as a dict."""
    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    rep = verify_store(cfg.store, repair=cfg.repair, rules=RULES)
    out = rep.to_dict()
    if cfg.json:
        print(_json.dumps(out, indent=2, ensure_ascii=False))
    else:
        n = rep.num_samples
        sums = "UNCHECKED (no checksums on some arrays)" if rep.unchecked else "crc32c checksums verified"
        print(f"verify {rep.path}: format {rep.format if rep.format is not None else '?'}, "
              f"{n if n is not None else '?'} samples, {len(rep.groups)} feature groups, "
              f"{rep.chunks_read} chunks read in {rep.seconds:.2f} s, {sums}")
        for path, g in rep.groups.items():
            state = "complete" if not g["incomplete_blocks"] else "INCOMPLETE"
            print(f"  {path}: {g['blocks_done']}/{g['num_blocks']} blocks done ({state}), "
                  f"{len(g['arrays'])} arrays")
        for r in rep.repaired:
            print(f"  repaired (block marked incomplete): {r}")
        for w in rep.warnings:
            print(f"  warning: {w}")
        if rep.repaired:
            groups = sorted({r.group for r in rep.repaired})
            print(f"  {len(rep.repaired)} damaged block(s) in {', '.join(groups)} marked incomplete; "
                  "rerun the stage that wrote them to recompute only those blocks")
        if rep.sound:
            print("  OK: no problems" + (" (some blocks are incomplete)" if rep.warnings else ""))
    if not rep.sound:
        msg = f"store {rep.path} has {len(rep.problems)} problem(s)"
        if any(p.block is not None for p in rep.problems) and not cfg.repair:
            msg += "; `surpipe verify --repair` marks the damaged blocks incomplete for a rerun"
        raise SurpipeError(msg + ":", [str(p) for p in rep.problems])
    return out
