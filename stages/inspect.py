"""``surpipe inspect STORE``: describe a feature store.

    surpipe inspect runs/sample.zarr            # one line per group
    surpipe inspect runs/sample.zarr --full     # settings, arrays, codecs, provenance
    surpipe inspect runs/sample.zarr --json     # everything, machine-readable
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from surpipe.config import opt
from surpipe.errors import SurpipeError
from surpipe.features import open_group
from surpipe.options import StoreAccess
from surpipe.store import FeatureStore, describe_codecs, has_checksums
from surpipe.store.core import ROW_ARRAYS
from surpipe.store.location import apply_store_options


@dataclass
class InspectConfig(StoreAccess):
    store: str = opt(help="Feature store (Zarr) to describe: a folder or an fsspec URL (s3://...).", group="data", argument=True)
    full: bool = opt(False, help="Print every group's settings, arrays, codecs and provenance.", group="output")
    json: bool = opt(False, help="Print the whole description as JSON.", group="output")


def describe(store) -> dict:
    """A JSON-ready description of ``store``: groups, arrays, completion and provenance."""
    root = store.root
    unchecked = [n for n in ROW_ARRAYS if not has_checksums(root[n])]
    out = {
        "path": str(store.path),
        "format": root.attrs.get("surpipe_format"),
        "num_samples": store.num_samples,
        "block_rows": store.block_rows,
        "num_blocks": store.num_blocks,
        "dataset_fingerprint": store.fingerprint,
        "dataset_source": root.attrs.get("dataset_source"),
        "checksums": None,
        "groups": [],
    }
    for path in store.group_paths():
        g = open_group(store, path)
        arrays = []
        for name in g.array_names:
            a = g.array(name)
            if not has_checksums(a):
                unchecked.append(f"{path}/{name}")
            nbytes = int(a.nbytes_stored()) if hasattr(a, "nbytes_stored") else None
            arrays.append({
                "name": name, "shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks),
                "codecs": describe_codecs(a), "bytes_stored": nbytes,
                "ratio": round(a.nbytes / nbytes, 3) if nbytes else None,
            })
        mask = g.done_mask()
        out["groups"].append({
            "path": path,
            "complete_blocks": int(mask.sum()),
            "num_blocks": int(mask.size),
            "incomplete_blocks": np.flatnonzero(~mask).tolist()[:50],
            "shard_blocks": g.shard_blocks,
            "settings": g.settings,
            "provenance": g.attrs.get("provenance", {}),
            "arrays": arrays,
        })
    # format-1 stores (and arrays rewritten with plain zarr) have no crc32c: say so, never imply checked
    out["checksums"] = "crc32c" if not unchecked else "UNCHECKED (no checksums: " + ", ".join(unchecked[:6]) + \
        (" ..." if len(unchecked) > 6 else "") + ")"
    return out


def _fmt_bytes(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def run(cfg: InspectConfig) -> dict:
    """Describe the store (one line per group, ``--full`` or ``--json``); returns the description."""
    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    store = FeatureStore(cfg.store)
    try:
        info = describe(store)
    except SurpipeError:
        raise
    except Exception as e:  # garbage metadata zarr chokes on: one message, not a traceback
        raise store.damaged("a feature group", e) from None
    if cfg.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return info
    print(f"store {info['path']}  (surpipe format {info['format']}, checksums: {info['checksums']})")
    print(f"  samples {info['num_samples']}  in {info['num_blocks']} blocks of {info['block_rows']} rows")
    print(f"  dataset {info['dataset_source']}  fingerprint {info['dataset_fingerprint'][:16]}")
    if not info["groups"]:
        print("  no feature groups yet")
    if not cfg.full:
        for g in info["groups"]:
            state = "complete" if g["complete_blocks"] == g["num_blocks"] else "INCOMPLETE"
            stored = sum(a["bytes_stored"] or 0 for a in g["arrays"])
            shapes = ", ".join(f"{a['name']} {'x'.join(map(str, a['shape'][1:])) or '-'}" for a in g["arrays"][:4])
            more = f", +{len(g['arrays']) - 4} more" if len(g["arrays"]) > 4 else ""
            print(f"  {g['path']:<28} {g['complete_blocks']}/{g['num_blocks']} blocks {state:<10} "
                  f"{_fmt_bytes(stored):>10}  [{shapes}{more}]")
        if info["groups"]:
            print("  (--full for settings, arrays and provenance; --json for everything)")
        return info
    for g in info["groups"]:
        state = "complete" if g["complete_blocks"] == g["num_blocks"] else "INCOMPLETE"
        shards = f", {g['shard_blocks']} blocks per stored object" if g["shard_blocks"] > 1 else ""
        print(f"\n  {g['path']}: {g['complete_blocks']}/{g['num_blocks']} blocks done ({state}){shards}")
        if g["incomplete_blocks"] and state != "complete":
            print(f"    pending blocks: {g['incomplete_blocks']}")
        for k, v in g["settings"].items():
            print(f"    {k}: {json.dumps(v, ensure_ascii=False, default=str)}")
        for a in g["arrays"]:
            ratio = f"x{a['ratio']}" if a["ratio"] else ""
            print(f"    - {a['name']:<24} {str(tuple(a['shape'])):<20} {a['dtype']:<8} chunks {tuple(a['chunks'])} "
                  f"{a['codecs']} {_fmt_bytes(a['bytes_stored'])} {ratio}")
        prov = g["provenance"]
        if prov:
            libs = prov.get("library_versions", {})
            other = {k: v for k, v in prov.items() if k != "library_versions"}
            for k, v in other.items():
                print(f"    provenance {k}: {json.dumps(v, ensure_ascii=False, default=str)}")
            print("    libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items()))
    return info
