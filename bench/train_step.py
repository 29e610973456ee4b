"""Stage-two step time from the feature store against the authors' online way, in one run.

    python bench/train_step.py [--quick] --out FILE.json [--models tiny,mid] [--cache DIR]

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
             rounds=3, per_round=2, train_steps=6, store_rows=256, train_workers=(0, 2))
FULL = dict(models=("tiny", "mid"), rows={"tiny": None, "mid": None}, batch={"tiny": 8, "mid": 4},
            rounds=6, per_round=3, train_steps=30, store_rows=2048, train_workers=(0, 1, 2))


def _cfg(store, mdir, out, kind, batch, workers, max_steps):
    from stages.train import TrainConfig

    return TrainConfig(store=str(store), model=str(mdir), out=str(out), llm_layer=3, batch_size=batch,
                       grad_accum=1, workers=workers, device="cpu", progress=False, loss_curve=False,
                       checkpoint_every=10 ** 6, max_steps=max_steps, **C.SD_MODELS[kind]["adapter"])


def bench_model(kind: str, tmp: Path, cache: Path, rows, batch: int, rounds: int, per_round: int,
                train_steps: int, store_rows: int, train_workers) -> dict:
    import torch

    from stages.train import TrainRecipe
    from surpipe import sd
    from surpipe.train_data import BlockReader, SampleStream

    t_model = time.perf_counter()
    mdir, act = C.cached_model_and_activations(kind, cache, rows)
    store = C.write_store(tmp / f"{kind}-train.zarr", act, rows=store_rows, block_rows=64)
    recipe = TrainRecipe(_cfg(store, mdir, tmp / f"{kind}-manual", kind, batch, 0, 10 ** 6))
    recipe.setup()
    params = [p for p in recipe.optimizer.param_groups[0]["params"]]

    def optimise(losses):
        recipe.accelerator.backward(losses["loss"])
        recipe.accelerator.clip_grad_norm_(params, 1.0)
        recipe.optimizer.step()
        recipe.optimizer.zero_grad(set_to_none=True)

    # ---------------- store path
    it = iter(SampleStream(BlockReader(str(store), recipe.groups, 64), batch, seed=0, workers=0))

    sparts = {"read_batch": [], "to_tensors": [], "loss_backward_opt": []}

    def store_step():
        t0 = time.perf_counter()
        raw = next(it)
        t1 = time.perf_counter()
        b = recipe._batch_to_tensors(raw)
        t2 = time.perf_counter()
        with recipe.accelerator.autocast():
            optimise(recipe.loss(b))
        t3 = time.perf_counter()
        for k, v in zip(sparts, (t1 - t0, t2 - t1, t3 - t2)):
            sparts[k].append(v)

    # ---------------- online path (the authors' way)
    te = sd.load_text_encoder(str(mdir))
    vae = sd.load_vae_encoder(str(mdir))
    res = sd.default_resolution(str(mdir), None, vae)
    samples = C.sample_rows()
    llm_cache = {s.simple: act.llm[i % len(act.llm)] for i, s in enumerate(samples)}
    gen = torch.Generator().manual_seed(0)
    pos = {"i": 0}
    parts = {"decode_preprocess": [], "vae_encode": [], "clip_2x": [], "loss_backward_opt": []}

    def online_step():
        idx = [(pos["i"] + j) % len(samples) for j in range(batch)]
        pos["i"] += batch
        part = [samples[i] for i in idx]
        t0 = time.perf_counter()
        x = torch.stack([sd.preprocess(s.image(), res) for s in part])
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), torch.flip(x, dims=[-1]), x)
        t1 = time.perf_counter()
        mean, std = (t.clone() for t in sd.encode_latent_dist(vae, x))  # out of inference mode
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * vae.scaling_factor
        t2 = time.perf_counter()
        cs = sd.encode_prompts(te, [s.simple for s in part]).clone()
        cc = sd.encode_prompts(te, [s.complex for s in part]).clone()
        t3 = time.perf_counter()
        b = {"latents": latents, "clip_simple": cs, "clip_complex": cc,
             "llm": torch.from_numpy(np.stack([llm_cache[s.simple] for s in part])).float()}
        with recipe.accelerator.autocast():
            optimise(recipe.loss(b))
        t4 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k].append(v)

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
    # Release the models. Not `del`: the step closures above capture te/vae, and pyflakes reads a
    # `del` of a captured name as making the closures' uses undefined (Python allows it).
    te = vae = None

    # ---------------- the real loop: data wait share from metrics.jsonl
    waits = {}
    for w in train_workers:
        r = TrainRecipe(_cfg(store, mdir, tmp / f"{kind}-train-w{w}", kind, batch, w, train_steps))
        r.setup()
        r.train()
        rows_ = [json.loads(line) for line in (Path(r.out) / "metrics.jsonl").read_text().splitlines()][1:]
        step = sum(m["step_s"] for m in rows_)
        wait = sum(m["data_wait_s"] for m in rows_)
        waits[str(w)] = {"steps": len(rows_), "step_s_median": round(C.median([m["step_s"] for m in rows_]), 4),
                         "data_wait_share": round(wait / step, 4),
                         "data_wait_s_max": round(max(m["data_wait_s"] for m in rows_), 4),
                         "samples_per_s": round(batch * len(rows_) / step, 2)}
    out["train_loop"] = waits
    out["seconds"] = round(time.perf_counter() - t_model, 1)
    return out


def run(quick: bool = True, models=None, cache: Path | None = None, **over) -> dict:
    with C.bench_run(quick, QUICK, FULL, over, "surpipe-bench-train-", models, cache) as (p, models, tmp, cache, res):
        res["models"] = {}
        for kind in models:
            res["models"][kind] = bench_model(kind, tmp, cache, p["rows"].get(kind), p["batch"][kind], p["rounds"],
                                              p["per_round"], p["train_steps"], p["store_rows"], p["train_workers"])
    return res


def summary(d: dict) -> list[tuple[str, str]]:
    rows = []
    for kind, m in d["models"].items():
        rows.append((f"train step {kind} (B={m['batch']}): store vs online samples/s",
                     f"{m['store_samples_per_s']} vs {m['online_samples_per_s']} = "
                     f"{m['store_over_online_samples_per_s']}x"))
        w = ", ".join(f"w{k}: {v['data_wait_share']:.0%}" for k, v in m["train_loop"].items())
        rows.append((f"train loop {kind}: data-wait share of step time", w))
    return rows


def main(argv=None) -> int:
    return C.model_bench_main(argv, __doc__, "train_step.py", run, summary)


if __name__ == "__main__":
    sys.exit(main())
