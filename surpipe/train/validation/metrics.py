"""Held-out metrics, measured with fixed noise on the rows the split
(:mod:`surpipe.train.validation.split`) keeps out of training, each beside the controls that
would expose an artefact (docs/validation.md).

What the adapter is measured on (``arm`` suffix: none = the adapter, ``raw`` / ``baseline`` = the
simple-prompt embedding without the adapter, what SD sees today):

- the training terms: ``val/denoise``, ``val/llm``, ``val/prompt`` (:mod:`surpipe.train.losses`);
  ``val/prompt`` always measures the adapter's output, like ``val/prompt_baseline`` measures the
  raw embedding; with ``--prompt-target fc`` the trained term on ``fc(a)`` is ``val/prompt_fc``;
- scale-free, input-dependent alignment (:mod:`surpipe.train.validation.retrieval`): retrieval of
  each row's complex prompt among the held-out rows' (``val/r1``, ``val/r5``, ``val/median_rank``,
  for the adapter, ``_raw`` and ``_chance``), and ``val/cos_adapter`` / ``val/cos_baseline``, the
  token-averaged cosine to the own complex prompt;
- controls, every evaluation: ``_shuffled`` (each row given another held-out row's simple prompt,
  a fixed derangement), ``_const`` (the mean complex embedding of training rows, an output that
  ignores its input), ``val/prompt_scaled`` (the best prompt term of ``c * x`` over a grid of c,
  at ``val/scaled_factor``: scale alone); retrieval of ``c * x`` and of a constant need no run,
  they are exactly ``_raw``'s and chance;
- the LLM term's target: ``val/llm_r1`` / ``val/llm_median_rank``, retrieval of each row's
  projected LLM feature from the adapter's hidden output, and ``val/llm_target_cos``, the mean
  cosine between different rows' targets (near 1: the LLM features hardly differ between prompts).

The untrained adapter is the step-0 evaluation of a run (its ``val/...`` row in metrics.jsonl).
Torch is imported inside the functions that need it (the train stage imports this module).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.train.validation import retrieval as R
from surpipe.train.validation.rows import ValidationSet

TERMS = ("val/denoise", "val/llm", "val/prompt", "val/prompt_baseline", "val/prompt_fc")
ALIGNMENT = ("val/cos_adapter", "val/cos_baseline", "val/r1", "val/r5", "val/median_rank", "val/r1_raw",
             "val/r5_raw", "val/median_rank_raw", "val/r1_chance", "val/r5_chance", "val/median_rank_chance")
CONTROLS = ("val/prompt_shuffled", "val/cos_shuffled", "val/r1_shuffled", "val/median_rank_shuffled",
            "val/prompt_const", "val/cos_const", "val/prompt_scaled", "val/scaled_factor")
LLM_TARGET = ("val/llm_r1", "val/llm_median_rank", "val/llm_target_cos")
METRICS = TERMS + ALIGNMENT + CONTROLS + LLM_TARGET
SCALES = tuple(round(0.05 * i, 2) for i in range(1, 41))  # c in 0.05 .. 2.0: the scaled-input control's grid


# --------------------------------------------------------------------------- evaluation
def _kl_rows(target, out):
    """Per-row prompt term ``D(target, out)`` = KL(softmax(out) || softmax(target)) as
    :func:`surpipe.train.losses.prompt_loss` computes it for a batch of one row, float64 [B]."""
    import torch.nn.functional as F

    t, o = target.double(), out.double()
    kl = F.kl_div(F.log_softmax(t, dim=-1), F.softmax(o, dim=-1), reduction="none")
    return kl.flatten(1).sum(1)


def _cos_rows(a, b):
    """Per-row token-averaged cosine, float64 [B] (``b`` may be one [L, D] for every row)."""
    import torch.nn.functional as F

    return F.cosine_similarity(a.double(), b.double().expand_as(a), dim=-1).mean(-1)


def _terms(L, out, s, r, x, cc, o, enc, fc, proj, mask, prompt_target):
    """The training terms of rows ``s + r`` (one row at a time: the values of a batch of one)."""
    for i in r:
        row = slice(i, i + 1)
        if mask is None or bool(mask[i]):
            out["val/llm"][s + i] = L.llm_loss(proj[row], enc[row]).item()
        out["val/prompt"][s + i] = L.prompt_loss(cc[row], o[row]).item()
        out["val/prompt_baseline"][s + i] = L.prompt_loss(cc[row], x[row]).item()
        if prompt_target == "fc":
            out["val/prompt_fc"][s + i] = L.prompt_loss(cc[row], fc[row]).item()


def _denoise(L, sched, adapter, unet, b, o, dev, weight_dtype, prediction_type, min_snr_gamma):
    """Per-row denoising term of a batch (the training term of a batch of one row each)."""
    lat, noise, steps = b["latents"].to(dev), b["noise"].to(dev), b["timesteps"].to(dev)
    noisy = sched.add_noise(lat, noise, steps)
    added = None
    if b["pooled"] is not None:
        pooled = L._base(adapter).pool(b["pooled"].to(dev))
        added = L.added_conditioning({"pooled": pooled, "time_ids": b["time_ids"].to(dev)}, weight_dtype)
    pred = unet(noisy.to(weight_dtype), steps, o.to(weight_dtype), added_cond_kwargs=added).sample.float()
    target = L.denoise_target(sched, lat, noise, steps, prediction_type).float()
    w = None if min_snr_gamma is None else L.min_snr_weights(sched, steps, min_snr_gamma, prediction_type)
    return [L.denoise_loss(pred[i:i + 1], target[i:i + 1], None if w is None else w[i:i + 1]).item()
            for i in range(len(pred))]


def _controls(out, s, e, x, cc, o_shuf, const):
    """Per-row values of the controls for rows s..e: shuffled inputs, the constant, scaled inputs."""
    import torch

    out["val/prompt_shuffled"][s:e] = _kl_rows(cc, o_shuf).cpu().numpy()
    out["val/cos_shuffled"][s:e] = _cos_rows(o_shuf, cc).cpu().numpy()
    if const is not None:
        k = const.to(cc.device).float().expand_as(cc)
        out["val/prompt_const"][s:e] = _kl_rows(cc, k).cpu().numpy()
        out["val/cos_const"][s:e] = _cos_rows(k, cc).cpu().numpy()
    scaled = torch.stack([_kl_rows(cc, c * x) for c in SCALES])  # [C, B]
    out["_scaled"][:, s:e] = scaled.cpu().numpy()


def _gallery_retrieval(out, g0, g1, q):
    """Per-row retrieval values of rows g0..g1 (one gallery) from the collected queries ``q``."""
    cc = np.concatenate(q["cc"])
    for arm, key in (("o", ""), ("x", "_raw"), ("shuf", "_shuffled")):
        sim = R.token_cosine_matrix(np.concatenate(q[arm]), cc)
        for k in R.KS:
            if f"val/r{k}{key}" in out:
                out[f"val/r{k}{key}"][g0:g1] = R.hits_at(sim, k)
        above, ties = R.ranks(sim)
        out[f"val/median_rank{key}"][g0:g1] = above + 1 + ties / 2.0
    n = g1 - g0
    for name, v in R.chance(n).items():
        out[f"val/{name}_chance"][g0:g1] = v
    tgt = np.concatenate(q["proj"])
    sim = R.token_cosine_matrix(np.concatenate(q["enc"]), tgt)
    out["val/llm_r1"][g0:g1] = R.hits_at(sim, 1)
    above, ties = R.ranks(sim)
    out["val/llm_median_rank"][g0:g1] = above + 1 + ties / 2.0
    u = R._unit_tokens(tgt)[:, 0, :]
    pair = u @ u.T
    out["val/llm_target_cos"][g0:g1] = (pair.sum(1) - np.diag(pair)) / max(n - 1, 1) if n > 1 else np.nan


def evaluate_rows(adapter, projection, unet, scheduler, vset: ValidationSet, *, prediction_type: Optional[str] = None,
                  min_snr_gamma: Optional[float] = None, prompt_target: str = "out", weight_dtype=None,
                  batch_size: int = 8, gallery: int = R.MAX_GALLERY, control_seed: int = 0) -> dict[str, np.ndarray]:
    """Per-row values {metric: float64 [N]} of every metric in :data:`METRICS` that applies
    (``val/llm`` NaN where a row has no LLM vector; ``val/denoise`` absent without ``unet`` or
    latents; ``_const`` absent without ``vset.const``). Retrieval compares the rows within galleries
    of ``gallery`` consecutive rows; the shuffled control deranges each gallery (``control_seed``)."""
    import torch

    from surpipe.train import losses as L  # heavy: imports torch

    if prompt_target not in ("out", "fc"):
        raise SurpipeError(f"prompt_target must be out or fc, got {prompt_target!r}")
    weight_dtype = weight_dtype or torch.float32
    dev = next(adapter.parameters()).device
    denoise = unet is not None and vset.latents is not None
    sched = L._as_scheduler(scheduler) if denoise else None
    skip = {"val/denoise"} if not denoise else set()
    skip |= {"val/prompt_fc"} if prompt_target != "fc" else set()
    skip |= {"val/prompt_const", "val/cos_const"} if vset.const is None else set()
    n = len(vset)
    out = {k: np.full(n, np.nan) for k in METRICS if k not in skip and k not in ("val/prompt_scaled",
                                                                                 "val/scaled_factor")}
    out["_scaled"] = np.full((len(SCALES), n), np.nan)
    modules = [m for m in (adapter, projection) if m is not None]
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            for g0 in range(0, n, gallery):
                g1 = min(g0 + gallery, n)
                perm = g0 + R.derangement(g1 - g0, control_seed + g0)
                q = {k: [] for k in ("o", "x", "shuf", "cc", "enc", "proj")}
                for s in range(g0, g1, batch_size):
                    e = min(s + batch_size, g1)
                    b = vset.batch(s, e)
                    x, cc = b["clip_simple"].to(dev).float(), b["clip_complex"].to(dev).float()
                    o, enc, fc = adapter(x, return_aux=True)
                    proj = projection(b["llm"].to(dev))
                    o_shuf = adapter(vset.clip_simple[perm[s - g0:e - g0]].to(dev).float())
                    _terms(L, out, s, range(e - s), x, cc, o, enc, fc, proj, b["llm_mask"], prompt_target)
                    out["val/cos_adapter"][s:e] = _cos_rows(o, cc).cpu().numpy()
                    out["val/cos_baseline"][s:e] = _cos_rows(x, cc).cpu().numpy()
                    _controls(out, s, e, x, cc, o_shuf.float(), vset.const)
                    if denoise:
                        out["val/denoise"][s:e] = _denoise(L, sched, adapter, unet, b, o, dev, weight_dtype,
                                                           prediction_type, min_snr_gamma)
                    for k, v in (("o", o), ("x", x), ("shuf", o_shuf), ("cc", cc), ("enc", enc), ("proj", proj)):
                        q[k].append(v.float().cpu().numpy())
                _gallery_retrieval(out, g0, g1, q)
    finally:
        for m, t in zip(modules, was):
            m.train(t)
    return out


def _aggregate(per: Mapping[str, np.ndarray], idx: Optional[np.ndarray] = None) -> dict[str, float]:
    """Means over rows (``idx``: those rows) of per-row values, medians for ranks; the scaled-input
    control as its best factor's mean prompt term."""
    out = {}
    for k, v in per.items():
        if k.startswith("_"):
            continue
        v = np.asarray(v, dtype=float)[idx if idx is not None else slice(None)]
        v = v[~np.isnan(v)]
        if len(v):
            out[k] = float(np.median(v) if "median_rank" in k else v.mean())
    if "_scaled" in per:
        sc = np.asarray(per["_scaled"], dtype=float)[:, idx if idx is not None else slice(None)]
        if sc.size:
            means = sc.mean(axis=1)
            best = int(np.argmin(means))
            out["val/prompt_scaled"], out["val/scaled_factor"] = float(means[best]), float(SCALES[best])
    return out


def evaluate(adapter, projection, unet, scheduler, vset: ValidationSet, *, prediction_type: Optional[str] = None,
             min_snr_gamma: Optional[float] = None, prompt_target: str = "out", weight_dtype=None,
             batch_size: int = 8, control_seed: int = 0, select: Optional[np.ndarray] = None) -> dict[str, float]:
    """The held-out metrics (module docstring): means over the rows, medians for ranks (``val/llm``
    over rows with an LLM vector; a key is left out when no row has a value). The mean of a
    training term over rows equals the term computed on all rows as one batch.

    ``select`` (bool per row): also ``val/select_score``, the ``--keep-best`` score of those rows.
    Runs in eval mode under ``torch.no_grad`` and restores the modules' train/eval modes. The
    adapter runs in its own dtype (wrap the call in ``accelerator.autocast()`` to match training).
    """
    per = evaluate_rows(adapter, projection, unet, scheduler, vset, prediction_type=prediction_type,
                        min_snr_gamma=min_snr_gamma, prompt_target=prompt_target, weight_dtype=weight_dtype,
                        batch_size=batch_size, control_seed=control_seed)
    out = _aggregate(per)
    if select is not None:
        out["val/select_score"] = selection_score(_aggregate(per, np.flatnonzero(select)))
    return {k: out[k] for k in (*METRICS, "val/select_score") if k in out}


def selection_score(metrics: Mapping[str, float]) -> float:
    """What ``--keep-best`` minimises: the trained terms, ``val/prompt_fc`` (``--prompt-target fc``)
    or ``val/prompt``, plus ``val/llm`` (a missing term counts 0)."""
    prompt = metrics.get("val/prompt_fc", metrics.get("val/prompt", 0.0))
    return float(prompt) + float(metrics.get("val/llm", 0.0))


def per_category(values_by_row: Mapping[str, np.ndarray], categories: Optional[Sequence[str]] = None) -> dict:
    """{category: {metric: value, "rows": n}} plus ``"all"``, from :func:`evaluate_rows`' output
    (means, medians for ranks; NaN values, rows without an LLM vector, left out).

    ``categories`` (one label per row, or None when the store has none) groups the rows.
    """
    n = len(next(v for k, v in values_by_row.items() if not k.startswith("_"))) if values_by_row else 0
    if categories is not None and len(categories) != n:
        raise SurpipeError(f"per_category: {len(categories)} category labels for {n} rows")

    def stats(idx: np.ndarray) -> dict:
        return {**_aggregate(values_by_row, idx), "rows": int(len(idx))}

    out = {}
    if categories is not None:
        labels = [str(c) for c in categories]
        for c in dict.fromkeys(labels):
            out[c] = stats(np.array([i for i, lab in enumerate(labels) if lab == c], dtype=np.int64))
    out["all"] = stats(np.arange(n))
    return out


# the report's columns: (title, key, format), grouped so each number stands beside its controls
TABLE = (("prompt", "val/prompt", ".3f"), ("untrained", "val/prompt_untrained", ".3f"),
         ("raw", "val/prompt_baseline", ".3f"), ("scaled raw", "val/prompt_scaled", ".3f"),
         ("const", "val/prompt_const", ".3f"),
         ("cos", "val/cos_adapter", ".4f"), ("untrained", "val/cos_untrained", ".4f"),
         ("raw", "val/cos_baseline", ".4f"), ("shuffled", "val/cos_shuffled", ".4f"), ("const", "val/cos_const", ".4f"),
         ("R@1", "val/r1", ".3f"), ("untrained", "val/r1_untrained", ".3f"), ("raw", "val/r1_raw", ".3f"),
         ("shuffled", "val/r1_shuffled", ".3f"), ("chance", "val/r1_chance", ".3f"),
         ("med. rank", "val/median_rank", ".1f"), ("raw", "val/median_rank_raw", ".1f"),
         ("chance", "val/median_rank_chance", ".1f"),
         ("llm", "val/llm", ".3f"), ("llm R@1", "val/llm_r1", ".3f"), ("llm target cos", "val/llm_target_cos", ".3f"))


def markdown_table(stats: Mapping[str, Mapping[str, float]]) -> str:
    """The :func:`per_category` result as a Markdown table (one row per category, then all)."""
    cols = [c for c in TABLE if any(c[1] in s for s in stats.values())]
    lines = ["| category | rows | " + " | ".join(t for t, _, _ in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for cat, s in stats.items():
        cells = [format(s[k], f) if k in s else "" for _, k, f in cols]
        lines.append(f"| {cat} | {s.get('rows', 0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
