"""Stage-two step time from the feature store against the authors' online way, in one run.

    python bench/train_step.py [--quick] --out FILE.json [--models tiny,mid,sd15,sdxl] [--cache DIR]

Both paths use the SAME TrainRecipe (same adapter, frozen UNet, projection, optimizer and
``TrainRecipe.loss``), the same batch size and the same optimizer step (backward, grad-norm clip,
AdamW step). They differ only in where the batch comes from:

* store: ``SampleStream`` (block reads from the Zarr store, workers=0 in this loop) ->
  ``TrainRecipe._batch_to_tensors`` (latent sample from the stored mean/std, flip choice);
* online (the authors' way): decode the image files of the batch, resize + center-crop (+ random
  flip), ``vae.encode(x).latent_dist.sample() * scaling_factor``, CLIP text encoder on the simple
  AND the complex prompts (``surpipe.sd``: the encode-latents code path, pipeline-exact
  tokenization); the LLM features come from memory, as the authors' prompt2vec dict did.

Steps of the two paths alternate in rounds (noisy machine), and medians are reported. A second
measurement runs ``TrainRecipe.train()`` itself (the real loop, workers 0 and 2) and reads
``data_wait_s`` / ``step_s`` from its metrics.jsonl: the share of step time spent waiting for data.

``--models sd15`` (``bench_arch``): the published SD 1.5 architecture with random weights, 512 px,
batch 1. Each path runs in its own worker process (``--worker``, internal) so that each peak RSS is
that path's own; the parent alternates one store step and one online step per round. Reported: the
whole-step and by-parts ratios (``derive``), the step split into loss forward / backward / AdamW,
the peak RSS of both processes and the batch the store path's saving buys, beside
bench/cost_model.py's FLOP predictions. No train-loop measurement (too slow on a CPU).

``--models sdxl``: the same for SDXL base 1.0's architecture (UNet 2.57 B, VAE, CLIP ViT-L text +
OpenCLIP bigG text with projection; adapter 2048 wide), at 512 px (latents 4x64x64; 1024 px is too
slow on a CPU), batch 1, fp32: the store path trains with the stored pooled embeddings and the time
ids built from the stored micro-conditioning, the online path runs the VAE and both text encoders
on both prompts and builds the same conditioning. Where both processes' models do not fit in memory
together, the paths run one after the other (``_schedule``, said in the JSON's ``paths_run``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402

import _common as C  # noqa: E402

QUICK = dict(models=("tiny",), rows={"tiny": 64, "mid": 8}, batch={"tiny": 4, "mid": 2},
             rounds=3, per_round=2, train_steps=6, store_rows=256, train_workers=(0, 2),
             # --models sd15 (published architecture, one process per path): 512 px, batch 1; rounds
             # stop early when the next would pass budget_s (whole sd15 run, build included)
             arch=dict(rows=2, batch=1, rounds=3, store_rows=64, budget_s=540,
                       # sdxl: 2.6 B UNet, paths one after the other (bench_arch), whole run in 12 min
                       budget_s_by_model={"sdxl": 660}))
FULL = dict(models=("tiny", "mid"), rows={"tiny": None, "mid": None}, batch={"tiny": 8, "mid": 4},
            rounds=6, per_round=3, train_steps=30, store_rows=2048, train_workers=(0, 1, 2),
            arch=dict(rows=8, batch=1, rounds=6, store_rows=256, budget_s=3600, budget_s_by_model={"sdxl": 5400}))


def _cfg(store, mdir, out, kind, batch, workers, max_steps):
    from surpipe.train.config import TrainConfig

    return TrainConfig(store=str(store), model=str(mdir), out=str(out), llm_layer=3, batch_size=batch,
                       grad_accum=1, workers=workers, device="cpu", progress=False, loss_curve=False,
                       checkpoint_every=10 ** 6, max_steps=max_steps, **C.SD_MODELS[kind]["adapter"])


def _optimise(recipe, b) -> tuple[float, float, float]:
    """Loss forward, backward, clip + AdamW step of the batch ``b``: their seconds."""
    params = recipe.optimizer.param_groups[0]["params"]
    t0 = time.perf_counter()
    with recipe.accelerator.autocast():
        losses = recipe.loss(b)
    t1 = time.perf_counter()
    recipe.accelerator.backward(losses["loss"])
    t2 = time.perf_counter()
    recipe.accelerator.clip_grad_norm_(params, 1.0)
    recipe.optimizer.step()
    recipe.optimizer.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


_LOSS_PARTS = ("loss_forward", "backward", "optimizer")


def store_stepper(recipe, store: Path, batch: int):
    """The store path's step (``SampleStream`` block reads, workers 0 -> ``_batch_to_tensors`` ->
    loss, backward, AdamW) and the dict of its parts' seconds, one list per part."""
    from surpipe.train.data import BlockReader, SampleStream

    it = iter(SampleStream(BlockReader(str(store), recipe.groups, 64), batch, seed=0, workers=0))
    parts = {k: [] for k in ("read_batch", "to_tensors", *_LOSS_PARTS, "loss_backward_opt")}

    def step():
        t0 = time.perf_counter()
        raw = next(it)
        t1 = time.perf_counter()
        b = recipe._batch_to_tensors(raw)
        t2 = time.perf_counter()
        f, bw, o = _optimise(recipe, b)
        for k, v in zip(parts, (t1 - t0, t2 - t1, f, bw, o, f + bw + o)):
            parts[k].append(v)

    return step, parts


def online_stepper(recipe, mdir: Path, llm: np.ndarray, batch: int, resolution: int | None = None):
    """The authors' online step (decode + resize/crop/flip, VAE encode -> latent sample, CLIP on the
    simple and the complex prompt, LLM features from memory, then the same loss/backward/AdamW as
    the store path), its parts' seconds, and the loaded (text encoder, VAE encoder).

    SDXL (a StableDiffusionXLPipeline folder): both text encoders on both prompts (``clip_2x``: the
    embeddings and the pooled embeddings), and the micro-conditioning of each decoded image turned
    into time ids as training does (``sdxl_conditioning``, after the flip). ``resolution``: None for
    the pipeline's default."""
    import torch

    from surpipe import sd
    from surpipe.sd import xl as sdxl
    from surpipe.train.setup import sdxl_conditioning

    xl = sd.check_pipeline_class(str(mdir), None, accept=("sd", "sdxl")) == "sdxl"
    te = sdxl.load_text_encoders_xl(str(mdir)) if xl else sd.load_text_encoder(str(mdir))
    vae = sd.load_vae_encoder(str(mdir))
    res = resolution or sd.default_resolution(str(mdir), None, vae)
    samples = C.sample_rows()
    llm_cache = {s.simple: llm[i % len(llm)] for i, s in enumerate(samples)}
    gen = torch.Generator().manual_seed(0)
    pos = {"i": 0}
    parts = {k: [] for k in ("decode_preprocess", "vae_encode", "clip_2x", *_LOSS_PARTS, "loss_backward_opt")}

    def step():
        idx = [(pos["i"] + j) % len(samples) for j in range(batch)]
        pos["i"] += batch
        part = [samples[i] for i in idx]
        t0 = time.perf_counter()
        images = [s.image() for s in part]
        x = torch.stack([sd.preprocess(im, res) for im in images])
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), torch.flip(x, dims=[-1]), x)
        micro = sdxl.micro_conditioning_rows([im.size for im in images], res) if xl else None
        t1 = time.perf_counter()
        mean, std = (t.clone() for t in sd.encode_latent_dist(vae, x))  # out of inference mode
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * vae.scaling_factor
        t2 = time.perf_counter()
        if xl:
            (cs, ps), (cc, pc) = (sdxl.encode_prompts_xl(te, [getattr(s, w) for s in part]) for w in ("simple", "complex"))
            cond = sdxl_conditioning({"original_size": micro[0], "crop_top_left": micro[1], "pooled_simple": ps.numpy(),
                                      "pooled_complex": pc.numpy()}, flip, res)
        else:
            cs, cc = (sd.encode_prompts(te, [getattr(s, w) for s in part]) for w in ("simple", "complex"))
            cond = {}
        cs, cc = cs.clone(), cc.clone()
        t3 = time.perf_counter()
        b = {"latents": latents, "clip_simple": cs, "clip_complex": cc,
             "llm": torch.from_numpy(np.stack([llm_cache[s.simple] for s in part])).float(), **cond}
        f, bw, o = _optimise(recipe, b)
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, f, bw, o, f + bw + o)):
            parts[k].append(v)

    return step, parts, (te, vae)


def bench_model(kind: str, tmp: Path, cache: Path, rows, batch: int, rounds: int, per_round: int,
                train_steps: int, store_rows: int, train_workers) -> dict:
    from surpipe.train.recipe import TrainRecipe

    t_model = time.perf_counter()
    mdir, act = C.cached_model_and_activations(kind, cache, rows)
    store = C.write_store(tmp / f"{kind}-train.zarr", act, rows=store_rows, block_rows=64)
    recipe = TrainRecipe(_cfg(store, mdir, tmp / f"{kind}-manual", kind, batch, 0, 10 ** 6))
    recipe.setup()
    params = [p for p in recipe.optimizer.param_groups[0]["params"]]
    store_step, sparts = store_stepper(recipe, store, batch)
    online_step, parts, (te, vae) = online_stepper(recipe, mdir, act.llm, batch)
    res = act.resolution

    store_step(); online_step()  # warm-up
    for d in (parts, sparts):
        for k in d:
            d[k].clear()
    ts, to = [], []
    for _ in range(rounds):
        ts += C.timeit(store_step, per_round, warmup=0)
        to += C.timeit(online_step, per_round, warmup=0)
    s_med, o_med = C.median(ts), C.median(to)
    out = {
        "model": {k: v for k, v in C.SD_MODELS[kind].items()},
        "resolution": res, "latent_shape": list(act.lat_mean.shape[1:]), "batch": batch,
        "params_M": {"unet": round(sum(p.numel() for p in recipe.unet.parameters()) / 1e6, 2),
                     "vae_encoder": round(sum(p.numel() for p in vae.model.parameters()) / 1e6, 2),
                     "text_encoder": round(sum(p.numel() for p in te.model.parameters()) / 1e6, 2),
                     "adapter": round(sum(p.numel() for p in params) / 1e6, 2)},
        "steps_timed_each": len(ts),
        "store_step_s_median": round(s_med, 4), "online_step_s_median": round(o_med, 4),
        "store_samples_per_s": round(batch / s_med, 2), "online_samples_per_s": round(batch / o_med, 2),
        "store_over_online_samples_per_s": round(o_med / s_med, 3),
        "online_breakdown_s_median": {k: round(C.median(v), 4) for k, v in parts.items()},
        "store_breakdown_s_median": {k: round(C.median(v), 4) for k, v in sparts.items()},
        "store_step_s_all": [round(x, 4) for x in ts], "online_step_s_all": [round(x, 4) for x in to],
    }
    # Release the models (the step closures hold them too).
    te = vae = online_step = store_step = None

    # ---------------- the real loop: data wait share from metrics.jsonl
    waits = {}
    for w in train_workers:
        r = TrainRecipe(_cfg(store, mdir, tmp / f"{kind}-train-w{w}", kind, batch, w, train_steps))
        r.setup()
        r.train()
        rows_ = [json.loads(line) for line in r.run.metrics.read_text().splitlines()][1:]
        step = sum(m["step_s"] for m in rows_)
        wait = sum(m["data_wait_s"] for m in rows_)
        waits[str(w)] = {"steps": len(rows_), "step_s_median": round(C.median([m["step_s"] for m in rows_]), 4),
                         "data_wait_share": round(wait / step, 4),
                         "data_wait_s_max": round(max(m["data_wait_s"] for m in rows_), 4),
                         "samples_per_s": round(batch * len(rows_) / step, 2)}
    out["train_loop"] = waits
    out["seconds"] = round(time.perf_counter() - t_model, 1)
    return out


# ------------------------------------------------------------------ one process per path (sd15)
_MARK = "@@bench "  # reply lines of a worker; anything else a library prints is passed over


def _rss_now_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(spec: dict) -> int:
    """One path (``spec["path"]``: store or online) in its own process, so that its peak RSS is its
    own: set up, then one step per ``step`` line on stdin, answered with a JSON line of its
    seconds; ``stop`` answers with the process's memory and parameter counts."""
    import torch

    from surpipe.train.recipe import TrainRecipe

    def reply(d):
        sys.stdout.write(_MARK + json.dumps(d) + "\n")
        sys.stdout.flush()

    rss0 = _rss_now_mb()
    recipe = TrainRecipe(_cfg(spec["store"], spec["model"], spec["out"], spec["kind"], spec["batch"], 0, 10 ** 6))
    recipe.setup()
    params = recipe.optimizer.param_groups[0]["params"]
    info = {"params_M": {"unet": sum(p.numel() for p in recipe.unet.parameters()) / 1e6,
                         "adapter": sum(p.numel() for p in params) / 1e6}}
    if spec["path"] == "store":
        step, parts = store_stepper(recipe, Path(spec["store"]), spec["batch"])
    else:
        step, parts, (te, vae) = online_stepper(recipe, Path(spec["model"]), np.load(spec["llm"]), spec["batch"],
                                                spec.get("resolution"))
        info["params_M"].update(vae_encoder=sum(p.numel() for p in vae.model.parameters()) / 1e6)
        for i, m in enumerate(getattr(te, "models", None) or (te.model,)):  # SDXL: both text encoders
            info["params_M"]["text_encoder" + (f"_{i + 1}" if i else "")] = sum(p.numel() for p in m.parameters()) / 1e6
    info.update(rss_after_import_MB=rss0, rss_after_setup_MB=_rss_now_mb(), peak_rss_setup_MB=_peak_rss_mb(),
                torch_threads=torch.get_num_threads())
    reply({"ready": True})
    for line in sys.stdin:
        if line.strip() == "step":
            t0 = time.perf_counter()
            step()
            reply({"s": time.perf_counter() - t0, "parts": {k: v[-1] for k, v in parts.items()}})
        else:
            break
    info.update(peak_rss_MB=_peak_rss_mb(), rss_end_MB=_rss_now_mb())
    reply({k: ({a: round(b, 2) for a, b in v.items()} if isinstance(v, dict) else
               (round(v, 1) if isinstance(v, float) else v)) for k, v in info.items()})
    return 0


class _Worker:
    def __init__(self, spec: dict, tmp: Path):
        import subprocess

        f = tmp / f"worker-{spec['path']}.json"
        f.write_text(json.dumps(spec))
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(f)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, line: str | None) -> dict:
        if line is not None:
            self.p.stdin.write(line + "\n")
            self.p.stdin.flush()
        for out in self.p.stdout:
            if out.startswith(_MARK):
                return json.loads(out[len(_MARK):])
        raise SystemExit(f"bench: the {self.p.args[-1]} worker ended (exit code {self.p.wait()})")


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("MemAvailable:"))


def _schedule(mdir: Path) -> tuple[bool, str]:
    """Whether the two worker processes can hold their models at once (alternating steps) or must
    run one after the other, and why: each holds the fp32 UNet, and a step's peak measured at SD 1.5
    was 1.7x its UNet's weights (bench/results/train_step_sd15.json); the online one also the
    encoders. Both together must fit in the memory available now."""
    mb = lambda pattern: sum(f.stat().st_size for f in Path(mdir).glob(pattern)) / 2 ** 20  # noqa: E731
    unet, enc = mb("unet/*.safetensors"), mb("text_encoder*/*.safetensors") + mb("vae/*.safetensors")
    need, have = 2 * 1.7 * unet + enc, _mem_available_mb()
    why = (f"both processes need about {need / 1024:.1f} GB (2 x 1.7 x the {unet / 1024:.1f} GB fp32 UNet + "
           f"{enc / 1024:.1f} GB encoders), {have / 1024:.1f} GB available")
    return need < 0.9 * have, why


def bench_arch(kind: str, tmp: Path, cache: Path, rows, batch: int, rounds: int, store_rows: int,
               budget_s: float) -> dict:
    """Store path against the online path, each in its own worker process (their peak RSS do not
    mix), steps alternating (one store step, one online step per round) while the time budget
    allows another round (at least one). For the published architectures (sd15, sdxl).

    When both processes' models do not fit in memory at once (``_schedule``: SDXL's 10.3 GB fp32
    UNet on a 24 GB machine), the paths run one after the other instead: the store process's
    warm-up and steps, then it ends, then the online process's; the store path gets 40% of the
    time left (its step is the shorter) and each path at least one timed step."""
    t_model = time.perf_counter()
    mdir, act = C.cached_model_and_activations(kind, cache, rows)
    store = C.write_store(tmp / f"{kind}-train.zarr", act, rows=store_rows, block_rows=64)
    np.save(tmp / "llm.npy", act.llm)
    t_built = time.perf_counter() - t_model
    base = dict(kind=kind, store=str(store), model=str(mdir), batch=batch, llm=str(tmp / "llm.npy"),
                resolution=act.resolution)
    together, why = _schedule(mdir)
    steps = {"store": [], "online": []}
    mem = {}
    if together:
        ws = {}
        for path in ("store", "online"):  # one after the other: their setups do not compete for the cores
            ws[path] = _Worker(dict(base, path=path, out=str(tmp / f"{kind}-{path}")), tmp)
            ws[path].ask(None)
        t_round = 0.0
        for r in range(rounds + 1):  # round 0: warm-up, not counted
            if r > 1 and time.perf_counter() - t_model + t_round > budget_s:
                break
            t0 = time.perf_counter()
            for path in ("store", "online"):
                got = ws[path].ask("step")
                if r:
                    steps[path].append(got)
            t_round = time.perf_counter() - t0
        mem = {path: w.ask("stop") for path, w in ws.items()}
        for w in ws.values():
            w.p.wait()
    else:
        for path, share in (("store", 0.4), ("online", 1.0)):
            deadline = time.perf_counter() + share * (budget_s - (time.perf_counter() - t_model))
            w = _Worker(dict(base, path=path, out=str(tmp / f"{kind}-{path}")), tmp)
            w.ask(None)
            t_step = 0.0
            for r in range(rounds + 1):  # step 0: warm-up, not counted
                if r > 1 and time.perf_counter() + t_step > deadline:
                    break
                t0 = time.perf_counter()
                got = w.ask("step")
                t_step = time.perf_counter() - t0
                if r:
                    steps[path].append(got)
            mem[path] = w.ask("stop")
            w.p.wait()

    def med(path, key):
        return round(C.median([s["parts"][key] for s in steps[path]]), 4)

    ts, to = ([x["s"] for x in steps[p]] for p in ("store", "online"))
    s_med, o_med = C.median(ts), C.median(to)
    sb = {k: med("store", k) for k in steps["store"][0]["parts"]}
    ob = {k: med("online", k) for k in steps["online"][0]["parts"]}
    out = {
        "model": C.SD_MODELS[kind], "resolution": act.resolution, "latent_shape": list(act.lat_mean.shape[1:]),
        "batch": batch, "dtype": "float32", "params_M": {**mem["online"]["params_M"], **mem["store"]["params_M"]},
        "paths_run": ("alternating steps, both processes alive" if together else
                      "one after the other (store process, then online process)") + f": {why}",
        "steps_timed_each": len(ts), "setup_build_s": round(t_built, 1),
        "store_step_s_median": round(s_med, 4), "online_step_s_median": round(o_med, 4),
        "store_samples_per_s": round(batch / s_med, 3), "online_samples_per_s": round(batch / o_med, 3),
        "store_over_online_samples_per_s": round(o_med / s_med, 3),
        "online_breakdown_s_median": ob, "store_breakdown_s_median": sb,
        "store_backward_over_forward": round(sb["backward"] / sb["loss_forward"], 3),
        "store_step_s_all": [round(x, 4) for x in ts], "online_step_s_all": [round(x, 4) for x in to],
        "memory_MB": {"store": mem["store"], "online": mem["online"]},
    }
    derive(out)
    cm = C.SD_MODELS[kind].get("published")
    if cm:
        out["cost_model"] = _predicted(cm, batch, act.resolution)
    if cm == "sdxl":
        out["resolution_note"] = (f"{act.resolution} px (latents {out['latent_shape']}), not SDXL's training 1024 px: a "
                                  "1024 px step is too slow on a 2-core CPU; the cost model is evaluated at the same "
                                  f"{act.resolution} px")
    out["seconds"] = round(time.perf_counter() - t_model, 1)
    return out


def derive(m: dict) -> dict:
    """Figures derived from ``bench_arch``'s measurements (in place; rerunnable on its JSON).

    * ``store_over_online_by_parts``: the loss + backward + AdamW part is the same code in both
      paths, so its median over both processes stands for both, plus each path's own data part
      (online: decode + VAE + CLIP x2; store: read + to-tensors). On a shared machine this ratio is
      steadier than the whole-step one, whose two processes may see different outside load.
    * memory: safetensors weights are memory-mapped and join the RSS only when the first step
      touches them, so one sample's step memory (saved activations, gradients, temporaries) is the
      store process's peak less its RSS after setup, less the UNet's fp32 weights and the
      adapter's gradients + AdamW moments (12 B/parameter), divided by the batch; the batch the
      online path's extra peak would hold in the store path is that extra over this figure.
    """
    sb, ob, B = m["store_breakdown_s_median"], m["online_breakdown_s_median"], m["batch"]
    loss = (sb["loss_backward_opt"] + ob["loss_backward_opt"]) / 2
    data_on = ob["decode_preprocess"] + ob["vae_encode"] + ob["clip_2x"]
    data_st = sb["read_batch"] + sb["to_tensors"]
    m["store_over_online_by_parts"] = round((loss + data_on) / (loss + data_st), 3)
    m["by_parts_s"] = {"loss_backward_opt_both_paths": round(loss, 4), "online_data": round(data_on, 4),
                       "store_data": round(data_st, 4)}
    ms, mo = m["memory_MB"]["store"], m["memory_MB"]["online"]
    fixed = (ms["params_M"]["unet"] * 4 + ms["params_M"]["adapter"] * 12) * 1e6 / 2 ** 20
    per_sample = max(ms["peak_rss_MB"] - ms["rss_after_setup_MB"] - fixed, 1.0) / B
    saving = mo["peak_rss_MB"] - ms["peak_rss_MB"]
    m["memory_MB"].update(online_minus_store_peak_MB=round(saving, 1),
                          unet_fp32_and_adapter_state_MB=round(fixed, 1),
                          store_step_MB_per_sample=round(per_sample, 1),
                          extra_batch_from_the_saving=int(saving // per_sample))
    return m


def _predicted(arch: str, batch: int, px: int | None = None) -> dict:
    """What bench/cost_model.py predicts for the same step at ``px`` (FLOPs on meta; no weights)."""
    import cost_model

    c = cost_model.sd_costs(batch, arch, px=px)
    f = c["flops"]
    fb = f["unet_forward_backward"] - f["unet_forward"]
    return {"resolution_px": c["resolution_px"], "online_over_store_flops": c["step_flops"]["online_over_store"],
            "unet_backward_over_forward_flops": round(fb / f["unet_forward"], 3),
            "flops_TFLOP": {k: round(v / 1e12, 4) for k, v in f.items()},
            "step_TFLOP": {k: round(v / 1e12, 4) for k, v in c["step_flops"].items() if k != "online_over_store"}}


def run(quick: bool = True, models=None, cache: Path | None = None, **over) -> dict:
    with C.bench_run(quick, QUICK, FULL, over, "surpipe-bench-train-", models, cache) as (p, models, tmp, cache, res):
        res["models"] = {}
        for kind in models:
            if C.SD_MODELS[kind].get("published"):
                a = p["arch"]
                res["models"][kind] = bench_arch(kind, tmp, cache, a["rows"], a["batch"], a["rounds"], a["store_rows"],
                                                 a.get("budget_s_by_model", {}).get(kind, a["budget_s"]))
                continue
            res["models"][kind] = bench_model(kind, tmp, cache, p["rows"].get(kind), p["batch"][kind], p["rounds"],
                                              p["per_round"], p["train_steps"], p["store_rows"], p["train_workers"])
    return res


def summary(d: dict) -> list[tuple[str, str]]:
    rows = []
    for kind, m in d["models"].items():
        rows.append((f"train step {kind} (B={m['batch']}): store vs online samples/s",
                     f"{m['store_samples_per_s']} vs {m['online_samples_per_s']} = "
                     f"{m['store_over_online_samples_per_s']}x"))
        if "memory_MB" in m:
            sb, mem = m["store_breakdown_s_median"], m["memory_MB"]
            rows.append((f"train step {kind}: store/online ratio by parts (see derive)",
                         f"{m['store_over_online_by_parts']}x"))
            rows.append((f"train step {kind}: store loss forward / backward s (ratio)",
                         f"{sb['loss_forward']} / {sb['backward']} ({m['store_backward_over_forward']}x)"))
            rows.append((f"train step {kind}: peak RSS MB store / online (+batch bought)",
                         f"{mem['store']['peak_rss_MB']} / {mem['online']['peak_rss_MB']} "
                         f"(+{mem['extra_batch_from_the_saving']})"))
            continue
        w = ", ".join(f"w{k}: {v['data_wait_share']:.0%}" for k, v in m["train_loop"].items())
        rows.append((f"train loop {kind}: data-wait share of step time", w))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # internal: one path of bench_arch in its own process
        return worker(json.loads(Path(argv[1]).read_text()))
    return C.model_bench_main(argv, __doc__, "train_step.py", run, summary)


if __name__ == "__main__":
    sys.exit(main())
