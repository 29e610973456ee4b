"""Feature-store I/O: bytes and codecs on real activations, dtype error, loader throughput, loader RAM.

    python bench/store_io.py [--quick] --out FILE.json [--models tiny,mid] [--cache DIR]

* bytes per sample per array and compression ratio + read speed by codec (zstd, blosc-lz4, gzip,
  none), float16, on REAL activations: the bundled sample's prompts and images through CLIP text
  encoders, VAE encoders and a small LLaMA (random weights, built offline; see bench/_common.py).
  Every chunk holds distinct rows (chunk = number of distinct rows, at most 64), so repeats never
  inflate the ratios.
* float16 vs bfloat16 storage error of the same arrays (relative RMS and max error against float32).
* training-loader throughput (``SampleStream`` over ``BlockReader``, one epoch) with 0, 1, 2
  DataLoader workers, by store block size (16, 64, 256 rows) and by codec.
* peak RSS of a loader process that reads a whole epoch from a store of N rows and of 10 N rows
  (a separate process per store, ``resource.getrusage`` ru_maxrss).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402

import _common as C  # noqa: E402

QUICK = dict(models=("tiny",), rows={"tiny": 64, "mid": 8}, loader_rows=512, batch=4, workers=(0, 1, 2),
             block_rows=(16, 64, 256), loader_codecs=("zstd", "blosc-lz4", "none"), rss_rows=(512, 5120))
FULL = dict(models=("tiny", "mid"), rows={"tiny": None, "mid": None}, loader_rows=4096, batch=4, workers=(0, 1, 2),
            block_rows=(16, 64, 256), loader_codecs=("zstd", "blosc-lz4", "gzip", "none"), rss_rows=(2048, 20480))

ARRAYS = ("llm", "clip_simple", "clip_complex", "lat_mean", "lat_std", "flip_mean", "flip_std")


def codec_table(act: C.Activations, tmp: Path, codecs=("zstd", "blosc-lz4", "gzip", "none")) -> dict:
    import zarr

    from surpipe.store import _codecs

    out = {}
    for name in ARRAYS:
        data = getattr(act, name).astype(np.float16)
        n = data.shape[0]
        chunk = min(64, n)
        raw = data.nbytes
        row = {"row_shape": list(data.shape[1:]), "rows": n, "raw_bytes_per_sample": raw // n, "codecs": {}}
        for codec in codecs:
            d = tmp / f"{name}-{codec}.zarr"
            arr = zarr.create_array(str(d), shape=data.shape, dtype=data.dtype, chunks=(chunk, *data.shape[1:]),
                                    compressors=_codecs(codec), fill_value=0)
            arr[:] = data
            stored = C.dir_bytes(d)
            a = zarr.open_array(str(d), mode="r")
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.2:
                for s in range(0, n, chunk):
                    a[s:s + chunk]
                reps += 1
            t_read = (time.perf_counter() - t0) / reps
            row["codecs"][codec] = {"bytes_per_sample": round(stored / n, 1), "ratio": round(raw / stored, 3),
                                    "read_MB_s": round(raw / 1e6 / t_read, 1)}
            shutil.rmtree(d)
        out[name] = row
    return out


def dtype_error(act: C.Activations) -> dict:
    import torch

    out = {}
    for name in ARRAYS:
        x = torch.from_numpy(getattr(act, name).astype(np.float32))
        row = {"max_abs": round(float(x.abs().max()), 4)}
        for dt in ("float16", "bfloat16"):
            y = x.to(getattr(torch, dt)).float()
            err = (y - x)
            row[dt] = {"rel_rms": float(err.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()),
                       "max_abs_err": float(err.abs().max())}
        row["bf16_over_fp16_rel_rms"] = round(row["bfloat16"]["rel_rms"] / max(row["float16"]["rel_rms"], 1e-30), 2)
        out[name] = row
    return out


def loader_rate(store: Path, res: int, batch: int, workers: int, block_rows: int, epochs: int = 1) -> dict:
    from surpipe.train_data import BlockReader, SampleStream

    reader = BlockReader(str(store), C.store_groups(res), block_rows)
    stream = SampleStream(reader, batch, seed=0, workers=workers)
    n = reader.num_rows * epochs // batch
    it = iter(stream)
    t0 = time.perf_counter()
    first = None
    for i in range(n):
        next(it)
        if i == 0:
            first = time.perf_counter() - t0
    el = time.perf_counter() - t0
    return {"samples_per_s": round(n * batch / el, 1), "first_batch_s": round(first, 4), "samples": n * batch}


_RSS_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
import _common as C
from surpipe.train_data import BlockReader, SampleStream
store, res, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reader = BlockReader(store, C.store_groups(res), int(sys.argv[5]))
it = iter(SampleStream(reader, batch, seed=0, workers=0))
t0 = time.perf_counter()
for _ in range(reader.num_rows // batch):
    next(it)
print(json.dumps({"rss_before_MB": base / 1024, "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": reader.num_rows, "seconds": time.perf_counter() - t0}))
"""


def rss(store: Path, res: int, batch: int, block_rows: int) -> dict:
    p = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(store), str(res), str(batch),
                        str(Path(__file__).resolve().parent), str(block_rows)],
                       capture_output=True, text=True, check=True)
    d = json.loads(p.stdout.strip().splitlines()[-1])
    d["store_MB_on_disk"] = round(C.dir_bytes(store) / 1e6, 1)
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in d.items()}


def run(quick: bool = True, models=None, cache: Path | None = None, **over) -> dict:
    with C.bench_run(quick, QUICK, FULL, over, "surpipe-bench-io-", models, cache) as (p, models, tmp, cache, res):
        res.update(codecs={}, dtype_error={})
        acts = {}
        for kind in models:
            _, act = C.cached_model_and_activations(kind, cache, p["rows"].get(kind))
            acts[kind] = act
            tab = codec_table(act, tmp)
            per = {c: round(sum(a["codecs"][c]["bytes_per_sample"] for a in tab.values()), 1)
                   for c in next(iter(tab.values()))["codecs"]}
            res["codecs"][kind] = {"arrays": tab, "total_bytes_per_sample": per}
            res["dtype_error"][kind] = dtype_error(act)
        # the loader, on the tiny model's activations (the loader's cost is per block and per byte)
        act = acts[models[0]]
        r = act.resolution
        B = p["batch"]
        loader = {"model": models[0], "rows": p["loader_rows"], "batch": B, "workers": {}, "block_rows": {},
                  "codec": {}}
        st = C.write_store(tmp / "loader-64-zstd.zarr", act, p["loader_rows"], block_rows=64)
        for w in p["workers"]:
            loader["workers"][str(w)] = loader_rate(st, r, B, w, 64)
        for br in p["block_rows"]:
            s2 = st if br == 64 else C.write_store(tmp / f"loader-{br}.zarr", act, p["loader_rows"], block_rows=br)
            loader["block_rows"][str(br)] = loader_rate(s2, r, B, 0, br)
        for codec in p["loader_codecs"]:
            s3 = st if codec == "zstd" else C.write_store(tmp / f"loader-{codec}.zarr", act, p["loader_rows"],
                                                          block_rows=64, codec=codec)
            loader["codec"][codec] = loader_rate(s3, r, B, 0, 64)
        res["loader"] = loader
        # peak RSS of a loader process as the store grows 10x
        rs = {}
        for n in p["rss_rows"]:
            s4 = C.write_store(tmp / f"rss-{n}.zarr", act, n, block_rows=64)
            rs[str(n)] = rss(s4, r, B, 64)
            shutil.rmtree(s4, ignore_errors=True)
        a, b = (rs[str(n)] for n in p["rss_rows"])
        rs["store_growth"] = round(b["store_MB_on_disk"] / a["store_MB_on_disk"], 2)
        rs["peak_rss_growth_MB"] = round(b["peak_rss_MB"] - a["peak_rss_MB"], 1)
        res["rss"] = rs
    return res


def summary(d: dict) -> list[tuple[str, str]]:
    rows = []
    for kind, c in d["codecs"].items():
        t = c["total_bytes_per_sample"]
        rows.append((f"store {kind}: bytes/sample fp16 none/zstd/lz4/gzip",
                     f"{t['none']:.0f} / {t['zstd']:.0f} / {t['blosc-lz4']:.0f} / {t['gzip']:.0f}"))
        e = d["dtype_error"][kind]
        rows.append((f"store {kind}: bf16/fp16 rel-RMS error (clip, latent mean)",
                     f"{e['clip_simple']['bf16_over_fp16_rel_rms']}x, {e['lat_mean']['bf16_over_fp16_rel_rms']}x"))
    lo = d["loader"]
    rows.append(("loader samples/s workers 0/1/2",
                 " / ".join(str(v["samples_per_s"]) for v in lo["workers"].values())))
    rows.append(("loader samples/s block rows " + "/".join(lo["block_rows"]),
                 " / ".join(str(v["samples_per_s"]) for v in lo["block_rows"].values())))
    rows.append(("loader samples/s codec " + "/".join(lo["codec"]),
                 " / ".join(str(v["samples_per_s"]) for v in lo["codec"].values())))
    rs = d["rss"]
    ns = [k for k in rs if k.isdigit()]
    rows.append((f"loader peak RSS MB, store {ns[0]} -> {ns[1]} rows",
                 f"{rs[ns[0]]['peak_rss_MB']} -> {rs[ns[1]]['peak_rss_MB']} (store x{rs['store_growth']})"))
    return rows


def main(argv=None) -> int:
    return C.model_bench_main(argv, __doc__, "store_io.py", run, summary)


if __name__ == "__main__":
    sys.exit(main())
