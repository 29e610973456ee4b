"""Ablation tables: ``surpipe eval --adapter A --ablation B --ablation C`` evaluates several adapters
(e.g. trained on different LLM layers or LLM sizes) against one no-adapter arm, rendered once.

Each run's full results go to ``OUT/runs/<label>/`` (as a single eval writes them); ``OUT/ablation.md``,
``ablation.json`` and ``ablation.png`` put them side by side: one row per run, one column per
metric and category, each cell the difference to the no-adapter arm with its 95% interval (CLIP
score and CLIP-IQA: ±1.96 standard errors of the paired difference; accuracy: the bootstrap
interval over prompts).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Optional

from surpipe.config import atomic_write_text
from surpipe.errors import SurpipeError
from surpipe.train.run_folder import run_config

Z95 = 1.959963984540054


def label(adapter: str, taken: set) -> str:
    """A short, unique, file-safe name for a run: its folder name, with the run's LLM layer when known."""
    saved = run_config(adapter) or {}
    base = Path(str(adapter).rstrip("/")).name or "adapter"
    if base in ("adapter", "best") and Path(adapter).parent.name:
        base = f"{Path(adapter).parent.name}-{base}"
    if saved.get("llm_layer") is not None and f"l{saved['llm_layer']}" not in base:
        base += f"-l{saved['llm_layer']}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)
    out, k = name, 2
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    taken.add(out)
    return out


def run_ablation(cfg, evaluate_one: Callable) -> dict:
    """Evaluate ``cfg.adapter`` and every ``cfg.ablation`` adapter; ``evaluate_one(cfg, without, keep)``
    is the single eval (clip_eval.clip_score_eval without its held-out part)."""
    adapters = [cfg.adapter, *cfg.ablation]
    if len(set(adapters)) != len(adapters):
        raise SurpipeError("--ablation: each adapter once (the --adapter one is the first row)")
    from surpipe.adapter_io import resolve_adapter_dir  # heavy: torch (eval's --help stays torch-free)

    for a in adapters:  # every adapter found before the first image is rendered
        resolve_adapter_dir(a)
    out, taken, rows, without = Path(cfg.out), set(), [], None
    for a in adapters:
        name = label(a, taken)
        keep: dict = {}
        sub = dataclasses.replace(cfg, adapter=a, out=str(out / "runs" / name), ablation=[], store=None)
        res = evaluate_one(sub, without, keep)
        without = keep.get("without", without)  # rendered by the first run, reused by the others
        rows.append({"run": name, "adapter": str(a), "results": f"runs/{name}/results.json", **cells(res)})
    table = {"rows": rows, "metrics": metric_columns(rows)}
    atomic_write_text(out / "ablation.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(out / "ablation.md", markdown(table))
    chart(table, out / "ablation.png")
    return table


def cells(res: dict) -> dict:
    """{"metric | category": {"difference", "ci95", "without", "with"}} of one run's results."""
    out = {}

    def sem_cells(name, section):
        if not section:
            return
        for cat, s in {**section["categories"], "all": section["overall"]}.items():
            half = Z95 * (s.get("difference_sem") or 0.0)
            out[f"{name} | {cat}"] = {"difference": s["difference"], "ci95": [s["difference"] - half,
                                                                               s["difference"] + half],
                                      "without": s["without"], "with": s["with"]}

    sem_cells("CLIP score", {"categories": res["categories"], "overall": res["overall"]})
    sem_cells("CLIP-IQA", res.get("clip_iqa"))
    acc = res.get("accuracy")
    if acc:
        for r in acc["rows"] + [{"category": "all", "judge": j, **s} for j, s in acc["overall"].items()]:
            out[f"accuracy ({r['judge']}) | {r['category']}"] = {
                "difference": r["difference"], "ci95": r["difference_ci95"], "without": r["without"], "with": r["with"]}
    return {"cells": out}


def metric_columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r["cells"] if c not in cols]
    return cols


def markdown(table: dict) -> str:
    cols = table["metrics"]
    lines = ["# Ablation: difference to the no-adapter arm (with - without), 95% interval", "",
             "| run | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in table["rows"]:
        cells_ = [r["cells"].get(c) for c in cols]
        lines.append(f"| {r['run']} | " + " | ".join(
            "" if c is None else f"{c['difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" for c in cells_)
            + " |")
    lines += ["", "CLIP score and CLIP-IQA: ±1.96 standard errors of the paired difference over images; accuracy: "
              "bootstrap interval over prompts. Every run is judged on the same no-adapter images, prompts, seeds "
              "and questions; each run's full results are under runs/."]
    return "\n".join(lines) + "\n"


def chart(table: dict, path: Path, which: Optional[list[str]] = None) -> None:
    """One panel per metric (its "all" column): each run's difference with its interval."""
    import matplotlib  # heavy: keeps --help fast

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = which or [c for c in table["metrics"] if c.endswith("| all")]
    if not cols:
        return
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols) + 1, 3.2), squeeze=False)
    runs = [r["run"] for r in table["rows"]]
    for ax, col in zip(axes[0], cols):
        vals = [r["cells"].get(col) for r in table["rows"]]
        for i, v in enumerate(vals):
            if v is not None:
                ax.errorbar(i, v["difference"], yerr=[[v["difference"] - v["ci95"][0]], [v["ci95"][1] - v["difference"]]],
                            fmt="o", capsize=4)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(runs)), runs, rotation=30, ha="right", fontsize=8)
        ax.set_title(col.replace(" | all", ""), fontsize=9)
    fig.suptitle("difference to no adapter (95% interval)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
