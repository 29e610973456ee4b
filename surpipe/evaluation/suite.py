"""Evaluation of a SUR-adapter by CLIP score: prompt suites, seeds, paired statistics, tables, chart.

What ``surpipe eval`` computes and writes, apart from rendering (:mod:`surpipe.evaluation.generate`) and
scoring (:mod:`surpipe.evaluation.clip_score`). Statistics are over paired images: each (prompt, seed) is
rendered without and with the adapter from the same initial noise. Importing this module loads
no torch or matplotlib.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

from surpipe.config import atomic_write_text
from surpipe.errors import SurpipeError
from surpipe.evaluation.generate import image_name, json_lines, read_prompts, refuse_bad_lines, text_lines
from surpipe.evaluation.render import arms_grid, grid_cell

DEFAULT_SUITE = Path(__file__).resolve().parents[2] / "data" / "eval_prompts" / "suite.jsonl"  # the repository's data/
ARMS = ("without", "with")


# ----------------------------------------------------------------------------------- what to render


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
    objs, problems = json_lines(text_lines(p, "prompt suite"), ("category", "prompt"))
    for o in objs:
        suite.setdefault(o["category"], []).append(o["prompt"])
    refuse_bad_lines("prompt suite", p, problems, suite)
    return suite


def select(suite: dict[str, list[str]], categories: Sequence[str] = (),
           max_prompts_per_category: Optional[int] = None) -> dict[str, list[str]]:
    """The suite restricted to ``categories`` (in that order; all when empty) and to the first
    ``max_prompts_per_category`` prompts of each."""
    if categories:
        unknown = [c for c in categories if c not in suite]
        if unknown:
            raise SurpipeError(f"unknown categories {', '.join(unknown)}; the suite has: {', '.join(suite)}")
        suite = {c: suite[c] for c in categories}
    if max_prompts_per_category:
        suite = {c: ps[:max_prompts_per_category] for c, ps in suite.items()}
    return suite


def eval_items(suite: dict[str, list[str]], seeds: Sequence[int]) -> list[tuple[str, int, str, int]]:
    """(category, prompt index, prompt, seed) of every image of one arm."""
    return [(c, i, p, s) for c, ps in suite.items() for i, p in enumerate(ps) for s in seeds]


# ----------------------------------------------------------------------------------- outputs


def score_rows(items, scores: dict, images: Optional[dict] = None, out: Optional[Path] = None) -> list[dict]:
    """One record per image and arm (``scores.jsonl``); with ``images`` and ``out``, each image is
    saved under ``out/images/CATEGORY/`` and its record names the file."""
    rows = []
    for k, (cat, i, prompt, seed) in enumerate(items):
        for arm in ARMS:
            rec = {"category": cat, "prompt": prompt, "seed": seed, "adapter": arm == "with",
                   "clip_score": round(scores[arm][k], 4)}
            if images is not None and out is not None:
                rel = Path("images") / cat / image_name(i, prompt, seed, arm, digits=3)
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                images[arm][k].save(out / rel)
                rec["file"] = rel.as_posix()
            rows.append(rec)
    return rows


def category_grids(out: Path, items, images: dict, scores: dict, seed: int, note: Optional[str] = None) -> dict:
    """``out/grids/CATEGORY.png``: each prompt of the category at ``seed``, without and with the
    adapter, captioned with both scores; returns {category: relative path}."""
    (out / "grids").mkdir(exist_ok=True)
    grids = {}
    for cat in dict.fromkeys(it[0] for it in items):
        ks = [k for k, it in enumerate(items) if it[0] == cat and it[3] == seed]
        g = arms_grid([f"{items[k][2]}  (seed {seed}; CLIP {scores['without'][k]:.1f} -> {scores['with'][k]:.1f})"
                       for k in ks], [images["without"][k] for k in ks], [images["with"][k] for k in ks],
                      cell=grid_cell(images["with"][0]), note=note)
        g.save(out / "grids" / f"{cat}.png")
        grids[cat] = f"grids/{cat}.png"
    return grids


def write_results(out: Path, result: dict, rows: list[dict], header: dict, note: Optional[str] = None) -> None:
    """``results.json`` (``result``), ``scores.jsonl`` (``rows``) and ``results.md`` (the table)."""
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(out / "results.md", markdown(result["categories"], result["overall"], header, note))


# ----------------------------------------------------------------------------------- statistics


def sem(xs: list[float]) -> Optional[float]:
    """Standard error of the mean: sample standard deviation (n - 1) / sqrt(n); None below 2 values."""
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def stats(without: list[float], with_: list[float]) -> dict:
    """Both arms' mean and its standard error over the images, and the paired difference
    (with - without, same prompt and seed) with its standard error."""
    n = len(without)
    diffs = [b - a for a, b in zip(without, with_)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"n_images": n, "without": round(mean(without), 4), "without_sem": r(sem(without)),
            "with": round(mean(with_), 4), "with_sem": r(sem(with_)),
            "difference": round(mean(diffs), 4), "difference_sem": r(sem(diffs)),
            "with_better": round(sum(x > 0 for x in diffs) / n, 4)}


def category_stats(items, scores: dict) -> tuple[dict, dict]:
    """({category: stats}, stats of all images together)."""
    table = {}
    for cat in dict.fromkeys(it[0] for it in items):
        ks = [k for k, it in enumerate(items) if it[0] == cat]
        table[cat] = stats([scores["without"][k] for k in ks], [scores["with"][k] for k in ks])
    return table, stats(scores["without"], scores["with"])


def markdown(table: dict, overall: dict, header: dict, note: Optional[str] = None) -> str:
    """results.md: the header lines, then one row per category and one for all images."""
    lines = ["# Stable Diffusion with and without the SUR-adapter", ""]
    if note:
        lines += [f"> **Note: {note}.**", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "## CLIP score", "", *table_lines(table, overall, ".2f"),
              "", "Each value: mean ± its standard error over the images (prompt × seed). Difference: mean over "
              "paired images (same prompt and seed) ± its standard error. "
              "CLIP score = 100 * max(cos(image embedding, text embedding), 0), as torchmetrics' CLIPScore."]
    return "\n".join(lines) + "\n"


def table_lines(table: dict, overall: dict, fmt: str) -> list[str]:
    """Per-category rows of :func:`stats` results (both arms ± SEM, the paired difference, wins), then all."""
    def pm(v):
        return f" ± {v:{fmt}}" if v is not None else ""

    def row(name, s):
        return (f"| {name} | {s['n_images']} | {s['without']:{fmt}}{pm(s.get('without_sem'))} | "
                f"{s['with']:{fmt}}{pm(s.get('with_sem'))} | {s['difference']:+{fmt}}{pm(s['difference_sem'])} | "
                f"{100 * s['with_better']:.0f}% |")

    return (["| category | images per arm | without adapter | with adapter | difference (with - without) "
             "| with better |", "|---|---:|---:|---:|---:|---:|"]
            + [row(c, s) for c, s in table.items()] + [row("**all**", overall)])


# ----------------------------------------------------------------------------------- chart


def _top(s: dict, arm: str) -> float:
    return s[arm] + (s.get(f"{arm}_sem") or 0.0)


def chart_limits(rows: list[dict]) -> tuple[float, float, bool]:
    """(y min, y max, starts at zero) for the chart: from 0 when that still shows the arms'
    difference (the smallest lower error bar is under half the largest upper one), else zoomed
    to the error bars so a small difference is visible."""
    lo = min(s[a] - (s.get(f"{a}_sem") or 0.0) for s in rows for a in ARMS)
    hi = max(_top(s, a) for s in rows for a in ARMS)
    if lo <= 0.5 * hi or hi <= 0:
        return 0.0, max(hi, 1.0) * 1.18, True
    span = max(hi - lo, 0.02 * hi, 0.5)
    return max(0.0, lo - 0.3 * span), hi + 0.45 * span, False


def chart(table: dict, overall: dict, path: Path, title: str) -> dict:
    """Both arms per category (mean ± standard error over the images), the difference written
    above; returns the y limits used."""
    import matplotlib  # heavy: only the chart needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table) + ["all"]
    rows = list(table.values()) + [overall]
    x = list(range(len(names)))
    w = 0.17
    y0, y1, zero = chart_limits(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names) + 1.5), 4.2), dpi=110)
    for off, arm, label, color, marker in ((-w, "without", "Stable Diffusion", "#7a8794", "o"),
                                           (w, "with", "+ SUR-adapter", "#2f6db5", "s")):
        ax.errorbar([i + off for i in x], [s[arm] for s in rows], yerr=[s.get(f"{arm}_sem") or 0.0 for s in rows],
                    fmt=marker, color=color, ecolor=color, capsize=4, markersize=6, linewidth=1.5, label=label)
    for i, s in zip(x, rows):
        err = f" ± {s['difference_sem']:.2f}" if s["difference_sem"] is not None else ""
        ax.annotate(f"{s['difference']:+.2f}{err}", (i, max(_top(s, a) for a in ARMS)), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7.5)
    ax.set_xticks(x, [f"{n}\n(n={s['n_images']})" for n, s in zip(names, rows)])
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
