"""``surpipe train``'s own loop timed on one GPU, from the store and online (the authors' way).

    python bench/gpu_train.py [--out bench/results/gpu_train.json] [--budget-s 560]   # one GPU, < 10 min
    python bench/gpu_train.py --cases sdxl --out bench/results/gpu_train_sdxl.json   # what a budget skipped
    python bench/gpu_train.py --dry-run --out /tmp/gpu_train_dry.json                 # CPU, tiny models

Every case runs ``TrainRecipe`` itself (``check`` -> ``setup`` -> ``train``) in a process of its own
(its own peak memory and a fresh compile state; an out-of-memory error or a crash loses that case
only) and reads the loop's own figures from OUT/metrics.jsonl:

* models: the published SD 1.5 architecture at 512 px (bench/cost_model.py's configs, random
  weights) at batch 32 and 8, with and without ``--compile-unet`` (and at batch 32 with
  ``--compile-mode reduce-overhead``: CUDA graphs, and compiled with ``--unet-fp8``: float8 attention
  matmuls, GPUs of compute capability 8.9+ only, MFU still over the bf16 peak); SDXL base 1.0's at 1024 px at the largest batch of
  ``SDXL_BATCHES`` that fits (eager). bf16 mixed precision, loader workers 2,
  batch x 1 accumulation, the adapter at the authors' size, LLM features 5120 wide (LLaMA-13B's).
* store: a store at the real widths written by the store's group writers (``_common.write_store``,
  what stage one writes through), random values: a step's time does not depend on them.
* online: ``OnlineRecipe``, the same recipe whose batch hooks encode every batch on the device: the
  VAE on the batch's images and the text encoder(s) on its simple and its complex prompts, then the
  same loss. Images are synthetic pixel tensors made once (JPEG decode, resize and crop are loader-
  worker work, excluded: assumed hidden behind the step); the prompts are the bundled sample's,
  tokenized once; the LLM features come from the store batch, as the authors' prompt2vec dict did.

Per case: steady-state samples/s and step time (the metrics rows after the warm-up steps, which
hold compilation and autotuning; the loop logs every ``log_every`` steps and meets the host only
then), MFU (cost-model FLOPs of the path's step / step time / the device's dense bf16 peak,
``gpu_check.PEAK_BF16_TFLOPS``), data-wait share, host syncs per step (the warnings of
``torch.cuda.set_sync_debug_mode("warn")`` over the steady steps, with the lines that raised them)
and peak GPU memory; ``store_over_online`` for every pair. Cases run most important first; one
that would not fit in ``--budget-s`` is skipped with its reason; the JSON is rewritten after every case.

``--dry-run``: the same code on the tiny SD and tiny SDXL (``_common.build_sd``), CPU, fp32, batch 2,
no compile, workers 0: MFU, syncs and GPU memory are null there.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (puts the repository on sys.path, sets HF_HUB_OFFLINE)
import cost_model as CM  # noqa: E402
import gpu_check  # noqa: E402

from surpipe.errors import first_line  # noqa: E402
from surpipe.store import DEFAULT_BLOCK_ROWS  # noqa: E402
from surpipe.train.recipe import TrainRecipe  # noqa: E402  (torch-free at import)

DEFAULT_OUT = C.REPO / "bench" / "results" / "gpu_train.json"
SDXL_BATCHES = (16, 8, 4, 2, 1)  # tried in turn: the first that does not run out of memory is kept


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # a key of _common.SD_MODELS
    path: str  # store | online
    batches: tuple  # the batch, or the batches tried largest first
    compile: bool | str = False  # True: --compile-unet; a str: also that --compile-mode
    fp8: bool = False  # --unet-fp8 (with --compile-unet)

    @property
    def pair(self) -> str:
        """The name of the case less its path: a store case and its online twin share it."""
        b = f"batch{self.batches[0]}" if len(self.batches) == 1 else "largest_batch"
        how = "eager" if not self.compile else "compile" if self.compile is True else f"compile-{self.compile}"
        return f"{self.model}/{how}{'-fp8' if self.fp8 else ''}/{b}"

    @property
    def name(self) -> str:
        return f"{self.pair}/{self.path}"


def _pair(model: str, batches: tuple, compile_: bool | str = False, fp8: bool = False) -> list[Case]:
    return [Case(model, path, batches, compile_, fp8) for path in ("store", "online")]


# most important first: a run cut short by its budget or a timeout keeps these
GPU_CASES = (_pair("sd15", (32,), True) + _pair("sd15", (32,)) + _pair("sd15", (32,), True, fp8=True)
             + _pair("sd15", (8,)) + _pair("sdxl", SDXL_BATCHES) + _pair("sd15", (8,), True)
             + _pair("sd15", (32,), "reduce-overhead"))
DRY_CASES = _pair("tiny", (2,)) + _pair("tiny-xl", (2,))

# How each mode runs, per model: pixels, steps (log_every, warm-up steps, timed steps) and store rows,
# enough that no case reaches the end of an epoch (the next starts new loader workers, where a real
# store's epoch is thousands of steps): largest batch x steps, a batch read ahead, whole blocks.
GPU = dict(device="cuda", mixed_precision="bf16", workers=2, llm_width=CM.LLAMA[CM.LLM_FOR_MEMORY]["hidden_size"],
           px={"sd15": 512, "sdxl": 1024}, steps={"sd15": (5, 10, 20), "sdxl": (5, 5, 15)},
           store_rows={"sd15": 1280, "sdxl": 512}, block_rows=DEFAULT_BLOCK_ROWS, threads=None,
           case_timeout_s={False: 180, True: 300},
           # a profile of one more log interval after the timed steps, for the target pair
           profile=("sd15/compile/batch32/",))
DRY = dict(device="cpu", mixed_precision="no", workers=0, llm_width=C.LLM_SIZE["hidden_size"],
           px={"tiny": 32, "tiny-xl": 32}, steps={"tiny": (2, 2, 4), "tiny-xl": (2, 2, 4)},
           store_rows={"tiny": 32, "tiny-xl": 32}, block_rows=8,
           # one torch thread: on a shared CPU OpenMP's multi-thread waits make tiny steps erratic (gpu_check)
           threads=1, case_timeout_s={False: 120, True: 300}, profile=("tiny/eager/batch2/store",))
# Rough seconds a case takes (process start, model load, warm-up, steps), to skip one that cannot
# finish in the time left: torch.compile of the SD 1.5 UNet took 91.5 s on an H200
# (bench/results/unet_step_h200_compile.json); SDXL may try two batches. BUILD_S: a model folder
# (random init on the host, 3.4 / 10.3 GB of fp32 written) and its store, once per run.
NEED_S = {"sd15": {False: 35, True: 150}, "sdxl": {False: 120, True: 400}}
BUILD_S = {"sd15": 30, "sdxl": 120}

NOTES = {
    "compile_grad_distance": "--compile-unet cases: the relative distance of the compiled UNet's gradient for the "
                             "adapter's output to the eager UNet's, measured by the run's first-step check "
                             "(surpipe/train/compile_check.py; a run beyond its tolerance stops)",
    "timing": "steady state: the metrics.jsonl rows after the warm-up steps; a row's step_s is the mean step of its "
              "log interval (wall time between the loop's sync points), so compilation, autotuning and the final "
              "checkpoint are outside it",
    "data_wait": "data_wait_share = mean data_wait_s / mean step_s over the steady rows; a row's data_wait_s (and "
                 "the other *_s host times) is its log interval's mean, as its step_s is; online it includes "
                 "queueing the encoders (the recipe times its batch hooks as data wait)",
    "host_syncs": "torch.cuda.set_sync_debug_mode('warn') during the loop: its 'called a synchronizing CUDA "
                  "operation' warnings over the steady steps (each sync point's read included), divided by those "
                  "steps; host_sync_sites: where they were raised. A non_blocking copy from pageable memory stalls "
                  "without a warning: the loop's copies start from pinned memory (surpipe.devices.to_device)",
    "online": "OnlineRecipe: VAE encode of a pre-made pixel batch (JPEG decode, resize, crop excluded: loader-worker "
              "work, assumed hidden) and the text encoder(s) on the simple and the complex prompt (token ids made "
              "once), on the device, every step; LLM features from the store batch; the same loss and update",
    "store": "random values at the real widths written by _common.write_store (the store's group writers)",
    "mfu": "cost model FLOPs of the path's step (bench/cost_model.py sd_costs, matmuls/convolutions/attention) / "
           "steady step_s / the device's dense bf16 peak (gpu_check.PEAK_BF16_TFLOPS); null without a known peak",
    "peak_memory_GB": "torch.cuda.max_memory_allocated over the loop, models included (null on CPU)",
    "profile": "the cases named in settings.profile train one log interval more after the timed steps, under "
               "torch.profiler (its first step a warm-up): top ops by self time (kernels on a GPU), and on a GPU the "
               "device's busy share between its first and last kernel (annotations excluded) and the largest idle "
               "gaps; the run's final checkpoint falls in its last step",
}


# --------------------------------------------------------------------------- the online recipe
class OnlineRecipe(TrainRecipe):
    """``TrainRecipe`` with the authors' online batches: ``_stage`` starts a batch's inputs on their
    way to the device (what a loader delivers: pixels, token ids, the LLM features), ``_complete``
    runs the VAE and the text encoder(s) on them. The loop, loss and update are the recipe's own."""

    def __init__(self, cfg, px: int):
        super().__init__(cfg)
        self.px = px  # of the images the VAE encodes (the store's resolution)

    def setup(self, inputs=None) -> None:
        super().setup(inputs)
        self.online = OnlineEncoders(self.cfg.model, self.device, self.weight_dtype, self.px, self.cfg.batch_size)

    def _stage(self, batch):
        return self.online.stage(batch)

    def _complete(self, staged):
        return self.online.encode(staged)

    def _batch_to_tensors(self, batch):
        # the recipe before its _stage/_complete split calls only this, with the store batch
        return self._complete(batch if "pixels" in batch else self._stage(batch))


class OnlineEncoders:
    """The VAE encoder and the text encoder(s) of pipeline folder ``model`` on ``device`` in
    ``dtype``, with one batch of inputs made on the host once (pinned on CUDA)."""

    def __init__(self, model: str, device, dtype, px: int, batch: int):
        import torch

        from surpipe import sd
        from surpipe.sd import xl as sdxl

        self.torch, self.device, self.px = torch, device, px
        self.xl = sd.check_pipeline_class(model, None, accept=("sd", "sdxl")) == "sdxl"
        te = (sdxl.load_text_encoders_xl if self.xl else sd.load_text_encoder)(model, dtype=dtype, device=str(device))
        self.text = te.models if self.xl else (te.model,)
        self.vae = sd.load_vae_encoder(model, dtype=dtype, device=str(device))
        pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)
        rows = C.sample_rows()
        self.host = {"pixels": pin(torch.rand(batch, 3, px, px, generator=torch.Generator().manual_seed(0)) * 2 - 1)}
        for which in ("simple", "complex"):
            prompts = [getattr(rows[i % len(rows)], which) for i in range(batch)]
            for i, tok in enumerate(te.tokenizers if self.xl else (te.tokenizer,)):
                self.host[f"{which}_{i}"] = pin(tok(prompts, padding="max_length", max_length=te.max_length,
                                                    truncation=True, return_tensors="pt").input_ids)
        self.encodes = 0  # batches encoded: one per step

    def stage(self, batch: dict) -> dict:
        from surpipe.devices import to_device
        from surpipe.train.losses import sdxl_time_ids

        torch = self.torch
        staged = {k: to_device(v, self.device) for k, v in self.host.items()}
        staged["llm"] = to_device(torch.from_numpy(batch["llm"]), self.device).float()
        matched = batch.get("llm_matched")
        staged["llm_mask"] = (None if matched is None or matched.all()
                              else to_device(torch.from_numpy(matched).bool(), self.device))
        if self.xl:  # the time ids of the batch's rows (no flip: the pixels are not flipped)
            staged["time_ids"] = to_device(sdxl_time_ids(torch.from_numpy(batch["original_size"]),
                                                         torch.from_numpy(batch["crop_top_left"]).long(), self.px),
                                           self.device)
        return staged

    def _text(self, staged: dict, which: str):
        """(embeddings, pooled or None) of one prompt side, as surpipe.sd encodes them: SD's last
        hidden state; SDXL's two penultimate hidden states side by side and the projected pooled output."""
        hidden, pooled = [], None
        for i, enc in enumerate(self.text):
            out = enc(staged[f"{which}_{i}"], output_hidden_states=self.xl)
            hidden.append(out.hidden_states[-2] if self.xl else out[0])
            if out[0].ndim == 2:
                pooled = out[0]
        return self.torch.cat(hidden, dim=-1).float(), pooled

    def encode(self, staged: dict) -> dict:
        """The dict ``TrainRecipe.loss`` takes, encoded from ``staged`` on the device."""
        vae = self.vae
        with self.torch.no_grad():
            dist = vae.model.encode(staged["pixels"].to(vae.model.dtype)).latent_dist
            latents = (dist.sample() - (vae.shift_factor or 0.0)) * vae.scaling_factor
            (cs, ps), (cc, pc) = self._text(staged, "simple"), self._text(staged, "complex")
        self.encodes += 1
        out = {"latents": latents.float(), "clip_simple": cs, "clip_complex": cc, "llm": staged["llm"],
               "llm_mask": staged["llm_mask"], "share": None}
        if self.xl:
            out.update(pooled=ps.float(), pooled_complex=pc.float(), time_ids=staged["time_ids"])
        return out


# --------------------------------------------------------------------------- one case, in its own process
class SyncCounter:
    """Counts the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` by the step the recipe is
    at, and the source lines that raised them."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self, recipe):
        self.recipe, self.sites = recipe, collections.Counter()  # (step, "file:line") -> count

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if str(message).startswith(self.MESSAGE):
            self.sites[self.recipe.step, _site(filename, lineno)] += 1
        else:
            self._show_other(message, category, filename, lineno, file, line)

    @contextlib.contextmanager
    def watching(self, debug_mode: bool = True):
        """Count while inside; ``debug_mode=False`` leaves torch's mode alone (tests emit the warnings)."""
        import torch

        with warnings.catch_warnings():  # restores the filters and showwarning on exit
            warnings.filterwarnings("always", message=self.MESSAGE)  # not once per source line
            self._show_other, warnings.showwarning = warnings.showwarning, self._show
            if debug_mode:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield self
            finally:
                if debug_mode:
                    torch.cuda.set_sync_debug_mode("default")

    def steady(self, first: int, last: int) -> tuple[float, dict]:
        """(syncs per step, {site: count}) while the recipe was at steps ``first`` to ``last - 1``:
        the work of steps first + 1 to last and the sync points of steps first to last - 1 (the one
        of step ``last`` joins its checkpoint, left out)."""
        sites = collections.Counter()
        for (step, site), n in self.sites.items():
            if first <= step < last:
                sites[site] += n
        return sum(sites.values()) / (last - first), dict(sites.most_common(8))


def _site(filename: str, lineno: int) -> str:
    parts = Path(filename).parts
    cut = max((i + 1 for i, p in enumerate(parts) if p in ("site-packages", C.REPO.name)), default=0)
    return f"{'/'.join(parts[cut:]) or filename}:{lineno}"


def train_config(spec: dict):
    """The case's TrainConfig: train_step's (store, model, adapter size, no checkpoints before the
    last step, no progress bar, no loss curve) with this bench's device, precision and logging."""
    import train_step

    cfg = train_step._cfg(spec["store"], spec["model"], spec["out"], spec["kind"], spec["batch"], spec["workers"],
                          spec["max_steps"])
    return dataclasses.replace(cfg, device=spec["device"], mixed_precision=spec["mixed_precision"],
                               compile_unet=bool(spec["compile"]), log_every=spec["log_every"],
                               compile_mode=spec["compile"] if isinstance(spec["compile"], str) else "default",
                               unet_fp8=spec.get("fp8", False))


def case_main(spec: dict) -> dict:
    """Set up and train one case; its metrics rows, host syncs, peak memory and device."""
    import torch

    cfg = train_config(spec)
    recipe = OnlineRecipe(cfg, spec["px"]) if spec["path"] == "online" else TrainRecipe(cfg)
    recipe.check()
    recipe.setup()
    cuda = recipe.device.type == "cuda"
    out = {"device_name": (torch.cuda.get_device_name(recipe.device) if cuda
                           else f"CPU ({platform.processor() or platform.machine()})"),
           "recipe": type(recipe).__name__, "weight_dtype": str(recipe.weight_dtype).replace("torch.", "")}
    counter = SyncCounter(recipe)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with counter.watching() if cuda else contextlib.nullcontext(), profiled(recipe, spec, cuda) as prof:
        recipe.train()
    rows = [json.loads(line) for line in recipe.run.metrics.read_text().splitlines() if line.strip()]
    out["rows"] = [r for r in rows if "step_s" in r]
    # --compile-unet's first-step check: the compiled UNet's conditioning gradient against the eager one's
    out["compile_grad_distance"] = getattr(recipe.loss_unet, "distance", None)
    if prof is not None:
        out["profile"] = profile_summary(prof, cuda)
    if cuda:
        out["syncs_per_step"], out["sync_sites"] = counter.steady(spec["warm_steps"], spec["timed_until"])
        out["peak_memory_GB"] = torch.cuda.max_memory_allocated(recipe.device) / 1e9
    if spec["path"] == "online":
        out["online_encodes"] = recipe.online.encodes
    return out


@contextlib.contextmanager
def profiled(recipe, spec: dict, cuda: bool):
    """With ``spec["profile"]``: torch's profiler over the log interval that follows the timed steps
    (its first step a profiler warm-up), so the timed figures are not slowed by it; yields None otherwise."""
    if not spec["profile"]:
        yield None
        return
    import torch.profiler as tp

    acts = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if cuda else [])
    sched = tp.schedule(wait=spec["timed_until"], warmup=1, active=spec["max_steps"] - spec["timed_until"] - 1)
    after = recipe._after_step
    with tp.profile(activities=acts, schedule=sched) as prof:
        recipe._after_step = lambda logger: (after(logger), prof.step())[0]  # one profiler step per train step
        try:
            yield prof
        finally:
            recipe._after_step = after


def profile_summary(prof, cuda: bool, top: int = 12) -> dict:
    """The profiled steps in short: the ops (kernels on a GPU) that took the most time, and on a GPU
    how busy the device was between its first and last kernel, with the largest idle gaps."""
    from torch.autograd import DeviceType

    def kernel(e) -> bool:
        # a CPU op's self device time is its kernels' again, and annotations (ProfilerStep#N, compiled
        # regions) are device events that span whole steps: only the kernels' own rows count
        return e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)

    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    avgs = [e for e in prof.key_averages() if (kernel(e) or not cuda) and getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in avgs) or 1.0
    out = {"time": "device" if cuda else "cpu", "total_ms": round(total / 1e3, 3),
           "top": [{"name": e.key[:90], "calls": e.count, "ms": round(getattr(e, attr) / 1e3, 3),
                    "share": round(getattr(e, attr) / total, 4)}
                   for e in sorted(avgs, key=lambda e: getattr(e, attr), reverse=True)[:top]]}
    if cuda:
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if kernel(e))
        if spans:
            busy, gaps, first, end = 0.0, [], spans[0][0], spans[0][0]
            for a, b in spans:  # the union of the kernels' intervals (us) and the gaps between its parts
                if a > end:
                    gaps.append(a - end)
                busy += max(0.0, b - max(a, end))
                end = max(end, b)
            out.update(device_busy_share=round(busy / max(end - first, 1e-9), 4),
                       idle_ms=round((end - first - busy) / 1e3, 3),
                       largest_gaps_ms=[round(g / 1e3, 3) for g in sorted(gaps, reverse=True)[:5]])
    return out


def worker(spec_file: str) -> int:
    """``--case SPEC``: one case; its result (or why none) is written to ``spec["result"]``."""
    import torch

    spec = json.loads(Path(spec_file).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    try:
        res = case_main(spec)
    except Exception as e:  # out of memory: the parent tries the next batch; else the case is skipped with this
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()  # cuBLAS/cuDNN words it so
        if not oom:
            import traceback

            traceback.print_exc()
        res = {"oom" if oom else "error": f"{type(e).__name__}: {first_line(e, '')[:300]}"}
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


# --------------------------------------------------------------------------- the parent
def write_random_store(path: Path, mdir: Path, px: int, llm_width: int, rows: int, block_rows: int) -> Path:
    """A training store at the widths of pipeline folder ``mdir`` at ``px`` pixels (random values)."""
    def config(sub):
        return json.loads((Path(mdir) / sub / "config.json").read_text())

    unet, vae = config("unet"), config("vae")
    lat = px // 2 ** (len(vae["block_out_channels"]) - 1)
    pooled = config("text_encoder_2")["projection_dim"] if unet.get("addition_embed_type") == "text_time" else 0
    act = C.random_activations(8, unet["cross_attention_dim"], (unet["in_channels"], lat, lat), llm_width, px,
                               vae.get("scaling_factor", 0.18215), pooled)
    return C.write_store(path, act, rows=rows, block_rows=block_rows)


def spawn(spec: dict, tmp: Path, timeout_s: float) -> dict:
    """Run one case in a new process group (its loader workers end with it), ended after ``timeout_s``
    or when this process is interrupted (``timeout`` in gpu_all.sh signals this process only)."""
    name = spec["name"].replace("/", "-")
    spec = dict(spec, result=str(tmp / f"{name}.result.json"))
    (tmp / f"{name}.json").write_text(json.dumps(spec))
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--case", str(tmp / f"{name}.json")],
                         start_new_session=True)
    try:
        p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    result = Path(spec["result"])
    if not result.is_file():
        return {"error": f"the case's process ended with exit code {p.returncode} and no result"}
    return json.loads(result.read_text())


def figures(got: dict, batch: int, warm_steps: int, flops_per_sample: float | None, peak: float | None,
            timed_until: int | None = None) -> dict:
    """A case's reported figures from its process's result (steady rows: past ``warm_steps``, up to
    ``timed_until``; the profiled steps after it are not timed)."""
    rows = got["rows"]
    timed_until = timed_until or rows[-1]["step"]
    steady = [r for r in rows if warm_steps < r["step"] <= timed_until]
    step_s = sum(r["step_s"] for r in steady) / len(steady)  # equal intervals: the steady steps' mean
    host = sorted(k for k in steady[0] if k.endswith("_s") and k not in ("step_s", "samples_per_s"))
    flops = flops_per_sample * batch if flops_per_sample else None
    _r = gpu_check._r
    return {
        "batch": batch, "steady_steps": timed_until - warm_steps,
        "step_s": _r(step_s), "samples_per_s": _r(batch / step_s),
        "step_s_rows": [_r(r["step_s"]) for r in steady],
        "model_tflops_per_step": _r(flops / 1e12) if flops else None,
        "achieved_tflops": _r(flops / step_s / 1e12) if flops else None,
        "mfu": _r(flops / step_s / (peak * 1e12)) if flops and peak else None,
        "data_wait_share": _r(sum(r["data_wait_s"] for r in steady) / len(steady) / step_s),
        "host_s_per_step": {k[:-2]: _r(sum(r[k] for r in steady) / len(steady)) for k in host},
        "host_syncs_per_step": _r(got["syncs_per_step"]) if "syncs_per_step" in got else None,
        "host_sync_sites": got.get("sync_sites"),
        "peak_memory_GB": _r(got["peak_memory_GB"]) if "peak_memory_GB" in got else None,
        "metrics_rows": len(rows), "losses_finite": all(math.isfinite(r["loss"]) for r in rows),
        "loss_last": rows[-1]["loss"], "recipe": got["recipe"], "weight_dtype": got["weight_dtype"],
        "compile_grad_distance": got.get("compile_grad_distance"),
        **({"online_encodes": got["online_encodes"]} if "online_encodes" in got else {}),
        **({"profile": got["profile"]} if "profile" in got else {}),
    }


class Bench:
    """The run: models and stores built once each, cases in order while the budget allows."""

    def __init__(self, mode: dict, run: "gpu_check.Run", tmp: Path, cache: Path):
        self.mode, self.run, self.tmp, self.cache = mode, run, tmp, cache
        self.built: dict = {}  # model -> (folder, store)
        self.flops: dict = {}  # model -> {path: FLOPs per sample} or None
        self.fitted: dict = {}  # pair -> the batch its store case ran at (the online twin tries no larger)

    def model(self, kind: str):
        if kind not in self.built:
            t0, px = time.perf_counter(), self.mode["px"][kind]
            mdir = C.build_sd(kind, self.cache / f"sd-{kind}")
            store = write_random_store(self.tmp / f"{kind}-{px}.zarr", mdir, px, self.mode["llm_width"],
                                       self.mode["store_rows"][kind], self.mode["block_rows"])
            self.built[kind] = (mdir, store)
            self.run.res["models"][kind] = {"px": px, "build_s": round(time.perf_counter() - t0, 1)}
        return self.built[kind]

    def flops_per_sample(self, kind: str):
        """The cost model's FLOPs of one sample's step by path (linear in the batch); None for a
        model it has no published architecture of."""
        arch = C.SD_MODELS[kind].get("published")
        if kind not in self.flops:
            sf = CM.sd_costs(1, arch, px=self.mode["px"][kind])["step_flops"] if arch else None
            self.flops[kind] = sf and {"store": sf["from_store"], "online": sf["online"]}
            self.run.res["models"][kind]["cost_model_flops_per_sample"] = self.flops[kind]
        return self.flops[kind]

    def spec(self, case: Case, batch: int) -> dict:
        """What the case's process runs (``case_main``)."""
        mdir, store = self.model(case.model)
        log_every, warm, timed = self.mode["steps"][case.model]
        profile = any(k in case.name for k in self.mode["profile"])
        m = self.mode
        return dict(name=f"{case.name}-b{batch}", kind=case.model, model=str(mdir), store=str(store),
                    out=str(self.tmp / f"run-{case.name}-b{batch}".replace("/", "-")), path=case.path, batch=batch,
                    compile=case.compile, fp8=case.fp8, px=m["px"][case.model], device=m["device"],
                    mixed_precision=m["mixed_precision"], workers=m["workers"], threads=m["threads"],
                    log_every=log_every, warm_steps=warm, timed_until=warm + timed, profile=profile,
                    max_steps=warm + timed + (log_every if profile else 0))

    def case(self, case: Case) -> None:
        """Measure ``case`` (at the first of its batches that fits) or record why not."""
        need = NEED_S.get(case.model, {}).get(bool(case.compile), 0) + (0 if case.model in self.built
                                                                   else BUILD_S.get(case.model, 0))
        left = self.run.budget - self.run.elapsed()
        if left < need:
            return self.run.skip(case.name, f"time budget: {left:.0f} s of {self.run.budget:g} s left, the case "
                                            f"needs about {need} s")
        t0 = time.perf_counter()
        self.model(case.model)  # the model's first case: built now, in this case's seconds
        fl = self.flops_per_sample(case.model)
        limit = self.mode["case_timeout_s"][bool(case.compile)]
        tried = []
        for batch in [b for b in case.batches if b <= self.fitted.get(case.pair, b)]:
            left = self.run.budget - self.run.elapsed()
            if left < 5:
                return self.run.skip(case.name, f"time budget of {self.run.budget:g} s spent (tried {tried})")
            spec = self.spec(case, batch)
            got = spawn(spec, self.tmp, min(limit, left))
            if "oom" in got:
                tried.append(f"{batch}: out of memory")
                continue
            if "error" in got:
                return self.run.skip(case.name, f"batch {batch}: {got['error']}")
            dev = self.run.res["device"]
            if dev["name"] is None:
                dev.update(name=got["device_name"], peak_bf16_tflops=gpu_check.peak_tflops(got["device_name"])
                           if self.mode["device"] == "cuda" else None)
            row = {"case": case.name, "model": case.model, "px": spec["px"], "path": case.path,
                   "compile": case.compile, "unet_fp8": case.fp8, "mixed_precision": self.mode["mixed_precision"],
                   "workers": self.mode["workers"], "log_every": spec["log_every"], "warm_up_steps": spec["warm_steps"],
                   **figures(got, batch, spec["warm_steps"], fl and fl[case.path], dev["peak_bf16_tflops"],
                             spec["timed_until"]),
                   "batches_tried": tried + [f"{batch}: ran"], "seconds": round(time.perf_counter() - t0, 1)}
            self.fitted[case.pair] = batch
            self.run.res["cases"].append(row)
            print(f"  {case.name}: batch {batch}, {row['samples_per_s']} samples/s, "
                  f"wait {row['data_wait_share']:.0%}", file=sys.stderr, flush=True)
            self.run.res["store_over_online"] = store_over_online(self.run.res["cases"])
            return self.run.save()
        self.run.skip(case.name, f"no batch fitted ({'; '.join(tried)})")


def store_over_online(cases: list[dict]) -> dict:
    """Store samples/s over online samples/s for every pair measured (SDXL: each at its largest batch)."""
    by = {(r["case"].rsplit("/", 1)[0], r["path"]): r for r in cases}
    return {pair: gpu_check._r(by[pair, "store"]["samples_per_s"] / by[pair, "online"]["samples_per_s"], 3)
            for pair, path in by if path == "store" and (pair, "online") in by}


def default_out(dry: bool) -> Path:
    return Path(tempfile.gettempdir()) / "gpu_train_dry.json" if dry else DEFAULT_OUT


def run(dry: bool = False, out: Path | None = None, budget_s: float = 560.0, cache: Path | None = None,
        only=None, command: str = "") -> dict:
    """Every case of the mode in order (``only``: those whose name holds one of these strings);
    returns the result, also written to ``out`` after every case."""
    import torch

    mode = DRY if dry else GPU
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_train: no CUDA device (a CPU run is --dry-run)")
    res = {"command": command, "dry_run": dry, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "device": {"name": None, "torch_device": mode["device"], "peak_bf16_tflops": None},
           "host": C.host_info(), "versions": gpu_check.versions(), "budget_s": budget_s,
           "settings": {k: v for k, v in mode.items() if k not in ("case_timeout_s",)}, "notes": NOTES,
           "mfu_anchor": gpu_check.MFU_ANCHOR, "models": {}, "cases": [], "store_over_online": {}, "skipped": []}
    r = gpu_check.Run(out or default_out(dry), budget_s, None, res)
    r.save()
    with tempfile.TemporaryDirectory(prefix="surpipe-gpu-train-") as tmp:
        bench = Bench(mode, r, Path(tmp), Path(cache) if cache else Path(tmp) / "cache")
        for case in DRY_CASES if dry else GPU_CASES:
            if not only or any(k in case.name for k in only):
                bench.case(case)
    r.save()
    return res


def summary(d: dict) -> list[tuple[str, str]]:
    rows = [("device", f"{d['device']['name']} (peak bf16 {d['device']['peak_bf16_tflops']} TFLOP/s)")]
    for c in d["cases"]:
        mfu = f", MFU {c['mfu']:.1%}" if c["mfu"] is not None else ""
        mem = f", {c['peak_memory_GB']} GB" if c["peak_memory_GB"] is not None else ""
        syncs = f", {c['host_syncs_per_step']} syncs/step" if c["host_syncs_per_step"] is not None else ""
        rows.append((f"train loop {c['case']} (B={c['batch']}): samples/s",
                     f"{c['samples_per_s']}{mfu}, wait {c['data_wait_share']:.0%}{syncs}{mem}"))
    rows += [(f"train loop {pair}: store over online samples/s", f"{v}x") for pair, v in d["store_over_online"].items()]
    rows += [(f"skipped {s['case']}", s["reason"]) for s in d["skipped"]]
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--case"]:  # internal: one case in its own process
        return worker(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON to write [{DEFAULT_OUT.relative_to(C.REPO)}; --dry-run: a temporary file]")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, fp32 (the test)")
    ap.add_argument("--budget-s", type=float, default=560.0, help="start no case that would end after this")
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep the built model folders in")
    ap.add_argument("--cases", default=None,
                    help="comma list: run only the cases whose name holds one (e.g. sd15/eager/batch32, sdxl)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds spawn(), which ends the running case
    out = args.out or default_out(args.dry_run)
    cmd = (f"python bench/gpu_train.py{' --dry-run' if args.dry_run else ''} --budget-s {args.budget_s:g}"
           + (f" --cases {args.cases}" if args.cases else "") + f" --out {out}")
    d = run(args.dry_run, out, args.budget_s, args.cache, args.cases and args.cases.split(","), command=cmd)
    return C.write_result(d, str(out), cmd, summary)


if __name__ == "__main__":
    sys.exit(main())
