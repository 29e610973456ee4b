"""Shared pieces of surpipe's benchmarks: models built offline, real activations, stores, timing.

Real activations: the bundled sample's prompts and images through CLIP text encoders, VAE encoders
and a small LLaMA built from configs with random weights (no hub here). The numbers are real
forward passes on real inputs, not random numbers, but the weights are random: trained models
may give activations that compress differently (rerun on real checkpoints on a GPU machine).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SAMPLE = REPO / "data" / "sample"

from _results import write_result  # noqa: E402,F401  (the bench's scripts call C.write_result)

# SD-like models built from configs. "tiny": surpipe.tiny defaults (CLIP 32 wide, VAE/UNet (32, 64),
# 64 px). "mid": UNet (64, 128, 256) x 2 layers, VAE (64, 128, 256, 256) x 2 layers at 256 px,
# CLIP 384 wide x 6 layers (SD-1.5-like block types and attention, scaled down).
SD_MODELS = {
    "tiny": dict(text_width=32, text_layers=2, text_heads=4, unet_channels=(32, 64), vae_channels=(32, 64),
                 layers_per_block=1, image_size=64, attention_head_dim=8,
                 adapter=dict(nhead=4, dim_feedforward=64)),
    "mid": dict(text_width=384, text_layers=6, text_heads=6, unet_channels=(64, 128, 256),
                vae_channels=(64, 128, 256, 256), layers_per_block=2, image_size=256, attention_head_dim=8,
                adapter=dict(nhead=8, dim_feedforward=1024)),
    # The published SD 1.5 architecture (bench/cost_model.py's SD15_UNET / SD15_VAE / CLIP_L14_TEXT,
    # one home for those configs), random weights; the adapter at the authors' size.
    "sd15": dict(published="sd15", text_width=768, image_size=512,
                 adapter=dict(nhead=8, dim_feedforward=2048, num_layers=2)),
    # SDXL base 1.0's architecture (cost_model's SDXL_UNET / SDXL_VAE / CLIP_L14_TEXT / OPENCLIP_BIGG_TEXT),
    # random weights, the adapter 2048 wide. Benched at 512 px (latents 4x64x64), not SDXL's 1024:
    # a 1024 px step takes too long on a CPU. image_size is that bench resolution.
    "sdxl": dict(published="sdxl", text_width=2048, image_size=512,
                 adapter=dict(nhead=8, dim_feedforward=2048, num_layers=2)),
    # surpipe.tiny.sdxl's tiny SDXL (64 px, embeddings 32 + 32 wide): the sdxl machinery, tested cheaply
    "tiny-xl": dict(xl=True, text_width=64, image_size=64, adapter=dict(nhead=4, dim_feedforward=64)),
}
LLM_SIZE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8)


def host_info() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


@contextlib.contextmanager
def bench_run(quick: bool, quick_params: dict, full_params: dict, over: dict, prefix: str, models=None,
              cache: Path | None = None):
    """The frame of a benchmark's ``run``: yields ``(params, models, tmp, cache, result)``.

    ``params``: QUICK or FULL updated with the non-None ``over``; ``models``: the given list or
    ``params["models"]``; ``tmp``: a scratch folder removed at the end; ``cache``: the given
    folder or one inside ``tmp``; ``result``: host, quick and params, with ``seconds`` added on exit.
    """
    p = dict(quick_params if quick else full_params)
    p.update({k: v for k, v in over.items() if v is not None})
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    cache = Path(cache) if cache else tmp / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    res = {"host": host_info(), "quick": quick,
           "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}}
    try:
        yield p, models or p.get("models"), tmp, cache, res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def timeit(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def build_sd(kind: str, out: Path, seed: int = 0) -> Path:
    """An SD pipeline folder (standard diffusers layout) for ``SD_MODELS[kind]``, random weights."""
    from surpipe.tiny import tiny_sd_configs

    m = SD_MODELS[kind]
    if m.get("published"):
        return _build_published_sd(m["published"], Path(out), seed)
    if m.get("xl"):
        from surpipe.tiny.sdxl import build_tiny_sdxl

        return Path(out) if (Path(out) / "model_index.json").is_file() else build_tiny_sdxl(out, seed)
    common = dict(text_width=m["text_width"], text_layers=m["text_layers"], text_heads=m["text_heads"],
                  layers_per_block=m["layers_per_block"], attention_head_dim=m["attention_head_dim"])
    cv = tiny_sd_configs(channels=m["vae_channels"], image_size=m["image_size"], **common)
    cu = tiny_sd_configs(channels=m["unet_channels"], image_size=m["image_size"], **common)
    unet_cfg = dict(cu["unet"], sample_size=m["image_size"] // 2 ** (len(m["vae_channels"]) - 1))
    out = Path(out)
    if (out / "model_index.json").is_file():
        return out
    return _save_sd(out, seed, cv["tokenizer"], cv["text_encoder"], cv["vae"], unet_cfg, cv["scheduler"])


def _save_sd(out: Path, seed: int, tokenizer: dict, text: dict, vae: dict, unet: dict, scheduler: dict) -> Path:
    """Save an SD pipeline of these component configs, random weights (one seed per component)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from surpipe.tiny import write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="surpipe-bench-clip-") as d:
        tok = write_clip_tokenizer(d, **tokenizer)
    torch.manual_seed(seed * 1000 + 1)
    te = CLIPTextModel(CLIPTextConfig(**text)).eval()
    torch.manual_seed(seed * 1000 + 2)
    vae_model = AutoencoderKL(**vae).eval()
    torch.manual_seed(seed * 1000 + 3)
    unet_model = UNet2DConditionModel(**unet).eval()
    pipe = StableDiffusionPipeline(vae=vae_model, text_encoder=te, tokenizer=tok, unet=unet_model,
                                   scheduler=DDPMScheduler(**scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _build_published_sd(arch: str, out: Path, seed: int) -> Path:
    """An SD pipeline folder with the published architecture of ``cost_model.ARCHS[arch]`` (SD 1.5:
    UNet 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text 123.1 M), random weights, the offline CLIP tokenizer."""
    import cost_model
    from surpipe.tiny import tiny_sd_configs

    if (out / "model_index.json").is_file():
        return out
    if arch == "sdxl":
        return _build_published_sdxl(out, seed)
    if arch != "sd15":
        raise SystemExit(f"bench: no published-architecture builder for {arch!r}")
    a = cost_model.ARCHS[arch]
    tiny = tiny_sd_configs()  # token ids and the SD scheduler; the architecture keys come from ARCHS
    text = dict(tiny["text_encoder"], **a["text"][0][1])
    return _save_sd(out, seed, tiny["tokenizer"], text, a["vae"], a["unet"], tiny["scheduler"])


def _build_published_sdxl(out: Path, seed: int) -> Path:
    """An SDXL pipeline folder (``StableDiffusionXLPipeline`` layout) with SDXL base 1.0's architecture
    (``cost_model.ARCHS["sdxl"]``: UNet 2567.5 M, VAE 83.7 M, CLIP ViT-L/14 text 123.1 M, OpenCLIP bigG
    text + projection 694.7 M), random weights, the offline CLIP tokenizers of the tiny SDXL.

    Memory: the pipeline is saved first with a tiny placeholder UNet; only then is the 10.3 GB fp32
    UNet built and saved over it in 2 GB shards, so the peak is one UNet plus one shard, never the
    UNet and both text encoders together."""
    import gc

    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import cost_model
    from surpipe.tiny import write_clip_tokenizer
    from surpipe.tiny.sdxl import tiny_sdxl_configs

    a = cost_model.ARCHS["sdxl"]
    tiny = tiny_sdxl_configs()  # token ids, tokenizers, SDXL's scheduler; the architecture keys come from ARCHS
    (_, c1, _), (_, c2, _) = a["text"]
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "layer_norm_eps")
    text = [dict(c, **{k: t[k] for k in keep}) for c, t in ((c1, tiny["text_encoder"]), (c2, tiny["text_encoder_2"]))]
    part = out.with_name(out.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="surpipe-bench-clip-") as d:
        tok = write_clip_tokenizer(Path(d) / "1", **tiny["tokenizer"])
        tok_2 = write_clip_tokenizer(Path(d) / "2", **tiny["tokenizer_2"])
    torch.manual_seed(seed * 1000 + 1)
    te = CLIPTextModel(CLIPTextConfig(**text[0])).eval()
    torch.manual_seed(seed * 1000 + 4)
    te_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text[1])).eval()
    torch.manual_seed(seed * 1000 + 2)
    vae = AutoencoderKL(**a["vae"]).eval()
    placeholder = UNet2DConditionModel(**tiny["unet"])  # the tiny SDXL's, replaced below
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te_2, tokenizer=tok, tokenizer_2=tok_2,
                                     unet=placeholder, scheduler=EulerDiscreteScheduler(**tiny["scheduler"]),
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(part, safe_serialization=True)
    shutil.rmtree(part / "unet")
    del pipe, te, te_2, vae, placeholder
    gc.collect()
    torch.manual_seed(seed * 1000 + 3)
    unet = UNet2DConditionModel(**a["unet"]).eval()
    unet.save_pretrained(part / "unet", safe_serialization=True, max_shard_size="2GB")
    del unet
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)
    return out


def sample_rows(rows: int | None = None):
    from surpipe.data import open_dataset

    ds = open_dataset(str(SAMPLE), progress=False)
    return ds.samples[: rows or len(ds.samples)]


@dataclass
class Activations:
    """Real per-row activations of the sample (float32 numpy), row-aligned."""

    clip_simple: np.ndarray
    clip_complex: np.ndarray
    lat_mean: np.ndarray
    lat_std: np.ndarray
    flip_mean: np.ndarray
    flip_std: np.ndarray
    llm: np.ndarray  # pooled raw residual stream of one middle decoder layer
    resolution: int
    scaling_factor: float
    # SDXL only: the pooled embeddings [n, P] and the micro-conditioning (height, width), (top, left) [n, 2]
    pooled_simple: np.ndarray | None = None
    pooled_complex: np.ndarray | None = None
    original_size: np.ndarray | None = None
    crop_top_left: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        names = ("llm", "clip_simple", "clip_complex", "lat_mean", "lat_std", "flip_mean", "flip_std",
                 "pooled_simple", "pooled_complex", "original_size", "crop_top_left")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def random_activations(n: int, width: int, latent: tuple, llm_width: int, resolution: int, scaling_factor: float,
                       pooled_width: int = 0, seed: int = 0) -> Activations:
    """``n`` rows of random values at these widths, for speed benchmarks (a step's time does not
    depend on the values); with ``pooled_width``, SDXL's pooled embeddings and the micro-conditioning
    of uncropped ``resolution``-square images."""
    rng = np.random.default_rng(seed)

    def f(*shape):
        return rng.standard_normal((n, *shape), dtype=np.float32)

    def std():
        return np.abs(f(*latent)) * 0.1 + 0.01

    xl = dict(pooled_simple=f(pooled_width), pooled_complex=f(pooled_width),
              original_size=np.full((n, 2), resolution, np.int32), crop_top_left=np.zeros((n, 2), np.int32))
    return Activations(clip_simple=f(77, width), clip_complex=f(77, width), lat_mean=f(*latent), lat_std=std(),
                       flip_mean=f(*latent), flip_std=std(), llm=f(llm_width), resolution=resolution,
                       scaling_factor=scaling_factor, **(xl if pooled_width else {}))


def llm_pooled(prompts, layer: int = 3, seed: int = 0, size: dict | None = None) -> np.ndarray:
    """Mean-pooled raw output of decoder ``layer`` of a small random LLaMA (``size``, default
    LLM_SIZE) on real prompts."""
    import torch
    from transformers import LlamaModel

    from surpipe.tiny import load_llama_sentencepiece, tiny_llm_config

    tok = load_llama_sentencepiece()
    torch.manual_seed(seed)
    model = LlamaModel(tiny_llm_config(**(size or LLM_SIZE))).eval()
    got = {}
    h = model.layers[layer].register_forward_hook(lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            model(input_ids=ids, use_cache=False)
            out.append(got["h"][0].float().mean(0).numpy())
    h.remove()
    return np.stack(out)


def real_activations(model_dir: Path, rows: int | None = None, batch: int = 8,
                     resolution: int | None = None) -> Activations:
    """CLIP last hidden states of the simple and complex prompts, VAE latent mean/std of the
    center-cropped images and their flips (surpipe.sd, the encode-latents code path), LLM pooled.
    An SDXL folder: both encoders' embeddings and the pooled embedding (surpipe.sd.xl) and the
    micro-conditioning. ``resolution``: None for the pipeline's default."""
    import torch

    from surpipe import sd
    from surpipe.sd import xl as sdxl

    samples = sample_rows(rows)
    xl = sd.check_pipeline_class(str(model_dir), None, accept=("sd", "sdxl")) == "sdxl"
    te = sdxl.load_text_encoders_xl(str(model_dir)) if xl else sd.load_text_encoder(str(model_dir))
    vae = sd.load_vae_encoder(str(model_dir))
    res = resolution or sd.default_resolution(str(model_dir), None, vae)
    cs, cc, mm, ss, fm, fs, ps, pc = [], [], [], [], [], [], [], []
    for i in range(0, len(samples), batch):
        part = samples[i:i + batch]
        if xl:
            for emb, pool, which in ((cs, ps, "simple"), (cc, pc, "complex")):
                e, p = sdxl.encode_prompts_xl(te, [getattr(s, which) for s in part])
                emb.append(e.numpy()); pool.append(p.numpy())
        else:
            cs.append(sd.encode_prompts(te, [s.simple for s in part]).numpy())
            cc.append(sd.encode_prompts(te, [s.complex for s in part]).numpy())
        x = torch.stack([sd.preprocess(s.image(), res) for s in part])
        m, s_ = sd.encode_latent_dist(vae, x)
        mm.append(m.numpy()); ss.append(s_.numpy())
        m, s_ = sd.encode_latent_dist(vae, torch.flip(x, dims=[-1]))
        fm.append(m.numpy()); fs.append(s_.numpy())
    llm = llm_pooled([s.simple for s in samples])
    extra = {}
    if xl:
        orig, crop = sdxl.micro_conditioning_rows([s.image().size for s in samples], res)
        extra = dict(pooled_simple=np.concatenate(ps), pooled_complex=np.concatenate(pc), original_size=orig,
                     crop_top_left=crop)
    return Activations(np.concatenate(cs), np.concatenate(cc), np.concatenate(mm), np.concatenate(ss),
                       np.concatenate(fm), np.concatenate(fs), llm, res, vae.scaling_factor, **extra)


def synthetic_dataset(n: int, base=None):
    """``n`` rows cycling through ``base`` (simple, complex) prompt pairs, as a FeatureStore dataset."""
    from tests.helpers import SyntheticDataset

    base = base or [("a", "b")]
    return SyntheticDataset([(f"r{i:07d}", *base[i % len(base)]) for i in range(n)], source=f"bench-synthetic-{n}")


def write_store(path: Path, act: Activations, rows: int, block_rows: int = 64, codec: str = "zstd",
                dtype: str = "float16", llm_layer: int = 3, shard_blocks: int = 1) -> Path:
    """A training store of ``rows`` rows: the real activations tiled (row i holds activation i % n).
    ``path`` may be a URL; ``shard_blocks`` blocks per stored object (each shard written in one piece)."""
    from surpipe.store import ArraySpec, FeatureStore
    from surpipe.store.sharding import shard_runs

    st = FeatureStore.create_or_open(path, synthetic_dataset(rows), block_rows=block_rows)
    n = act.llm.shape[0]
    lat = act.lat_mean.shape[1:]
    width = act.clip_simple.shape[-1]
    llm = st.require_group("llm", "bench", {"layers": [llm_layer]},
                           {f"layer_{llm_layer}/pooled": ArraySpec((act.llm.shape[1],), dtype, codec)},
                           shard_blocks=shard_blocks)
    xl = act.pooled_simple is not None
    if xl:  # SDXL: the groups encode-latents writes (pooled embeddings, micro-conditioning)
        from surpipe.features import ClipXLFeatures, VaeFeatures

        cs = ClipXLFeatures.settings(max_length=77, hidden_size=width, pooled_size=act.pooled_simple.shape[-1],
                                     store_dtype=dtype)
        clip = st.require_group("clip", "bench", cs, ClipXLFeatures.arrays(cs, codec), shard_blocks=shard_blocks)
        vs = VaeFeatures.settings(resolution=act.resolution, flip=True, scaling_factor=act.scaling_factor,
                                  shift_factor=None, latent_channels=lat[0], downsample_factor=act.resolution // lat[-1],
                                  store_dtype=dtype, micro_conditioning=True)
        vae = st.require_group("vae", f"bench-{act.resolution}", vs, VaeFeatures.arrays(vs, codec),
                               shard_blocks=shard_blocks)
    else:
        clip = st.require_group("clip", "bench", {"m": 1}, {
            "simple": ArraySpec((77, width), dtype, codec), "complex": ArraySpec((77, width), dtype, codec),
            "simple_len": ArraySpec((), "int32", codec), "complex_len": ArraySpec((), "int32", codec)},
            shard_blocks=shard_blocks)
        vae = st.require_group("vae", f"bench-{act.resolution}", {"resolution": act.resolution,
                                                                  "scaling_factor": act.scaling_factor},
                               {k: ArraySpec(lat, dtype, codec) for k in ("mean", "std", "flip_mean", "flip_std")},
                               shard_blocks=shard_blocks)

    def block_values(b):
        s, e = st.block_range(b)
        idx = np.arange(s, e) % n
        cb = {"simple": act.clip_simple[idx], "complex": act.clip_complex[idx],
              "simple_len": np.full(e - s, 9), "complex_len": np.full(e - s, 60)}
        vb = {"mean": act.lat_mean[idx], "std": act.lat_std[idx],
              "flip_mean": act.flip_mean[idx], "flip_std": act.flip_std[idx]}
        if xl:
            cb.update(simple_pooled=act.pooled_simple[idx], complex_pooled=act.pooled_complex[idx],
                      simple_len_2=np.full(e - s, 9), complex_len_2=np.full(e - s, 60))
            vb.update(original_size=act.original_size[idx], crop_top_left=act.crop_top_left[idx])
        return {f"layer_{llm_layer}/pooled": act.llm[idx]}, cb, vb

    # a shard's blocks in one piece: zarr rewrites the whole shard object at every partial write
    for run in shard_runs(list(range(st.num_blocks)), llm.shard_blocks):
        vals = [block_values(b) for b in run]
        for i, g in enumerate((llm, clip, vae)):
            g.write_blocks(run, [v[i] for v in vals])
    return path if isinstance(path, str) and "://" in path else Path(path)


def store_groups(resolution: int, llm_layer: int = 3, flip: bool = True):
    from surpipe.train.groups import StoreGroups

    return StoreGroups("llm/bench", llm_layer, "clip/bench", f"vae/bench-{resolution}", flip)


def cached_model_and_activations(kind: str, cache: Path, rows: int | None) -> tuple[Path, Activations]:
    """``build_sd`` + ``real_activations``, kept in ``cache`` so several benchmarks share them."""
    cache = Path(cache)
    mdir = build_sd(kind, cache / f"sd-{kind}")
    npz = cache / f"act-{kind}-{rows or 'all'}.npz"
    # SDXL is benched below its training resolution (SD_MODELS["sdxl"]["image_size"]); SD at its default
    res = SD_MODELS[kind]["image_size"] if SD_MODELS[kind].get("published") == "sdxl" else None
    if npz.is_file():
        z = np.load(npz)
        return mdir, Activations(**{k: z[k] for k in z.files if k not in ("resolution", "scaling_factor")},
                                 resolution=int(z["resolution"]), scaling_factor=float(z["scaling_factor"]))
    act = real_activations(mdir, rows, resolution=res)
    _release_freed_memory()  # the encoders are gone: give their heap back before the step workers start
    from surpipe.config import atomic_path

    with atomic_path(npz) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
        np.savez(f, **act.arrays(), resolution=act.resolution, scaling_factor=act.scaling_factor)
    return mdir, act


def _release_freed_memory() -> None:
    """Collect and hand freed heap back to the OS (glibc keeps it otherwise: after SDXL's encoders the
    bench's parent process held 5.4 GB it no longer used, beside 10+ GB step workers)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file() and not f.name.endswith(".json"))


def bench_parser(doc: str, out_help: str = "JSON file to write"):
    """An argument parser with the options every benchmark takes: ``--quick --out``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True, help=out_help)
    return ap


def model_bench_main(argv, doc: str, script: str, run, summary_rows, models: bool = True) -> int:
    """The command line shared by the benchmarks that build models:
    ``--quick --out FILE [--models tiny,mid] [--cache DIR]`` (no ``--models`` when ``models`` is False)."""
    ap = bench_parser(doc)
    if models:
        ap.add_argument("--models", default=None, help="comma list of " + ",".join(SD_MODELS))
    ap.add_argument("--cache", default=None, help="folder to keep built models and activations in")
    args = ap.parse_args(argv)
    kw = {"models": args.models.split(",") if args.models else None} if models else {}
    d = run(args.quick, cache=args.cache, **kw)
    cmd = (f"python bench/{script}" + (" --quick" if args.quick else "") + f" --out {args.out}"
           + (f" --models {args.models}" if models and args.models else ""))
    return write_result(d, args.out, cmd, summary_rows)
