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
- ``OUT/clip_scores.png``: a bar chart of the same;
- ``OUT/scores.jsonl``: every image's score; ``OUT/images/CATEGORY/*.png`` the images
  (``--no-save-images`` to skip) and ``OUT/grids/CATEGORY.png`` side-by-side grids (first seed);
- ``OUT/config.json``: the config to repeat the run.

``--prompts`` takes another suite: a JSONL file with ``category`` and ``prompt`` per line, or a
folder of ``CATEGORY.txt`` files (one prompt a line).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from stages.generate import DtypeName, SchedulerName
from surpipe.errors import SurpipeError

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "data" / "eval_prompts" / "suite.jsonl"


@dataclass
class EvalConfig:
    """Settings of ``surpipe eval``."""

    model: str
    adapter: str
    out: str
    clip_model: str = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIP for CLIPScore
    prompts: Optional[str] = None  # default: data/eval_prompts/suite.jsonl
    categories: list[str] = field(default_factory=list)  # empty: every category of the suite
    max_prompts_per_category: Optional[int] = None
    seeds: Union[str, list[int]] = "0"  # "0,1,2" or "0-3" (inclusive) or a JSON list
    steps: int = 30
    guidance: float = 7.5
    size: Optional[int] = None
    batch_size: int = 4
    negative_prompt: str = ""
    dtype: DtypeName = "auto"
    device: str = "auto"
    scheduler: SchedulerName = "default"
    adapter_weight: Optional[float] = None
    revision: Optional[str] = None
    clip_revision: Optional[str] = None
    save_images: bool = True


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
    p = []
    for name in ("steps", "batch_size"):
        if getattr(cfg, name) < 1:
            p.append(f"{name} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.max_prompts_per_category is not None and cfg.max_prompts_per_category < 1:
        p.append(f"max_prompts_per_category must be >= 1 (got {cfg.max_prompts_per_category})")
    if cfg.size is not None and (cfg.size < 8 or cfg.size % 8):
        p.append(f"size must be a positive multiple of 8 (got {cfg.size})")
    if cfg.adapter_weight is not None and not 0.0 <= cfg.adapter_weight <= 1.0:
        p.append(f"adapter_weight must be within [0, 1] (got {cfg.adapter_weight})")
    return p


def _stats(without: list[float], with_: list[float]) -> dict:
    n = len(without)
    diffs = [b - a for a, b in zip(without, with_)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    d = mean(diffs)
    sem = math.sqrt(sum((x - d) ** 2 for x in diffs) / (n - 1) / n) if n > 1 else None
    return {"n_images": n, "without": round(mean(without), 4), "with": round(mean(with_), 4),
            "difference": round(d, 4), "difference_sem": None if sem is None else round(sem, 4),
            "with_better": round(sum(x > 0 for x in diffs) / n, 4)}


def _markdown(table: dict, overall: dict, header: dict) -> str:
    lines = ["# CLIP score with and without the SUR-adapter", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| category | images per arm | without adapter | with adapter | difference (with - without) "
              "| with better |", "|---|---:|---:|---:|---:|---:|"]

    def row(name, s):
        sem = f" ± {s['difference_sem']:.2f}" if s["difference_sem"] is not None else ""
        return (f"| {name} | {s['n_images']} | {s['without']:.2f} | {s['with']:.2f} | "
                f"{s['difference']:+.2f}{sem} | {100 * s['with_better']:.0f}% |")

    lines += [row(c, s) for c, s in table.items()]
    lines.append(row("**all**", overall))
    lines += ["", "Difference: mean over paired images (same prompt and seed) ± its standard error. "
              "CLIP score = 100 * max(cos(image embedding, text embedding), 0), as torchmetrics' CLIPScore."]
    return "\n".join(lines) + "\n"


def _chart(table: dict, overall: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table) + ["all"]
    stats = list(table.values()) + [overall]
    x = list(range(len(names)))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names) + 1.5), 4.0), dpi=110)
    b1 = ax.bar([i - w / 2 for i in x], [s["without"] for s in stats], w, label="Stable Diffusion", color="#9aa5b1")
    b2 = ax.bar([i + w / 2 for i in x], [s["with"] for s in stats], w, label="+ SUR-adapter", color="#2f6db5")
    for bars in (b1, b2):
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, [f"{n}\n(n={s['n_images']})" for n, s in zip(names, stats)])
    ax.set_ylabel("CLIP score (100 x cosine)")
    top = max([s["with"] for s in stats] + [s["without"] for s in stats] + [1.0])
    ax.set_ylim(0, top * 1.18)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    scorer = CLIPScorer(cfg.clip_model, revision=cfg.clip_revision, device=pick_device(cfg.device))
    pipe, adapter, folder, saved, dev, tdtype = open_pipeline_and_adapter(
        cfg.model, cfg.adapter, revision=cfg.revision, device=cfg.device, dtype=cfg.dtype,
        scheduler=cfg.scheduler, adapter_weight=cfg.adapter_weight)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
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
                headers=["Stable Diffusion", "+ SUR-adapter"], cell=grid_cell(images["with"][0]))
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
    result = {"definition": DEFINITION, "clip": scorer.describe(), "settings": settings, "categories": table,
              "overall": overall, "grids": grids, "seconds": round(time.perf_counter() - t0, 2),
              "versions": versions()}
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(out / "scores.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    header = {"model": cfg.model, "adapter": str(folder), "CLIP model": cfg.clip_model,
              "seeds": ", ".join(map(str, seeds)), "steps": cfg.steps, "guidance": cfg.guidance,
              "scheduler": f"{cfg.scheduler} ({settings['scheduler_class']})",
              "size": f"{first.width}x{first.height}", "adapter_weight": adapter.adapter_weight}
    (out / "results.md").write_text(_markdown(table, overall, header), encoding="utf-8")
    _chart(table, overall, out / "clip_scores.png",
           f"CLIP score ({Path(cfg.clip_model).name}), {len(seeds)} seed(s), {cfg.steps} steps")
    cfgmod.save(cfg, out / "config.json")
    print(_markdown(table, overall, {}).split("\n\n", 1)[-1], file=sys.stderr)
    print(f"surpipe: wrote {out / 'results.md'}, results.json, clip_scores.png", file=sys.stderr)
    return result
