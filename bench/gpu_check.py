"""GPU check: SUR-adapter's real-scale step and LLM extraction measured on one GPU in one short run.

    python bench/gpu_check.py --out bench/results/gpu_check.json             # one GPU, < 7 min
    python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_check.json  # CPU dry run, < 1 min

1. Training step of the SD 1.5 architecture (UNet 859.5 M, VAE, CLIP ViT-L/14 text tower, adapter
   768 / 8 heads / FFN 2048: ``bench/cost_model.py``'s published configs, random weights) at 512 px,
   batch 1, 8 and 32, the paper's gradient path (the denoising loss reaches the adapter through the
   frozen UNet's input gradients: the step the cost model counts), ``surpipe.train.losses.composed_loss``,
   grad-norm clip and AdamW, frozen models in bf16 and the adapter under bf16 autocast:

   * from the store: a real Zarr store (``bench/_common.write_store``, real widths, random values)
     read by ``SampleStream`` and turned into tensors by ``surpipe.train.setup.batch_tensors``; only
     the UNet, the adapter and the projection are on the GPU;
   * online (the authors' way): VAE encode of a 512 px image batch already on the GPU (decoding the
     files is CPU work a loader overlaps) + CLIP on the simple and the complex prompt (77 random
     token ids each) + the same loss and update; the VAE and the text encoder are on the GPU too.

   Per case: step time (median), samples/s, peak GPU memory (``torch.cuda.max_memory_allocated``,
   reset between cases) and model FLOPs utilisation = the cost model's FLOPs per step / step time /
   the device's dense bf16 peak (``PEAK_BF16_TFLOPS``; unknown device: MFU omitted). Anchor:
   MosaicML's SD-2 training at 512 px works out near 30% MFU on A100s.
2. LLM extraction throughput of a random LLaMA-7B architecture (hidden 4096, 32 layers, 32 heads,
   MLP 11008) in fp16, int8 and NF4: the weights are made once on the GPU and loaded with the
   ``from_pretrained`` arguments ``surpipe.llm.load_llm`` uses (the same ``BitsAndBytesConfig``), and
   ``surpipe.llm.extract`` (hooked decoder layers, pooled) runs on prompts of 16 tokens (the cost
   model's SURD-like length), the last layer (the whole decoder runs). Prompts/s, tokens/s, weight
   and peak GPU memory.

``--budget-s`` (default 400) stops adding cases once spent; every case not measured is listed under
``skipped`` with its reason (time budget, out of memory, a batch that did not fit, an error). The
JSON is rewritten after every case, so a run cut short keeps what it measured.

``--device cpu --tiny``: the same code on tiny configs (``TINY_SD``, ``TINY_LLM``) in float32 (no bf16
autocast on CPU; fp16 becomes float32 there); the quantized cases run when bitsandbytes' CPU
backend works and are skipped with the reason otherwise; memory is the process's peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import resource
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402

import _common as C  # noqa: E402  (puts the repository on sys.path, sets HF_HUB_OFFLINE)
import cost_model as CM  # noqa: E402

from surpipe.errors import first_line  # noqa: E402

DEFAULT_OUT = C.REPO / "bench" / "results" / "gpu_check.json"
# Dense bf16 peak, TFLOP/s, by a piece of the device name (first match wins). H100 PCIe/NVL have
# lower peaks (756 / 835): not listed, so no MFU is claimed for them.
# NVIDIA's datasheets (dense: half the sparsity figure); first match wins, so each SKU before its family
PEAK_BF16_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 80GB HBM3", 989.0), ("H100 SXM", 989.0),
                    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("A100", 312.0))
MFU_ANCHOR = ("MosaicML's SD-2 training at 512 px works out near 30% MFU on A100s "
              "(they report 1.4x from precomputed latents)")

# Tiny stand-ins for the dry run, in the cost model's ARCHS layout so that its FLOP counting runs on
# them unchanged: a 4-block VAE (8x down, as SD's), a 2-block UNet, a 32-wide CLIP text tower.
TINY_SD = dict(
    unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
              norm_num_groups=32),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
             block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215),
    px=64, adapter=dict(width=32, nhead=4, dim_feedforward=64, num_layers=2), pooled=0, time_ids=0,
    text=(("clip_text", dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                             projection_dim=32), False),),
)
# in/out sizes multiples of 64: bitsandbytes' CPU NF4 kernel needs them
TINY_LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256)
TINY_ARCH = "gpu_check_tiny"


def register_tiny() -> None:
    """Make ``TINY_SD`` known to the cost model (FLOPs and parameters of the dry run's step)."""
    CM.ARCHS.setdefault(TINY_ARCH, TINY_SD)
    CM.PUBLISHED_PARAMS.setdefault(TINY_ARCH, {})  # no published counts to check a stand-in against


QUANTS = (("fp16", "none"), ("int8", "8bit"), ("nf4", "4bit"))  # case name, surpipe.llm quant


# --------------------------------------------------------------------------- device helpers
def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of device ``name`` (TFLOP/s), None when not in ``PEAK_BF16_TFLOPS``."""
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)


class Device:
    """Synchronisation, peak memory and dtypes of the device the check runs on."""

    def __init__(self, name: str):
        import torch

        self.name, self.cuda = name, name.startswith("cuda")
        self.torch = torch
        self.label = (torch.cuda.get_device_name(name) if self.cuda
                      else f"CPU ({platform.processor() or platform.machine()})")
        self.peak = peak_tflops(self.label) if self.cuda else None
        # bf16 where the GPU has it; float32 on CPU (bf16 autocast there is slower or absent)
        self.weight_dtype = torch.bfloat16 if self.cuda else torch.float32
        self.llm_dtype = torch.float16 if self.cuda else torch.float32

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.name)

    def autocast(self):
        import contextlib

        return self.torch.autocast("cuda", dtype=self.torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def reset_memory(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.name)

    def peak_memory_gb(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.name) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB

    def allocated_gb(self) -> float | None:
        return self.torch.cuda.memory_allocated(self.name) / 1e9 if self.cuda else None

    def memory_kind(self) -> str:
        return ("torch.cuda.max_memory_allocated, reset before each case" if self.cuda
                else "process peak RSS (never reset: the largest case so far)")


def _r(x: float, n: int = 4) -> float:
    """``x`` to ``n`` significant digits (tiny and real-scale figures alike stay non-zero)."""
    return float(f"{x:.{n}g}")


def timed(step, warmup: int, steps: int, dev: Device) -> list[float]:
    """Seconds of ``steps`` calls of ``step`` after ``warmup`` untimed ones, the device synchronised."""
    for _ in range(warmup):
        step()
    dev.sync()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        dev.sync()
        out.append(time.perf_counter() - t)
    return out


class Run:
    """Results, skipped cases and the time budget; the JSON is rewritten after every case."""

    def __init__(self, out: Path, budget_s: float, dev: Device, result: dict):
        self.out, self.budget, self.dev, self.res = Path(out), budget_s, dev, result
        self.t0 = time.perf_counter()
        self.res.setdefault("skipped", [])

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def skip(self, case: str, reason: str) -> None:
        self.res["skipped"].append({"case": case, "reason": reason})
        print(f"  skipped {case}: {reason}", file=sys.stderr, flush=True)
        self.save()

    def attempt(self, case: str, fn):
        """``fn()``'s result, or None with ``case`` recorded as skipped (budget spent, out of memory, error)."""
        if self.elapsed() > self.budget:
            self.skip(case, f"time budget of {self.budget:g} s spent ({self.elapsed():.0f} s elapsed)")
            return None
        try:
            return fn()
        except self.dev.torch.OutOfMemoryError as e:
            self.dev.reset_memory()
            self.skip(case, "out of memory: " + first_line(e)[:300])
        except Exception as e:  # the check goes on: one failing case must not lose the others
            self.dev.reset_memory()
            self.skip(case, f"error: {type(e).__name__}: {first_line(e, '')[:300]}")
        return None

    def save(self) -> None:
        self.res["seconds"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.res, indent=2) + "\n")
        tmp.replace(self.out)


# --------------------------------------------------------------------------- 1. the training step
def batch_cases(run: Run, prefix: str, batches, measure):
    """Yields ``measure(batch)`` for each batch size in increasing order (cases ``prefix/batchB``);
    once one runs out of memory, the larger ones are skipped as not fitting."""
    too_big = None
    for batch in sorted(batches):
        name = f"{prefix}/batch{batch}"
        if too_big is not None:
            run.skip(name, f"batch {too_big} did not fit (out of memory)")
            continue
        n_skipped = len(run.res["skipped"])
        row = run.attempt(name, lambda: measure(batch))
        if row is not None:
            yield row
        elif run.res["skipped"][n_skipped]["reason"].startswith("out of memory"):
            too_big = batch


def build_sd(arch: str, dev: Device, seed: int = 0):
    """UNet (on the device), VAE and text encoder (on the CPU until the online cases) and adapter,
    built from ``cost_model.ARCHS[arch]`` as ``cost_model.build_meta`` builds them, random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from surpipe.adapter import SURAdapter

    a = CM.ARCHS[arch]
    (_, text_cfg, _), = a["text"]  # SD 1.x: one text encoder
    torch.manual_seed(seed)
    with torch.device(dev.name):  # initialised on the GPU: seconds instead of a minute on the host
        unet = UNet2DConditionModel(**a["unet"])
        adapter = SURAdapter(**a["adapter"])
    vae = AutoencoderKL(**a["vae"])
    te = CLIPTextModel(CLIPTextConfig(**text_cfg))
    for m in (unet, vae, te):
        m.requires_grad_(False).eval().to(dev.weight_dtype)
    return unet, vae, te, adapter.train()


def write_store(folder: Path, arch: str, llm_width: int, rows: int, block_rows: int, seed: int = 0) -> Path:
    """A training store of ``rows`` rows at the real widths of ``arch`` (random values, fp16, zstd)."""
    a = CM.ARCHS[arch]
    lat = a["px"] // 8
    act = C.random_activations(8, a["unet"]["cross_attention_dim"], (4, lat, lat), llm_width, a["px"],
                               a["vae"]["scaling_factor"], seed=seed)
    return C.write_store(Path(folder) / "train.zarr", act, rows=rows, block_rows=block_rows)


def loss_config():
    """TrainConfig's loss settings with its defaults, on the paper's gradient path (the UNet's
    backward reaches the adapter: the step the cost model counts)."""
    from surpipe.train.config import TrainConfig

    keys = ("llm_weight", "prompt_weight", "prompt_target", "min_snr_gamma", "noise_offset")
    d = {f.name: f.default for f in fields(TrainConfig) if f.name in keys}
    return SimpleNamespace(**d, gradient_path="paper")


def train_step_check(run: Run, arch: str, batches, warmup: int, steps: int, llm_width: int) -> dict:
    """Store and online steps at each batch size of ``batches``; fills ``run.res["train_step"]``."""
    import torch
    from diffusers import DDPMScheduler

    from surpipe.train.losses import LLMProjection, composed_loss
    from surpipe.tiny import tiny_sd_configs
    from surpipe.train.data import BlockReader, SampleStream
    from surpipe.train.setup import batch_tensors

    dev = run.dev
    a = CM.ARCHS[arch]
    costs = CM.sd_costs(1, arch)  # FLOPs of one sample (every counted op is linear in the batch)
    per_sample = {"store": costs["step_flops"]["from_store"], "online": costs["step_flops"]["online"]}
    unet, vae, te, adapter = build_sd(arch, dev)
    width, px = a["unet"]["cross_attention_dim"], a["px"]
    projection = LLMProjection(llm_width, width, seed=0).to(dev.name)
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    sched = DDPMScheduler(**tiny_sd_configs()["scheduler"])  # SD 1.5's training noise schedule
    lcfg = loss_config()
    gen = torch.Generator().manual_seed(0)
    block_rows = max(batches)
    tmp = tempfile.TemporaryDirectory(prefix="surpipe-gpu-check-")
    store = write_store(Path(tmp.name), arch, llm_width, rows=2 * block_rows, block_rows=block_rows)
    groups = C.store_groups(px)
    inputs = SimpleNamespace(groups=groups, scaling_factor=a["vae"]["scaling_factor"], shift_factor=0.0,
                             resolution=px)
    out = run.res["train_step"] = {
        "arch": arch, "resolution_px": px, "latent_shape": [4, px // 8, px // 8], "gradient_path": "paper",
        "precision": ("frozen models bf16, adapter fp32 under bf16 autocast" if dev.cuda else "float32"),
        "params_M": {k: _r(v / 1e6) for k, v in costs["params"].items()},
        "llm_feature_width": llm_width,
        "cost_model_flops_per_sample": per_sample,
        "cost_model_online_over_store": costs["step_flops"]["online_over_store"],
        "warmup_steps": warmup, "timed_steps": steps, "cases": [],
    }

    def update(b):
        with dev.autocast():
            losses = composed_loss(b, adapter=adapter, projection=projection, unet=unet, scheduler=sched,
                                   generator=gen, cfg=lcfg, prediction_type="epsilon",
                                   weight_dtype=dev.weight_dtype)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses

    data_s: list[float] = []  # store path: read + to tensors on the device, per step

    def store_step_fn(batch):
        # workers=0: reads are serial here, so data_s shows what loader workers would have to hide
        it = iter(SampleStream(BlockReader(str(store), groups, block_rows), batch, seed=0, workers=0))

        def step():
            t = time.perf_counter()
            b = batch_tensors(next(it), inputs, torch.device(dev.name), gen)
            data_s.append(time.perf_counter() - t)
            return update(b)
        return step

    def online_step_fn(batch):
        x = torch.rand(batch, 3, px, px, device=dev.name, dtype=dev.weight_dtype) * 2 - 1
        vocab = te.config.vocab_size
        ids = [torch.randint(0, vocab, (batch, 77), device=dev.name) for _ in range(2)]
        llm = torch.randn(batch, llm_width, device=dev.name)  # from memory, as the authors' prompt2vec dict

        def step():
            with torch.no_grad():
                lat = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
                cs, cc = (te(i)[0].float() for i in ids)
            return update({"latents": lat.float(), "clip_simple": cs, "clip_complex": cc, "llm": llm,
                           "llm_mask": None})
        return step

    def case(path, batch, make):
        opt.zero_grad(set_to_none=True)
        dev.reset_memory()
        data_s.clear()
        ts = timed(make(batch), warmup, steps, dev)
        med = C.median(ts)
        flops = per_sample[path] * batch
        row = {"path": path, "batch": batch, "step_s_median": _r(med), "step_s_all": [_r(t) for t in ts],
               "samples_per_s": _r(batch / med), "peak_memory_GB": _r(dev.peak_memory_gb()),
               "model_tflops_per_step": _r(flops / 1e12), "achieved_tflops": _r(flops / med / 1e12)}
        if data_s:
            row["data_s_median"] = _r(C.median(data_s[-steps:]))
        if dev.peak:
            row["mfu"] = _r(flops / med / (dev.peak * 1e12))
        return row

    for path, make in (("store", store_step_fn), ("online", online_step_fn)):
        if path == "online":  # the encoders join the GPU only now: the store cases' memory holds none
            vae.to(dev.name)
            te.to(dev.name)
        for row in batch_cases(run, f"train_step/{path}", batches, lambda batch: case(path, batch, make)):
            out["cases"].append(row)
            print(f"  train_step/{path}/batch{row['batch']}: {row['samples_per_s']} samples/s, "
                  f"{row['peak_memory_GB']} GB" + (f", MFU {row['mfu']:.1%}" if "mfu" in row else ""),
                  file=sys.stderr, flush=True)
            run.save()
    by = {(r["path"], r["batch"]): r for r in out["cases"]}
    out["online_step_over_store_step"] = {
        str(b): _r(by["online", b]["step_s_median"] / by["store", b]["step_s_median"], 3)
        for b in batches if ("online", b) in by and ("store", b) in by}
    tmp.cleanup()
    run.save()
    return out


# --------------------------------------------------------------------------- 2. LLM extraction
def load_in_memory(cfg, state_dict: dict, quant: str, dev: Device):
    """The base LLaMA from ``state_dict`` with the ``from_pretrained`` arguments of
    ``surpipe.llm.load_llm`` (dtype, BitsAndBytesConfig, device_map; fp32 compute on CPU)."""
    import torch
    from transformers import LlamaModel

    from surpipe.llm.load import _bnb_config

    kwargs = dict(config=cfg, dtype=dev.llm_dtype)
    if quant != "none":
        import bitsandbytes  # noqa: F401  (a missing package is reported as this case's reason)

        compute = dev.llm_dtype if dev.cuda else torch.float32
        kwargs.update(quantization_config=_bnb_config(quant, True, compute), device_map={"": dev.name})
    m = LlamaModel.from_pretrained(None, state_dict=dict(state_dict), **kwargs)
    m.eval().requires_grad_(False)
    if quant == "none":
        m.to(dev.name)
    return m


def llm_check(run: Run, llm_cfg: dict, n_prompts: int, batch_size: int, tokens: int, repeats: int) -> dict:
    """Prompts/s of ``surpipe.llm.extract`` for fp16, int8 and NF4; fills ``run.res["llm_extraction"]``."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from surpipe import llm as L

    dev = run.dev
    L.quiet_libraries()
    cfg = LlamaConfig(**llm_cfg)
    n = cfg.num_hidden_layers
    flops = CM.llm_costs("check", llm_cfg, tokens=tokens)["full_flops_per_prompt"]
    out = run.res["llm_extraction"] = {
        "config": llm_cfg, "tokens_per_prompt": tokens, "prompts": n_prompts, "batch_size": batch_size,
        "repeats": repeats, "layer": n - 1, "layers_run": n, "cost_model_flops_per_prompt": flops, "cases": []}
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev.name):  # random weights made on the device (fast), kept on the host in fp16
        model = LlamaModel(cfg)
    state = {k: v.detach().to(dev.llm_dtype).cpu() for k, v in model.state_dict().items()}  # cast on the device
    model = None  # noqa: F841
    dev.reset_memory()
    out["build_s"] = _r(time.perf_counter() - t)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (n_prompts, tokens), generator=g).tolist()
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=2, unk_token_id=0)  # no padding: equal lengths

    def case(name, quant):
        dev.reset_memory()
        t0 = time.perf_counter()
        m = load_in_memory(cfg, state, quant, dev)
        load_s = time.perf_counter() - t0
        n_bnb = sum(type(x).__name__ in ("Linear8bitLt", "Linear4bit") for x in m.modules())
        if quant != "none" and n_bnb == 0:  # never report fp16 figures under a quantized name
            raise RuntimeError(f"{name}: no bitsandbytes layer in the loaded model")
        llm = L.LoadedLLM(model=m, tokenizer=tok, layers=L.find_decoder_layers(m, n), config=cfg,
                          model_id=f"random LLaMA {cfg.hidden_size}x{n}", num_hidden_layers=n,
                          hidden_size=cfg.hidden_size, device=dev.name, dtype=str(dev.llm_dtype), quant=quant,
                          accepts_position_ids=True)
        weights = dev.allocated_gb()
        L.extract(llm, ids[:batch_size], [n - 1], batch_size=batch_size)  # warm-up
        times = []
        for _ in range(repeats):
            dev.sync()
            t0 = time.perf_counter()
            ex = L.extract(llm, ids, [n - 1], batch_size=batch_size)
            dev.sync()
            times.append(time.perf_counter() - t0)
        dt = min(times)  # the best pass: one extraction is short, a hiccup would dominate it
        row = {"case": name, "quant": quant, "dtype": str(dev.llm_dtype).replace("torch.", ""),
               "seconds": _r(dt), "seconds_all": [_r(x) for x in times], "load_s": _r(load_s),
               "prompts_per_s": _r(n_prompts / dt), "tokens_per_s": _r(ex.real_tokens / dt),
               "peak_memory_GB": _r(dev.peak_memory_gb()), "achieved_tflops": _r(flops * n_prompts / dt / 1e12),
               "features_finite": bool(np.isfinite(ex.pooled[n - 1]).all())}
        if weights is not None:
            row["weights_GB"] = _r(weights)
        if n_bnb:
            row["quantized_linear_layers"] = n_bnb
        if dev.peak:  # against the dense bf16 peak, for every case: int8/NF4 buy memory, not speed
            row["mfu_vs_bf16_peak"] = _r(flops * n_prompts / dt / (dev.peak * 1e12))
        return row

    for name, quant in QUANTS:
        row = run.attempt(f"llm/{name}", lambda: case(name, quant))
        if row is not None:
            out["cases"].append(row)
            print(f"  llm/{name}: {row['prompts_per_s']} prompts/s, {row['peak_memory_GB']} GB",
                  file=sys.stderr, flush=True)
            run.save()
        dev.reset_memory()
    return out


# --------------------------------------------------------------------------- main
def measured(res: dict) -> set[str]:
    """Names of the cases measured so far."""
    names = {f"train_step/{r['path']}/batch{r['batch']}" for r in res.get("train_step", {}).get("cases", [])}
    return names | {f"llm/{r['case']}" for r in res.get("llm_extraction", {}).get("cases", [])}


def guarded(run: Run, cases, part) -> None:
    """``part()``; when its setup fails (a missing package, say), every one of ``cases`` neither
    measured nor skipped yet is skipped with that error, and the check goes on with the next part."""
    try:
        part()
    except Exception as e:
        run.dev.reset_memory()
        done = measured(run.res) | {s["case"] for s in run.res["skipped"]}
        for case in cases:
            if case not in done:
                run.skip(case, f"error before this case: {type(e).__name__}: {first_line(e, '')[:300]}")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "bitsandbytes", "accelerate", "zarr"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON to write [{DEFAULT_OUT.relative_to(C.REPO)}]")
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:I | cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models (the CPU dry run)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop adding cases after this many seconds")
    ap.add_argument("--batches", default="1,8,32", help="training-step batch sizes")
    ap.add_argument("--skip-train", action="store_true", help="leave out the training-step cases")
    ap.add_argument("--skip-llm", action="store_true", help="leave out the LLM cases")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads [--tiny on CPU: 1, else torch's default]")
    args = ap.parse_args(argv)

    import torch

    from surpipe.devices import resolve_device
    from surpipe.errors import SurpipeError

    try:
        name = resolve_device(args.device)
    except SurpipeError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 1
    dev = Device(name)
    threads_before = torch.get_num_threads()
    threads = args.threads or (1 if args.tiny and not dev.cuda else None)
    if threads:  # a shared CPU makes OpenMP's multi-thread waits erratic (100x on tiny models)
        torch.set_num_threads(threads)
    try:
        return _check(args, dev)
    finally:  # main() may run inside another program (tests)
        torch.set_num_threads(threads_before)


def _check(args, dev: Device) -> int:
    import torch

    batches = [int(b) for b in args.batches.split(",") if b]
    if args.tiny:
        register_tiny()
        arch, llm_cfg, llm_width = TINY_ARCH, TINY_LLM, TINY_LLM["hidden_size"]
        warmup, steps, n_prompts, llm_batch, llm_repeats = 1, 2, 64, 16, 1
    else:
        arch, llm_cfg = "sd15", CM.LLAMA["llama-7b"]
        llm_width = CM.LLAMA[CM.LLM_FOR_MEMORY]["hidden_size"]  # the released run's LLM feeds the projection
        warmup, steps, n_prompts, llm_batch, llm_repeats = 3, 6, 512, 32, 3
    if dev.cuda:
        torch.backends.cudnn.benchmark = True
    cmd = "python bench/gpu_check.py" + (f" --device {args.device}" if args.device != "auto" else "") + \
        (" --tiny" if args.tiny else "") + f" --budget-s {args.budget_s:g} --out {args.out}"
    res = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "device": {"name": dev.label, "torch_device": dev.name, "peak_bf16_tflops": dev.peak,
                      "memory": dev.memory_kind(), "torch_threads": torch.get_num_threads(),
                      **({"mfu": f"omitted: no known dense bf16 peak for {dev.label!r}"} if not dev.peak else {})},
           "versions": versions(), "tiny": args.tiny, "budget_s": args.budget_s, "mfu_anchor": MFU_ANCHOR,
           "skipped": []}
    run = Run(args.out, args.budget_s, dev, res)
    run.save()
    if not args.skip_train:
        if run.elapsed() > run.budget:
            for path in ("store", "online"):
                for b in batches:
                    run.skip(f"train_step/{path}/batch{b}", f"time budget of {run.budget:g} s spent")
        else:
            guarded(run, [f"train_step/{p}/batch{b}" for p in ("store", "online") for b in batches],
                    lambda: train_step_check(run, arch, batches, warmup, steps, llm_width))
            dev.reset_memory()  # the SD models went with the function's frame
    if not args.skip_llm:
        if run.elapsed() > run.budget:
            for case, _ in QUANTS:
                run.skip(f"llm/{case}", f"time budget of {run.budget:g} s spent")
        else:
            tokens = CM.llm_costs("x", llm_cfg)["tokens_per_prompt"]  # the cost model's SURD-like length
            guarded(run, [f"llm/{case}" for case, _ in QUANTS],
                    lambda: llm_check(run, llm_cfg, n_prompts, llm_batch, tokens=tokens, repeats=llm_repeats))
    run.save()
    print(summary(res))
    print(f"wrote {args.out}")
    return 0


def summary(d: dict) -> str:
    lines = [f"GPU check on {d['device']['name']} ({d['seconds']} s)"]
    ts = d.get("train_step")
    if ts:
        lines.append(f"{'step':<8}{'batch':>6}{'samples/s':>11}{'step s':>9}{'peak GB':>9}{'MFU':>7}")
        for r in ts["cases"]:
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            lines.append(f"{r['path']:<8}{r['batch']:>6}{r['samples_per_s']:>11}{r['step_s_median']:>9}"
                         f"{r['peak_memory_GB']:>9}{mfu:>7}")
        if ts["online_step_over_store_step"]:
            lines.append("online/store step time: " + ", ".join(
                f"b{k}: {v}x" for k, v in ts["online_step_over_store_step"].items())
                + f" (cost model FLOPs: {ts['cost_model_online_over_store']}x)")
    le = d.get("llm_extraction")
    if le:
        for r in le["cases"]:
            lines.append(f"llm {r['case']:<5} {r['prompts_per_s']:>9} prompts/s {r['peak_memory_GB']:>8} GB")
    for s in d["skipped"]:
        lines.append(f"skipped {s['case']}: {s['reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
