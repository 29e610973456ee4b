"""Feature-store I/O: bytes and codecs on real activations, dtype error, loader throughput, loader RAM.

    python bench/store_io.py [--quick] --out FILE.json [--models tiny,mid] [--cache DIR]
    python bench/store_io.py --real-widths [--quick] --out FILE.json [--cache DIR]
    python bench/store_io.py --s3 [--tiny] --out FILE.json [--cache DIR]

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
* ``--real-widths`` (only this): bytes per sample (fp16; zstd and none) at SD 1.5's sizes (CLIP
  [77, 768] x 2, latents 4x64x64 mean/std/flip mean/flip std) and LLM features 4096 and 5120 wide,
  and the loader's samples/s with 0/1/2 workers against the rate bench/cost_model.py predicts for
  one GPU step from the store (``run_real``), and the train loop's data-wait share against an
  emulated GPU running that step at 35% MFU, with read-ahead and with the blocking copies it
  replaced (``data_wait``).
* ``--s3`` (only this): the loader over the same store (SD 1.5 widths, LLM 5120) in a local folder
  and on a local S3 server (moto, 127.0.0.1) unsharded and 4 blocks per object, through the read-through
  chunk cache: samples/s and remote GETs/bytes of epoch 1 (cold cache) and epoch 2 (warm), workers 0
  and 2, and the data-wait share against the predicted GPU step (``run_s3``).
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


def codec_table(act: C.Activations, tmp: Path, codecs=("zstd", "blosc-lz4", "gzip", "none"),
                names=ARRAYS) -> dict:
    import zarr

    from surpipe.store import _codecs

    out = {}
    for name in names:
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
    from surpipe.train.data import BlockReader, SampleStream

    reader = BlockReader(str(store), C.store_groups(res), block_rows)
    stream = SampleStream(reader, batch, seed=0, workers=workers)
    n = reader.num_rows * epochs // batch
    el, first = _time_batches(iter(stream), n)
    return {"samples_per_s": round(n * batch / el, 1), "first_batch_s": round(first, 4), "samples": n * batch}


def _time_batches(it, n: int) -> tuple[float, float]:
    """(seconds for ``n`` batches of ``it``, seconds to the first one)."""
    t0 = time.perf_counter()
    first = None
    for i in range(n):
        next(it)
        if i == 0:
            first = time.perf_counter() - t0
    return time.perf_counter() - t0, first


class _EmulatedGPU:
    """A stand-in for a GPU's queue: a thread runs each queued step for ``step_s`` (sleeping, so
    the host's cores stay free, as they are while a GPU computes) and records its busy time."""

    def __init__(self, step_s: float):
        import queue
        import threading

        self.step_s, self.busy = step_s, 0.0
        self._q: "queue.Queue" = queue.Queue()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while self._q.get() is not None:
            t = time.perf_counter()
            time.sleep(self.step_s)
            self.busy += time.perf_counter() - t
            self._q.task_done()
        self._q.task_done()

    def launch(self):  # queue a step and return at once, as a kernel launch does
        self._q.put(1)

    def wait(self):  # a host sync: wait until every queued step has run
        self._q.join()

    def close(self):
        self._q.put(None)
        self._q.join()


def data_wait(store: Path, res: int, batch: int, workers: int, block_rows: int, step_s: float, steps: int,
              read_ahead: bool, sync_every: int = 10) -> dict:
    """The share of an emulated GPU's time spent idle for want of data, over ``steps`` steps of
    ``step_s`` from the store, with the train loop's real batch work on the host: SampleStream reads
    (``workers`` loader processes), ``stage_batch`` and ``complete_batch`` (the latent draws).
    ``read_ahead``: today's loop (surpipe.train.prefetch: the next batch is read and staged while the
    step runs; the host waits only at sync points, every ``sync_every`` steps). Otherwise the loop
    before it: each batch's copies to the GPU waited for the queued steps (a copy from pageable memory
    is a host sync), so reading and drawing the next batch could not overlap the step."""
    import types

    import torch

    from surpipe.train.data import BlockReader, SampleStream
    from surpipe.train.prefetch import DevicePrefetcher
    from surpipe.train.setup import complete_batch, stage_batch

    groups = C.store_groups(res)
    inputs = types.SimpleNamespace(groups=groups, scaling_factor=0.18215, shift_factor=0.0, resolution=res)
    gen = torch.Generator().manual_seed(0)
    stream = SampleStream(BlockReader(str(store), groups, block_rows), batch, seed=0, workers=workers)
    data = DevicePrefetcher(stream, lambda b: stage_batch(b, "cpu"), "cpu")
    complete_batch(next(data).staged, inputs, "cpu", gen)  # loader workers started, first block read
    gpu = _EmulatedGPU(step_s)
    t0 = time.perf_counter()
    for i in range(steps):
        fetched = next(data)
        if not read_ahead:
            gpu.wait()  # the blocking copies of the batch
        complete_batch(fetched.staged, inputs, "cpu", gen)
        gpu.launch()
        if read_ahead:
            data.prefetch()
        if (i + 1) % sync_every == 0:
            gpu.wait()
    gpu.wait()
    wall = time.perf_counter() - t0
    gpu.close()
    return {"data_wait_share": round(1 - gpu.busy / wall, 4), "wall_s": round(wall, 3), "steps": steps}


_RSS_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
import _common as C
from surpipe.train.data import BlockReader, SampleStream
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


# ------------------------------------------------------------------ --real-widths (SD 1.5 sizes)
REAL_QUICK = dict(model="sd15", rows=2, llm_widths=(4096, 5120), llm_prompts=64, loader_rows=256, batch=8,
                  workers=(0, 1, 2), utilisation=0.4, peak_tflops=989.0, predicted_samples_per_s=None,
                  wait_batch=32, wait_steps=30, wait_step_ms_per_sample=None)
REAL_FULL = dict(REAL_QUICK, rows=8, loader_rows=2048)


def _llm_size(width: int) -> dict:
    """A 2-layer random LLaMA of the given width (LLaMA-7B/13B's head size 128 and FFN ratio)."""
    heads = max(width // 128, 1)
    return dict(hidden_size=width, intermediate_size=int(width * 11008 / 4096) // 8 * 8, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=heads)


def run_real(quick: bool = True, cache: Path | None = None, **over) -> dict:
    """Store bytes and loader rate at real widths: CLIP [77, 768] x 2 and latents 4x64x64 x 4 from
    random-weight SD 1.5-architecture models on the sample's prompts and 512 px images (``model``,
    ``rows`` distinct rows), LLM pooled features of 2-layer random LLaMAs 4096 and 5120 wide (layer
    1, ``llm_prompts`` prompts); the loader over a store with the widest LLM, set against the
    samples/s bench/cost_model.py predicts for one GPU step from the store (FLOPs / utilisation x peak)."""
    import types

    with C.bench_run(quick, REAL_QUICK, REAL_FULL, over, "surpipe-bench-io-real-", None, cache) as (
            p, _, tmp, cache, res):
        _, act = C.cached_model_and_activations(p["model"], cache, p["rows"])
        tab = codec_table(act, tmp, ("zstd", "none"), names=ARRAYS[1:])
        prompts = [s.simple for s in C.sample_rows(p["llm_prompts"])]
        llm = {}
        for w in p["llm_widths"]:
            feats = C.llm_pooled(prompts, layer=1, size=_llm_size(w))
            llm[w] = feats
            tab[f"llm_{w}"] = codec_table(types.SimpleNamespace(llm=feats), tmp, ("zstd", "none"), names=("llm",))["llm"]
        base = sum(v["codecs"]["zstd"]["bytes_per_sample"] for k, v in tab.items() if not k.startswith("llm"))
        res["real_widths"] = {
            "model": p["model"], "resolution": act.resolution, "arrays": tab,
            "bytes_per_sample_zstd": {f"clip2_vae4_llm_{w}": round(base + tab[f"llm_{w}"]["codecs"]["zstd"]
                                                                   ["bytes_per_sample"], 1) for w in llm},
            "raw_bytes_per_sample": {f"clip2_vae4_llm_{w}": sum(v["raw_bytes_per_sample"] for k, v in tab.items()
                                                                if not k.startswith("llm")) + 2 * w for w in llm}}
        # The loader over a store with the widest LLM. A chunk of repeated rows would compress to
        # almost nothing (zstd finds the repeats) and read unrealistically fast, so the chunk's 64
        # rows are made distinct: the real rows, each value scaled by (1 + N(0, 1e-3)), about one
        # fp16 ulp, which leaves each row's compressibility as it was.
        w = max(llm)
        act.llm = llm[w][: act.llm.shape[0]]
        act = _distinct_rows(act, min(p["loader_rows"], 64))
        st = C.write_store(tmp / "real.zarr", act, p["loader_rows"], block_rows=64)
        rates = {str(k): loader_rate(st, act.resolution, p["batch"], k, 64) for k in p["workers"]}
        pred = ({"samples_per_s": p["predicted_samples_per_s"], "given": True} if p["predicted_samples_per_s"]
                else _predicted_rate(p["model"], p["utilisation"], p["peak_tflops"]))
        res["real_widths"]["loader"] = {
            "rows": p["loader_rows"], "batch": p["batch"], "llm_width": w, "block_rows": 64,
            "store_MB_per_row_on_disk": round(C.dir_bytes(st) / p["loader_rows"] / 1e6, 4), "workers": rates,
            "predicted_gpu_step": pred,
            "headroom_over_predicted": {k: round(v["samples_per_s"] / pred["samples_per_s"], 2)
                                        for k, v in rates.items()},
            "needs_2x": all(v["samples_per_s"] < 2 * pred["samples_per_s"] for v in rates.values())}
        # the train loop's data wait against an emulated GPU at the target step time (35% MFU), from a
        # store that holds every step's rows: a new epoch starts new loader workers, where a real
        # store's epoch lasts thousands of steps
        rows = -(-p["wait_batch"] * (p["wait_steps"] + 3) // 64) * 64
        st = C.write_store(tmp / "wait.zarr", act, rows, block_rows=64)
        step_s = p["wait_batch"] * (p["wait_step_ms_per_sample"] or _predicted_rate(
            p["model"], 0.35, p["peak_tflops"])["ms_per_sample"]) / 1e3
        res["real_widths"]["data_wait"] = {
            "batch": p["wait_batch"], "emulated_step_s": round(step_s, 4), "sync_every": 10, "store_rows": rows,
            "cases": {f"workers {k}, {'read-ahead' if ahead else 'blocking copies'}":
                      data_wait(st, act.resolution, p["wait_batch"], k, 64, step_s, p["wait_steps"], ahead)
                      for k in p["workers"] for ahead in (False, True)}}
    return res


def _distinct_rows(act: C.Activations, n: int, seed: int = 0) -> C.Activations:
    """``n`` rows from ``act``'s rows (row i from row i % rows), each value times (1 + N(0, 1e-3))."""
    import dataclasses

    rng = np.random.default_rng(seed)
    arrays = {}
    for name, a in act.arrays().items():
        rows = a[np.arange(n) % a.shape[0]].astype(np.float32)
        arrays[name] = rows * (1 + 1e-3 * rng.standard_normal(rows.shape, dtype=np.float32))
    return dataclasses.replace(act, **arrays)


def _predicted_rate(model: str, utilisation: float, peak_tflops: float) -> dict:
    """Samples/s of one GPU training step from the store, predicted by bench/cost_model.py."""
    import cost_model

    arch = C.SD_MODELS[model].get("published") if model in C.SD_MODELS else None
    if arch is None:  # a scaled-down model in a test: its own FLOPs are not modelled; use SD 1.5's
        arch = "sd15"
    flops = cost_model.sd_costs(1, arch)["step_flops"]["from_store"]
    eff = utilisation * peak_tflops * 1e12
    return {"arch": arch, "step_TFLOP_per_sample": round(flops / 1e12, 4), "utilisation": utilisation,
            "peak_TFLOPs": peak_tflops, "ms_per_sample": round(flops / eff * 1e3, 3),
            "samples_per_s": round(eff / flops, 1)}


def summary_real(d: dict) -> list[tuple[str, str]]:
    r = d["real_widths"]
    rows = [(f"store {r['model']} @{r['resolution']}px: bytes/sample zstd (raw), clip x2 + latents x4 + llm",
             ", ".join(f"{k.rsplit('_', 1)[1]}: {v:.0f} ({r['raw_bytes_per_sample'][k]})"
                       for k, v in r["bytes_per_sample_zstd"].items()))]
    lo = r["loader"]
    rows.append((f"loader samples/s workers {'/'.join(lo['workers'])} (llm {lo['llm_width']})",
                 " / ".join(str(v["samples_per_s"]) for v in lo["workers"].values())))
    pr = lo["predicted_gpu_step"]
    how = "given" if pr.get("given") else f"{pr['utilisation']:.0%} of {pr['peak_TFLOPs']:.0f} TFLOP/s"
    rows.append((f"predicted GPU step samples/s ({how}); loader headroom w" + "/".join(lo["workers"]),
                 f"{pr['samples_per_s']}; " + " / ".join(f"{v}x" for v in lo["headroom_over_predicted"].values())))
    w = r["data_wait"]
    rows += [(f"data wait, batch {w['batch']}, emulated GPU step {w['emulated_step_s'] * 1e3:.0f} ms: {k}",
              f"{v['data_wait_share']:.1%}") for k, v in w["cases"].items()]
    return rows


# ------------------------------------------------------------------ --s3 (object storage, local cache)
S3_FULL = dict(model="sd15", rows=2, llm_width=5120, loader_rows=2048, block_rows=64, batch=8, workers=(0, 2),
               shard_blocks=(1, 4), cache_gb=8.0, utilisation=0.4, peak_tflops=989.0, predicted_samples_per_s=None)
S3_TINY = dict(S3_FULL, model="tiny", rows=8, llm_width=None, loader_rows=64, block_rows=8, batch=4)

_MOTO_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from s3server import start_server
s = start_server()
print(s.endpoint, flush=True)
sys.stdin.read()  # until the parent closes the pipe
s.stop()
"""


class _Moto:
    """tests/helpers/s3server.py's moto S3 server on 127.0.0.1, run in a child process (its own interpreter,
    so the server's request handling does not take this process's GIL from the loader)."""

    def __enter__(self):
        import subprocess

        sys.path.insert(0, str(C.REPO / "tests" / "helpers"))
        from s3server import S3Server

        self.proc = subprocess.Popen([sys.executable, "-c", _MOTO_CHILD, str(C.REPO / "tests" / "helpers")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        endpoint = self.proc.stdout.readline().strip()
        if not endpoint.startswith("http://127.0.0.1:"):
            self.proc.kill()
            raise SystemExit(f"bench: the moto S3 server did not start (got {endpoint!r})")
        self.server = S3Server(None, endpoint)
        return self.server

    def __exit__(self, *exc):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001 - a server that will not stop is killed
            self.proc.kill()
            self.proc.wait()


class _GetLog:
    """Every request s3fs sends (``S3FileSystem._call_s3``: its GETs, HEADs, LISTs), from this process
    and from the DataLoader workers it forks (the patch is inherited; each process appends
    ``method\tbytes\tkey`` lines to its own file); GETs are split into feature-chunk data and other
    (metadata, done records), their bytes from the response's ContentLength."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def __enter__(self):
        import os

        import s3fs

        self._orig = orig = s3fs.S3FileSystem._call_s3
        folder = self.folder

        async def counting(fs, method, *a, **kw):
            out = await orig(fs, method, *a, **kw)
            n = int(out.get("ContentLength") or 0) if method == "get_object" and isinstance(out, dict) else 0
            with open(folder / f"calls-{os.getpid()}.log", "a") as f:
                f.write(f"{method}\t{n}\t{kw.get('Key', '')}\n")
            return out

        s3fs.S3FileSystem._call_s3 = counting
        return self

    def __exit__(self, *exc):
        import s3fs

        s3fs.S3FileSystem._call_s3 = self._orig

    def clear(self) -> None:
        for f in self.folder.glob("calls-*.log"):
            f.unlink()

    def read(self) -> dict:
        out = {"chunk_gets": 0, "chunk_bytes": 0, "other_gets": 0, "other_bytes": 0, "requests": {}, "processes": 0}
        for f in self.folder.glob("calls-*.log"):
            out["processes"] += 1
            for line in f.read_text().splitlines():
                method, n, key = line.split("\t", 2)
                out["requests"][method] = out["requests"].get(method, 0) + 1
                if method == "get_object":
                    kind = "chunk" if _is_chunk(key) else "other"
                    out[f"{kind}_gets"] += 1
                    out[f"{kind}_bytes"] += int(n)
        return out


def _is_chunk(key: str) -> bool:
    """A feature array's chunk object (not the done records, row keys or prompts)."""
    return "/c/" in key and not any(x in key for x in ("/done/", "/keys/", "/prompts/"))


def _epochs(store: str, res: int, batch: int, workers: int, block_rows: int, log: _GetLog | None,
            step_ms_per_batch: float, epochs: int = 2) -> dict:
    """Samples/s, remote GETs and data-wait share of each of ``epochs`` whole epochs read by one
    SampleStream (DataLoader workers start afresh at each epoch)."""
    from surpipe.train.data import BlockReader, SampleStream

    reader = BlockReader(str(store), C.store_groups(res), block_rows)
    if reader.num_rows % batch:
        raise SystemExit(f"bench: {reader.num_rows} rows do not split into batches of {batch}")
    n = reader.num_rows // batch
    it = iter(SampleStream(reader, batch, seed=0, workers=workers))
    out = {}
    for e in range(1, epochs + 1):
        if log:
            log.clear()
        el, first = _time_batches(it, n)
        ms = el / n * 1e3
        r = {"samples_per_s": round(n * batch / el, 1), "seconds": round(el, 3), "first_batch_s": round(first, 4),
             "loader_ms_per_batch": round(ms, 3),
             # without the first batch: the DataLoader workers' start (a fork, the store reopened)
             "after_first_batch_samples_per_s": round((n - 1) * batch / max(el - first, 1e-9), 1) if n > 1 else None,
             # loader and step one after the other: loader and step one after the other (no overlap)
             "data_wait_share": round(ms / (ms + step_ms_per_batch), 4),
             # with the loader overlapped with the step (workers prefetching), the step waits only for
             # the loader's excess over it
             "stall_share_if_overlapped": round(max(0.0, ms - step_ms_per_batch) / max(ms, step_ms_per_batch), 4)}
        if log:
            r["remote"] = log.read()
        out[f"epoch{e}"] = r
    return out


def _remote_objects(fs, url: str) -> dict:
    """Count and bytes of the feature chunk objects under a store URL."""
    found = fs.find(url[len("s3://"):], detail=True)
    chunks = [v["size"] for k, v in found.items() if _is_chunk(k)]
    return {"chunk_objects": len(chunks), "chunk_MB": round(sum(chunks) / 1e6, 2), "all_objects": len(found)}


def _sd15_activations(rows: int, llm_width: int, cache: Path) -> C.Activations:
    """``--real-widths``' SD 1.5 activations without its UNet (which the store does not need): CLIP
    ViT-L/14 text and the SD 1.5 VAE from cost_model.ARCHS["sd15"] with the seeds of
    ``_common._build_published_sd``, random weights, on the sample's first ``rows`` prompts and 512 px
    images (the encode path of ``_common.real_activations``), and the pooled layer-1 features of
    ``_llm_size(llm_width)``'s random LLaMA. Kept in ``cache``."""
    npz = Path(cache) / f"act-sd15-noUNet-{rows}-llm{llm_width}.npz"
    if npz.is_file():
        z = np.load(npz)
        return C.Activations(**{k: z[k] for k in z.files if k not in ("resolution", "scaling_factor")},
                             resolution=int(z["resolution"]), scaling_factor=float(z["scaling_factor"]))
    import tempfile

    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    import cost_model
    from surpipe import sd
    from surpipe.tiny import tiny_sd_configs, write_clip_tokenizer

    a = cost_model.ARCHS["sd15"]
    tiny = tiny_sd_configs()
    with tempfile.TemporaryDirectory(prefix="surpipe-bench-clip-") as d:
        tok = write_clip_tokenizer(d, **tiny["tokenizer"])
    torch.manual_seed(1)
    enc = CLIPTextModel(CLIPTextConfig(**dict(tiny["text_encoder"], **a["text"][0][1]))).eval()
    te = sd.TextEncoder(tok, enc, int(tok.model_max_length), int(enc.config.hidden_size),
                        bool(getattr(enc.config, "use_attention_mask", False)))
    torch.manual_seed(2)
    vm = AutoencoderKL(**a["vae"]).eval()
    vm.decoder = vm.post_quant_conv = None
    vae = sd.VaeEncoder(vm, int(a["vae"]["latent_channels"]), 2 ** (len(a["vae"]["block_out_channels"]) - 1),
                        float(a["vae"]["scaling_factor"]), None, 512)
    res = a["px"]
    samples = C.sample_rows(rows)
    parts = {k: [] for k in ("clip_simple", "clip_complex", "lat_mean", "lat_std", "flip_mean", "flip_std")}
    for i in range(0, len(samples), 8):
        part = samples[i:i + 8]
        parts["clip_simple"].append(sd.encode_prompts(te, [s.simple for s in part]).numpy())
        parts["clip_complex"].append(sd.encode_prompts(te, [s.complex for s in part]).numpy())
        x = torch.stack([sd.preprocess(s.image(), res) for s in part])
        for pre, img in (("lat", x), ("flip", torch.flip(x, dims=[-1]))):
            m, s_ = sd.encode_latent_dist(vae, img)
            parts[f"{pre}_mean"].append(m.numpy())
            parts[f"{pre}_std"].append(s_.numpy())
    del enc, vm, te, vae
    llm = C.llm_pooled([s.simple for s in samples], layer=1, size=_llm_size(llm_width))
    act = C.Activations(**{k: np.concatenate(v) for k, v in parts.items()}, llm=llm, resolution=res,
                        scaling_factor=float(a["vae"]["scaling_factor"]))
    npz.parent.mkdir(parents=True, exist_ok=True)
    with open(npz, "wb") as f:
        np.savez(f, **act.arrays(), resolution=act.resolution, scaling_factor=act.scaling_factor)
    return act


def run_s3(tiny: bool = False, cache: Path | None = None, **over) -> dict:
    """The training loader reading the same store from a local folder and from an S3 server (moto's,
    on 127.0.0.1, in a child process) unsharded and sharded: per epoch samples/s, the GETs and bytes
    fetched remotely (epoch 2 must fetch no chunk data: the local read-through cache), and the
    data-wait share against the GPU step bench/cost_model.py predicts. ``tiny``: S3_TINY (seconds)."""
    import os

    with C.bench_run(tiny, S3_TINY, S3_FULL, over, "surpipe-bench-io-s3-", None, cache) as (
            p, _, tmp, cache, res):
        res.pop("quick", None)
        res["tiny"] = tiny
        if p["model"] == "sd15":
            act = _sd15_activations(p["rows"], p["llm_width"], cache)
            how = ("SD 1.5 widths (--real-widths' store): CLIP ViT-L/14 text + SD 1.5 VAE encoder, random "
                   f"weights, {p['rows']} sample rows at 512 px, LLM pooled {p['llm_width']} wide")
        else:
            _, act = C.cached_model_and_activations(p["model"], cache, p["rows"])
            how = f"bench model {p['model']!r} (random weights) on {p['rows']} sample rows"
        act = _distinct_rows(act, min(p["loader_rows"], 64))
        r, B, br = act.resolution, p["batch"], p["block_rows"]
        pred = ({"samples_per_s": p["predicted_samples_per_s"], "given": True,
                 "ms_per_sample": round(1e3 / p["predicted_samples_per_s"], 3)} if p["predicted_samples_per_s"]
                else _predicted_rate(p["model"], p["utilisation"], p["peak_tflops"]))
        step_ms = pred["ms_per_sample"] * B
        out = {"activations": how, "resolution": r, "rows": p["loader_rows"], "batch": B, "block_rows": br,
               "server": ("moto's S3 server (tests/helpers/s3server.py) in a child process on 127.0.0.1, sharing this "
                          "machine's cores with the loader: the figures bound the protocol and client "
                          "overhead, not a real network's latency or bandwidth"),
               "predicted_gpu_step": pred, "predicted_step_ms_per_batch": round(step_ms, 3),
               "stores": {}, "write_s": {}, "runs": {}}
        t0 = time.perf_counter()
        local = C.write_store(tmp / "local.zarr", act, p["loader_rows"], block_rows=br)
        out["write_s"]["local"] = round(time.perf_counter() - t0, 2)
        out["stores"]["local"] = {"chunk_MB": round(C.dir_bytes(local) / 1e6, 2)}
        saved = {k: os.environ.get(k) for k in ("SURPIPE_STORE_CACHE_DIR", "SURPIPE_STORE_CACHE_GB",
                                                 "SURPIPE_STORAGE_OPTIONS", "AWS_ENDPOINT_URL",
                                                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                 "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED",
                                                 "NO_PROXY", "no_proxy")}
        try:
            with _Moto() as server:
                os.environ.update(server.env())
                os.environ["SURPIPE_STORAGE_OPTIONS"] = ""
                os.environ["SURPIPE_STORE_CACHE_GB"] = str(p["cache_gb"])
                bucket = server.make_bucket("bench")
                fs = server.fs()
                urls = {}
                for k in p["shard_blocks"]:
                    url = f"s3://{bucket}/x-shard{k}.zarr"
                    t0 = time.perf_counter()
                    C.write_store(url, act, p["loader_rows"], block_rows=br, shard_blocks=k)
                    out["write_s"][f"s3_shard{k}"] = round(time.perf_counter() - t0, 2)
                    out["stores"][f"s3_shard{k}"] = _remote_objects(fs, url)
                    urls[f"s3_shard{k}"] = url
                with _GetLog(tmp / "gets") as log:
                    for w in p["workers"]:
                        out["runs"].setdefault("local", {})[str(w)] = _epochs(local, r, B, w, br, None, step_ms)
                    for name, url in urls.items():
                        for w in p["workers"]:
                            cdir = tmp / f"cache-{name}-{w}"  # a cold cache for epoch 1
                            os.environ["SURPIPE_STORE_CACHE_DIR"] = str(cdir)
                            d = _epochs(url, r, B, w, br, log, step_ms)
                            d["cache_MB"] = round(sum(f.stat().st_size for f in cdir.rglob("*") if f.is_file())
                                                  / 1e6, 2)
                            out["runs"].setdefault(name, {})[str(w)] = d
                            shutil.rmtree(cdir, ignore_errors=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        res["s3"] = out
    return res


def summary_s3(d: dict) -> list[tuple[str, str]]:
    s = d["s3"]
    rows = [(f"predicted GPU step: ms per batch of {s['batch']} (samples/s)",
             f"{s['predicted_step_ms_per_batch']} ({s['predicted_gpu_step']['samples_per_s']})")]
    for name, by_w in s["runs"].items():
        for w, ep in by_w.items():
            e1, e2 = ep["epoch1"], ep["epoch2"]
            got = ""
            if "remote" in e1:
                got = (f"; chunk GETs {e1['remote']['chunk_gets']} -> {e2['remote']['chunk_gets']}, "
                       f"MB {e1['remote']['chunk_bytes'] / 1e6:.1f} -> {e2['remote']['chunk_bytes'] / 1e6:.1f}")
            rows.append((f"{name} workers {w}: samples/s epoch 1 -> 2 (data-wait share)",
                         f"{e1['samples_per_s']} ({e1['data_wait_share']:.1%}) -> {e2['samples_per_s']} "
                         f"({e2['data_wait_share']:.1%}){got}"))
    return rows


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--real-widths" in argv:
        argv.remove("--real-widths")
        return C.model_bench_main(argv, __doc__, "store_io.py --real-widths", run_real, summary_real, models=False)
    if "--s3" in argv:
        argv.remove("--s3")
        ap = C.bench_parser(__doc__)
        ap.add_argument("--tiny", action="store_true", help="the tiny bench model, 64 rows (seconds)")
        ap.add_argument("--cache", default=None, help="folder to keep built models and activations in")
        args = ap.parse_args(argv)
        if args.quick:
            ap.error("--s3 has no --quick; --tiny is its small run")
        d = run_s3(args.tiny, cache=args.cache)
        cmd = "python bench/store_io.py --s3" + (" --tiny" if args.tiny else "") + f" --out {args.out}"
        return C.write_result(d, args.out, cmd, summary_s3)
    return C.model_bench_main(argv, __doc__, "store_io.py", run, summary)


if __name__ == "__main__":
    sys.exit(main())
