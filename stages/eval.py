"""``surpipe eval``: CLIP score by prompt category, with and without the adapter, at the same seeds.

    surpipe eval --model stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter runs/sur-13b-l39 \
        --clip-model openai/clip-vit-large-patch14 --out out/eval --seeds 0,1,2

The prompt suites (``data/eval_prompts/suite.jsonl``: action, color, counting and free narrative,
simple prompts in the paper's style) are rendered by the stock diffusers pipeline without the
adapter and with it, each (prompt, seed) in both arms with the same initial noise. Each image is
scored against its prompt by a CLIP image-text model (``surpipe.clip_score``:
``100 * max(cos(image, text), 0)``, torchmetrics' CLIPScore definition). Writes:

- ``OUT/results.md`` and ``OUT/results.json``: per category, both arms' mean CLIP score, the
  difference (with - without), its standard error over the paired images, the share of pairs where
  the adapter scores higher, and the number of images per arm; plus all categories together;
- ``OUT/clip_scores.png``: both arms per category, mean ± standard error, on a y-axis zoomed to
  the data when the difference would be invisible from 0 (the axis label says so);
- ``OUT/scores.jsonl``: every image's score; ``OUT/images/CATEGORY/*.png`` the images
  (``--no-save-images`` to skip) and ``OUT/grids/CATEGORY.png`` side-by-side grids (first seed);
- ``OUT/config.json``: the config to repeat the run.

When the Stable Diffusion or CLIP model is a random tiny test model (its folder holds the
``surpipe_tiny.json`` marker that ``make-tiny-models`` writes), results.md, the chart and the
grids say so: the scores then mean nothing about the method.

``--prompts`` takes another suite: a JSONL file with ``category`` and ``prompt`` per line, or a
folder of ``CATEGORY.txt`` files (one prompt a line).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from stages.generate import DtypeName, SchedulerName
from surpipe.config import opt
from surpipe.errors import SurpipeError

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "data" / "eval_prompts" / "suite.jsonl"


@dataclass
class EvalConfig:
    """Settings of ``surpipe eval``."""

    model: str = opt(help="Stable Diffusion model: a diffusers folder or hub id (the one the adapter was "
                          "trained for).", group="model")
    adapter: str = opt(help="Training run folder (uses RUN/adapter) or adapter folder (config.json + "
                            "model.safetensors).", group="model")
    out: str = opt(help="Output folder for results.md/json, clip_scores.png, scores.jsonl, images and grids.",
                   group="output")
    clip_model: str = opt("openai/clip-vit-large-patch14", help="CLIP image-text model that scores the images "
                          "(folder or hub id; torchmetrics' default).", group="model")
    prompts: Optional[str] = opt(None, help="Prompt suite: JSONL with category + prompt, or a folder of CATEGORY.txt "
                                            "(default: data/eval_prompts/suite.jsonl).", group="data")
    categories: list[str] = opt(help="Only these categories of the suite (repeat the option); default: all.",
                                group="data", default_factory=list)
    max_prompts_per_category: Optional[int] = opt(None, help="Use at most this many prompts of each category.",
                                                  group="data", ge=1)
    seeds: Union[str, list[int]] = opt("0", help="Seeds for every prompt: 0,1,2 or 0-3 (inclusive); each is "
                                                 "rendered in both arms.", group="inference")
    steps: int = opt(30, help="Denoising steps per image.", group="inference", ge=1, le=1000)
    guidance: float = opt(7.5, help="Classifier-free guidance scale (1 = no guidance).", group="inference",
                          ge=0.0, le=100.0)
    size: Optional[int] = opt(None, help="Image side in pixels, a multiple of 8 (default: the model's).",
                              group="inference", ge=8, le=4096)
    batch_size: int = opt(4, help="Images rendered together (lower it if memory runs out).", group="running",
                          ge=1, le=1024)
    negative_prompt: str = opt("", help="Negative prompt for every image (also passed through the adapter).",
                               group="inference")
    dtype: DtypeName = opt("auto", help="Pipeline dtype; auto: float16 on CUDA, float32 otherwise.", group="running")
    device: str = opt("auto", help="Device: auto | cpu | cuda | cuda:I | mps.", group="running")
    scheduler: SchedulerName = opt("default", help="Sampler; default: the model's own scheduler.", group="inference")
    adapter_weight: Optional[float] = opt(None, help="Override the adapter's mixing weight in [0, 1] "
                                                     "(0 = no adapter effect).", group="model", ge=0.0, le=1.0)
    revision: Optional[str] = opt(None, help="Hub revision (branch, tag or commit) of --model.", group="model")
    clip_revision: Optional[str] = opt(None, help="Hub revision of --clip-model.", group="model")
    save_images: bool = opt(True, help="Save every image under OUT/images and per-category grids under OUT/grids.",
                            group="output")


def parse_seeds(seeds: Union[str, list[int], int]) -> list[int]:
    """``"0,1,2"``, ``"0-3"`` (inclusive), ``[0, 1]`` or ``5`` -> a list of distinct seeds, in order."""
    if isinstance(seeds, int):
        out = [seeds]
    elif isinstance(seeds, (list, tuple)):
        out = [int(s) for s in seeds]
    else:
        out = []
        for part in str(seeds).replace(" ", "").split(","):
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    a, b = part.split("-", 1)
                    if int(b) < int(a):
                        raise ValueError
                    out += list(range(int(a), int(b) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise SurpipeError(f"seeds {seeds!r}: give comma-separated integers or ranges, e.g. 0,1,2 or 0-3") \
                    from None
    if not out:
        raise SurpipeError("seeds: give at least one seed")
    if any(s < 0 for s in out):
        raise SurpipeError(f"seeds must be >= 0 (got {seeds!r})")
    return list(dict.fromkeys(out))


def read_suite(path: Optional[str]) -> dict[str, list[str]]:
    """{category: prompts} from a JSONL suite (``category`` + ``prompt`` per line) or a folder of
    ``CATEGORY.txt`` / ``CATEGORY.jsonl`` files; categories in file order."""
    from stages.generate import read_prompts

    p = Path(path) if path else DEFAULT_SUITE
    if not p.exists():
        raise SurpipeError(f"prompt suite not found: {p}")
    suite: dict[str, list[str]] = {}
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".txt", ".jsonl") and f.is_file())
        if not files:
            raise SurpipeError(f"{p} holds no CATEGORY.txt or CATEGORY.jsonl prompt files")
        for f in files:
            suite[f.stem] = read_prompts(f)
        return suite
    problems = []
    for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            problems.append(f"line {i}: not valid JSON ({e.msg})")
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("category"), str) and obj["category"].strip()
                and isinstance(obj.get("prompt"), str) and obj["prompt"].strip()):
            problems.append(f"line {i}: needs non-empty strings \"category\" and \"prompt\"")
            continue
        suite.setdefault(obj["category"].strip(), []).append(obj["prompt"].strip())
    if problems:
        raise SurpipeError(f"prompt suite {p} has bad lines:", problems[:20])
    if not suite:
        raise SurpipeError(f"prompt suite {p} holds no prompts")
    return suite


def _validate(cfg: EvalConfig) -> list[str]:
    from stages.generate import declared_problems

    p = declared_problems(cfg)
    if cfg.size is not None and cfg.size % 8:
        p.append(f"size must be a multiple of 8 (got {cfg.size})")
    return p


def _sem(xs: list[float]) -> Optional[float]:
    """Standard error of the mean: sample standard deviation (n - 1) / sqrt(n); None below 2 values."""
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def _stats(without: list[float], with_: list[float]) -> dict:
    """Both arms' mean and its standard error over the images, and the paired difference
    (with - without, same prompt and seed) with its standard error."""
    n = len(without)
    diffs = [b - a for a, b in zip(without, with_)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"n_images": n, "without": round(mean(without), 4), "without_sem": r(_sem(without)),
            "with": round(mean(with_), 4), "with_sem": r(_sem(with_)),
            "difference": round(mean(diffs), 4), "difference_sem": r(_sem(diffs)),
            "with_better": round(sum(x > 0 for x in diffs) / n, 4)}


def _markdown(table: dict, overall: dict, header: dict, note: Optional[str] = None) -> str:
    lines = ["# CLIP score with and without the SUR-adapter", ""]
    if note:
        lines += [f"> **Note: {note}.**", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| category | images per arm | without adapter | with adapter | difference (with - without) "
              "| with better |", "|---|---:|---:|---:|---:|---:|"]

    def pm(v):
        return f" ± {v:.2f}" if v is not None else ""

    def row(name, s):
        return (f"| {name} | {s['n_images']} | {s['without']:.2f}{pm(s.get('without_sem'))} | "
                f"{s['with']:.2f}{pm(s.get('with_sem'))} | {s['difference']:+.2f}{pm(s['difference_sem'])} | "
                f"{100 * s['with_better']:.0f}% |")

    lines += [row(c, s) for c, s in table.items()]
    lines.append(row("**all**", overall))
    lines += ["", "Each value: mean ± its standard error over the images (prompt × seed). Difference: mean over "
              "paired images (same prompt and seed) ± its standard error. "
              "CLIP score = 100 * max(cos(image embedding, text embedding), 0), as torchmetrics' CLIPScore."]
    return "\n".join(lines) + "\n"


def chart_limits(stats: list[dict]) -> tuple[float, float, bool]:
    """(y min, y max, starts at zero) for the chart: from 0 when that still shows the arms'
    difference (the smallest lower error bar is under half the largest upper one), else zoomed
    to the error bars so a small difference is visible."""
    lo = min(s[a] - (s.get(f"{a}_sem") or 0.0) for s in stats for a in ("without", "with"))
    hi = max(s[a] + (s.get(f"{a}_sem") or 0.0) for s in stats for a in ("without", "with"))
    if lo <= 0.5 * hi or hi <= 0:
        return 0.0, max(hi, 1.0) * 1.18, True
    span = max(hi - lo, 0.02 * hi, 0.5)
    return max(0.0, lo - 0.3 * span), hi + 0.45 * span, False


def _chart(table: dict, overall: dict, path: Path, title: str) -> dict:
    """Both arms per category (mean ± standard error over the images), the difference written
    above; returns the y limits used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table) + ["all"]
    stats = list(table.values()) + [overall]
    x = list(range(len(names)))
    w = 0.17
    y0, y1, zero = chart_limits(stats)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names) + 1.5), 4.2), dpi=110)
    for off, arm, label, color, marker in ((-w, "without", "Stable Diffusion", "#7a8794", "o"),
                                           (w, "with", "+ SUR-adapter", "#2f6db5", "s")):
        ax.errorbar([i + off for i in x], [s[arm] for s in stats], yerr=[s.get(f"{arm}_sem") or 0.0 for s in stats],
                    fmt=marker, color=color, ecolor=color, capsize=4, markersize=6, linewidth=1.5, label=label)
    for i, s in zip(x, stats):
        sem = f" ± {s['difference_sem']:.2f}" if s["difference_sem"] is not None else ""
        top = max(s[a] + (s.get(f"{a}_sem") or 0.0) for a in ("without", "with"))
        ax.annotate(f"{s['difference']:+.2f}{sem}", (i, top), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7.5)
    ax.set_xticks(x, [f"{n}\n(n={s['n_images']})" for n, s in zip(names, stats)])
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(y0, y1)
    ax.set_ylabel("CLIP score (100 x cosine)" + ("" if zero else "\naxis zoomed: does not start at 0"))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title + "\nmean ± standard error over images; above: difference (with - without)", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"ylim": [y0, y1], "starts_at_zero": zero}


def run(cfg: EvalConfig) -> dict:
    from stages.generate import grid_cell, open_pipeline_and_adapter, pick_device, slug, versions
    from surpipe import config as cfgmod
    from surpipe import render
    from surpipe.clip_score import DEFINITION, CLIPScorer

    problems = _validate(cfg)
    if problems:
        raise SurpipeError("invalid eval settings:", problems)
    seeds = parse_seeds(cfg.seeds)
    suite = read_suite(cfg.prompts)
    if cfg.categories:
        unknown = [c for c in cfg.categories if c not in suite]
        if unknown:
            raise SurpipeError(f"unknown categories {', '.join(unknown)}; the suite has: {', '.join(suite)}")
        suite = {c: suite[c] for c in cfg.categories}
    if cfg.max_prompts_per_category:
        suite = {c: ps[:cfg.max_prompts_per_category] for c, ps in suite.items()}
    items = [(c, i, p, s) for c, ps in suite.items() for i, p in enumerate(ps) for s in seeds]

    t0 = time.perf_counter()
    # The CLIP model first: a wrong --clip-model fails before any image is rendered.
    from surpipe.hub import check_model_source

    check_model_source(cfg.clip_model, option="--clip-model", what="CLIP model")
    scorer = CLIPScorer(cfg.clip_model, revision=cfg.clip_revision, device=pick_device(cfg.device))
    pipe, adapter, folder, saved, dev, tdtype = open_pipeline_and_adapter(
        cfg.model, cfg.adapter, revision=cfg.revision, device=cfg.device, dtype=cfg.dtype,
        scheduler=cfg.scheduler, adapter_weight=cfg.adapter_weight)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SurpipeError(f"--out {out} is a file, not a folder: give a folder for the results")
    out.mkdir(parents=True, exist_ok=True)
    note = render.tiny_model_note(cfg.model, cfg.clip_model)
    if note:
        print(f"surpipe: note: {note}", file=sys.stderr, flush=True)
    print(f"surpipe: eval: {len(items)} image(s) per arm in {len(suite)} categories on {dev}", file=sys.stderr,
          flush=True)
    texts, item_seeds = [it[2] for it in items], [it[3] for it in items]
    kw = dict(seeds=item_seeds, steps=cfg.steps, guidance=cfg.guidance, size=cfg.size,
              negative_prompt=cfg.negative_prompt, batch_size=cfg.batch_size)
    images = {"without": render.render(pipe, texts, adapter=None, desc="eval: without adapter", **kw),
              "with": render.render(pipe, texts, adapter=adapter, desc="eval: with adapter", **kw)}
    scores = {arm: scorer.score(ims, texts) for arm, ims in images.items()}

    rows = []
    for k, (cat, i, prompt, seed) in enumerate(items):
        for arm in ("without", "with"):
            rec = {"category": cat, "prompt": prompt, "seed": seed, "adapter": arm == "with",
                   "clip_score": round(scores[arm][k], 4)}
            if cfg.save_images:
                rel = Path("images") / cat / f"{i:03d}_{slug(prompt)}_s{seed}_{arm}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                images[arm][k].save(out / rel)
                rec["file"] = rel.as_posix()
            rows.append(rec)
    grids = {}
    if cfg.save_images:
        (out / "grids").mkdir(exist_ok=True)
        for cat in suite:
            ks = [k for k, it in enumerate(items) if it[0] == cat and it[3] == seeds[0]]
            g = render.caption_grid(
                [(f"{items[k][2]}  (seed {seeds[0]}; CLIP {scores['without'][k]:.1f} -> {scores['with'][k]:.1f})",
                  [images["without"][k], images["with"][k]]) for k in ks],
                headers=["Stable Diffusion", "+ SUR-adapter"], cell=grid_cell(images["with"][0]), note=note)
            g.save(out / "grids" / f"{cat}.png")
            grids[cat] = f"grids/{cat}.png"

    table = {}
    for cat in suite:
        ks = [k for k, it in enumerate(items) if it[0] == cat]
        table[cat] = _stats([scores["without"][k] for k in ks], [scores["with"][k] for k in ks])
    overall = _stats(scores["without"], scores["with"])
    first = images["with"][0]
    settings = {
        "model": cfg.model, "revision": cfg.revision, "adapter": str(folder.resolve()), "adapter_config": saved,
        "adapter_weight": adapter.adapter_weight, "prompts": str(Path(cfg.prompts) if cfg.prompts else DEFAULT_SUITE),
        "categories": list(suite), "prompts_per_category": {c: len(ps) for c, ps in suite.items()},
        "seeds": seeds, "steps": cfg.steps, "guidance": cfg.guidance, "scheduler": cfg.scheduler,
        "scheduler_class": type(pipe.scheduler).__name__, "size": [first.width, first.height],
        "negative_prompt": cfg.negative_prompt, "dtype": str(tdtype).removeprefix("torch."), "device": dev,
    }
    title = f"CLIP score ({Path(cfg.clip_model).name}), {len(seeds)} seed(s), {cfg.steps} steps"
    chart = _chart(table, overall, out / "clip_scores.png", title + (" - RANDOM TINY MODELS" if note else ""))
    result = {"definition": DEFINITION, "clip": scorer.describe(), "settings": settings, "categories": table,
              "overall": overall, "grids": grids, "chart": {"file": "clip_scores.png", **chart},
              "tiny_models": note, "seconds": round(time.perf_counter() - t0, 2), "versions": versions()}
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(out / "scores.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    header = {"model": cfg.model, "adapter": str(folder), "CLIP model": cfg.clip_model,
              "seeds": ", ".join(map(str, seeds)), "steps": cfg.steps, "guidance": cfg.guidance,
              "scheduler": f"{cfg.scheduler} ({settings['scheduler_class']})",
              "size": f"{first.width}x{first.height}", "adapter_weight": adapter.adapter_weight}
    (out / "results.md").write_text(_markdown(table, overall, header, note), encoding="utf-8")
    cfgmod.save(cfg, out / "config.json")
    print(_markdown(table, overall, {}).split("\n\n", 1)[-1], file=sys.stderr)
    print(f"surpipe: wrote {out / 'results.md'}, results.json, clip_scores.png", file=sys.stderr)
    return result
