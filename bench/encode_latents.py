"""Benchmark of ``surpipe encode-latents``: throughput and storage.

    python bench/encode_latents.py [--quick] --out FILE.json [--data data/sample] [--device cpu|cuda]

Measures, for a tiny Stable Diffusion (surpipe.tiny defaults: CLIP width 32 x 2 layers, VAE (32, 64)
at 64 px) and a mid-size one (CLIP width 512 x 6 layers, VAE (64, 128, 256, 256) at 256 px), both
with random weights built offline:

* prompts/s of the CLIP path (tokenize + text encoder, the pipeline-exact ``surpipe.sd.encode_prompts``)
  by batch size, on the bundled sample's complex prompts;
* images/s of ``vae.encode(x).latent_dist`` (mean + std) by batch size, on the sample's images
  preprocessed to the model's resolution; and images/s of decoding + preprocessing alone (one process);
* bytes stored per sample for each array and the compression ratio of each codec (zstd, blosc-lz4,
  gzip, none), measured on the arrays that ``encode-latents`` actually stored for the bundled sample
  (real prompts and images through the models, not random numbers; the weights are random, so
  real SD activations may compress differently: rerun with ``--model`` on a real checkpoint).

``--quick`` (under a minute on 2 CPU cores) uses fewer batch sizes, shorter timings and, for the
mid-size model, the first 8 rows of the sample.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {
    "tiny": dict(),  # surpipe.tiny defaults
    "mid": dict(channels=(64, 128, 256, 256), text_width=512, text_layers=6, text_heads=8, image_size=256),
}


def _timeit(fn, min_time: float, max_reps: int = 1000) -> float:
    """Seconds per call: one warm-up call, then repeat until ``min_time`` has passed."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el >= min_time or n >= max_reps:
            return el / n


def _subset(data: Path, rows: int, out: Path) -> Path:
    """A SURD imagefolder with the first ``rows`` rows of ``data`` (same images, same prompts)."""
    lines = (data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    out.mkdir(parents=True)
    for line in lines:
        f = json.loads(line)["file_name"]
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / f, out / f)
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.name != "zarr.json")


def codec_table(group, tmp: Path) -> dict:
    """Bytes per sample and compression ratio of every codec for each array of a stored group."""
    import zarr

    from surpipe.store import CODECS, _codecs

    out = {}
    n = None
    for name in group.array_keys():
        if name == "done":
            continue
        src = group[name]
        data = src[:]
        n = data.shape[0]
        raw = data.nbytes
        row = {"shape": list(data.shape), "dtype": str(data.dtype), "raw_bytes_per_sample": raw / n, "codecs": {}}
        for codec in CODECS:
            d = tmp / f"{name}-{codec}.zarr"
            arr = zarr.create_array(str(d), shape=data.shape, dtype=data.dtype, chunks=src.chunks,
                                    compressors=_codecs(codec), fill_value=0)
            t0 = time.perf_counter()
            arr[:] = data
            t_write = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = zarr.open_array(str(d), mode="r")[:]
            t_read = time.perf_counter() - t0
            assert np.array_equal(back, data)
            stored = _dir_bytes(d)
            row["codecs"][codec] = {"bytes_per_sample": round(stored / n, 1), "ratio": round(raw / stored, 3),
                                    "write_MB_s": round(raw / 1e6 / max(t_write, 1e-9), 1),
                                    "read_MB_s": round(raw / 1e6 / max(t_read, 1e-9), 1)}
            shutil.rmtree(d)
        out[name] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes, shorter timings (< 60 s on 2 cores)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--data", default=str(REPO / "data" / "sample"), help="SURD imagefolder [data/sample]")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:I [cpu]")
    ap.add_argument("--dtype", default=None, help="compute dtype [float32 on CPU, float16 on CUDA]")
    args = ap.parse_args(argv)

    import torch

    from bench._common import host_info
    from stages.encode_latents import EncodeLatentsConfig, run
    from surpipe import sd
    from surpipe.data import open_dataset
    from surpipe.tiny import build_tiny_sd

    t_all = time.perf_counter()
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    quick = args.quick
    min_time = 0.25 if quick else 1.5
    sizes = {"tiny": {"clip": [1, 16, 64] if quick else [1, 4, 16, 64, 128],
                      "vae": [1, 8, 32] if quick else [1, 4, 8, 16, 32, 64]},
             "mid": {"clip": [1, 16] if quick else [1, 4, 16, 64, 128],
                     "vae": [1, 4] if quick else [1, 2, 4, 8, 16]}}
    if args.device.startswith("cuda"):
        sizes["mid"]["vae"] = [1, 4, 16, 32, 64]
    data = Path(args.data)
    ds = open_dataset(str(data), progress=False)
    prompts = [s.complex for s in ds.samples]
    result = {
        "command": "python bench/encode_latents.py" + (" --quick" if quick else "") + f" --device {args.device}",
        "host": {**host_info(), "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
        "data": str(data), "rows": len(ds), "dtype": dtype, "models": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="surpipe-bench-"))
    try:
        for mname, overrides in MODELS.items():
            t_model = time.perf_counter()
            mdir = build_tiny_sd(tmp / mname, seed=0, **overrides)
            te = sd.load_text_encoder(str(mdir), dtype=dtype, device=args.device)
            vae = sd.load_vae_encoder(str(mdir), dtype=dtype, device=args.device)
            res = sd.default_resolution(str(mdir), None, vae)
            info = {"text_width": te.hidden_size, "text_layers": te.info["num_hidden_layers"],
                    "vae_block_out_channels": list(vae.model.config.block_out_channels),
                    "resolution": res, "latent_shape": [vae.latent_channels, res // vae.downsample, res // vae.downsample],
                    "text_encoder_params_M": round(sum(p.numel() for p in te.model.parameters()) / 1e6, 2),
                    "vae_encoder_params_M": round(sum(p.numel() for p in vae.model.parameters()) / 1e6, 2)}
            sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

            clip = {}
            for bs in sizes[mname]["clip"]:
                batch = [prompts[i % len(prompts)] for i in range(bs)]

                def f():
                    sd.encode_prompts(te, batch, args.device)
                    sync()

                clip[str(bs)] = round(bs / _timeit(f, min_time), 1)
            info["clip_prompts_per_s"] = clip

            imgs = [s.image() for s in ds.samples[:64]]
            t0 = time.perf_counter()
            pre = [sd.preprocess(im, res) for im in imgs]
            info["preprocess_images_per_s_one_process"] = round(len(imgs) / (time.perf_counter() - t0), 1)
            dec = []
            t0 = time.perf_counter()
            for s in ds.samples[:32]:
                dec.append(sd.preprocess(s.image(), res))
            info["decode_and_preprocess_images_per_s_one_process"] = round(32 / (time.perf_counter() - t0), 1)
            vres = {}
            for bs in sizes[mname]["vae"]:
                x = torch.stack([pre[i % len(pre)] for i in range(bs)])

                def g():
                    sd.encode_latent_dist(vae, x, args.device)
                    sync()

                vres[str(bs)] = round(bs / _timeit(g, min_time, max_reps=50), 2)
            info["vae_images_per_s"] = vres
            # Release the models. Not `del`: the step closures above capture te/vae, and pyflakes reads a
            # `del` of a captured name as making the closures' uses undefined (Python allows it).
            te = vae = None

            # What the stage stores for the sample (mid-size: first 8 rows with --quick).
            rows = 8 if (quick and mname == "mid") else len(ds)
            sub = data if rows == len(ds) else _subset(data, rows, tmp / f"{mname}-data")
            store = tmp / f"{mname}.zarr"
            cfg = EncodeLatentsConfig(data=str(sub), store=str(store), model=str(mdir), flip=True, codec="none",
                                      block_rows=64, batch_size=sizes[mname]["vae"][-1], workers=1,
                                      dtype=dtype, device=args.device, progress=False)
            t0 = time.perf_counter()
            rep = run(cfg)
            stage_s = time.perf_counter() - t0
            import zarr

            root = zarr.open_group(str(store), mode="r")
            info["stage"] = {"rows": rows, "seconds": round(stage_s, 2), "clip_seconds": rep["clip"]["seconds"],
                             "vae_seconds": rep["vae"]["seconds"], "complex_truncated": rep["clip"]["complex_truncated"],
                             "flip": True}
            info["storage_float16"] = {
                **{f"clip/{k}": v for k, v in codec_table(root[f"clip/{mname}"], tmp).items()},
                **{f"vae/{k}": v for k, v in codec_table(root[f"vae/{mname}-{res}"], tmp).items()},
            }
            per_codec = {}
            for codec in ("zstd", "blosc-lz4", "gzip", "none"):
                per_codec[codec] = round(sum(a["codecs"][codec]["bytes_per_sample"]
                                             for a in info["storage_float16"].values()), 1)
            info["total_bytes_per_sample"] = per_codec
            info["seconds"] = round(time.perf_counter() - t_model, 1)
            result["models"][mname] = info
            shutil.rmtree(mdir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    # A short human-readable summary.
    for mname, info in result["models"].items():
        print(f"\n== {mname}: CLIP width {info['text_width']} x {info['text_layers']} layers; VAE "
              f"{tuple(info['vae_block_out_channels'])} at {info['resolution']} px -> {info['latent_shape']}")
        print("  CLIP prompts/s by batch: " + ", ".join(f"{b}: {v}" for b, v in info["clip_prompts_per_s"].items()))
        print("  VAE images/s by batch:   " + ", ".join(f"{b}: {v}" for b, v in info["vae_images_per_s"].items()))
        print(f"  decode+preprocess (1 process): {info['decode_and_preprocess_images_per_s_one_process']} img/s")
        print(f"  {'array':<20} {'raw B/sample':>13} " + " ".join(f"{c:>10}" for c in ("zstd", "blosc-lz4", "gzip")))
        for a, row in info["storage_float16"].items():
            print(f"  {a:<20} {row['raw_bytes_per_sample']:>13.0f} "
                  + " ".join(f"{row['codecs'][c]['ratio']:>9.3f}x" for c in ("zstd", "blosc-lz4", "gzip")))
        print("  total bytes/sample: " + ", ".join(f"{c} {v:.0f}" for c, v in info["total_bytes_per_sample"].items()))
    print(f"\nwrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
