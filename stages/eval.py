"""``surpipe eval``: CLIP score by prompt category, with and without the adapter, at the same seeds.

    surpipe eval --model stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter runs/sur-13b-l39 \
        --clip-model openai/clip-vit-large-patch14 --out out/eval --seeds 0,1,2

The prompt suites (``data/eval_prompts/suite.jsonl``: action, color, counting and free narrative,
simple prompts in the paper's style) are rendered by the stock diffusers pipeline without the
adapter and with it, each (prompt, seed) in both arms with the same initial noise. Each image is
scored against its prompt by a CLIP image-text model (``surpipe.evaluation.clip_score``:
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

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from surpipe.config import opt
from surpipe.errors import SurpipeError
from surpipe.evaluation.suite import DEFAULT_SUITE
from surpipe.evaluation.generate import DtypeName, SchedulerName, option, size_problems
from surpipe.logs import get_logger
from surpipe.train.run_folder import run_config
from surpipe.train.validation import report as held_out_report

log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


@dataclass
class EvalConfig:
    """Settings of ``surpipe eval``."""

    adapter: str = option("adapter")
    model: Optional[str] = opt(None, help="Stable Diffusion model: a diffusers folder or hub id (default: the one "
                                          "the training run of --adapter used).", group="model")
    out: Optional[str] = opt(None, help="Output folder for results.md/json, clip_scores.png, scores.jsonl, images "
                                        "and grids (needed unless --no-clip-score).", group="output")
    store: Optional[str] = opt(None, help="Also report the held-out losses and alignment on this feature store, "
                                          "per category (the run's held-out rows when it trained on this store).",
                               group="data")
    storage_options: Optional[str] = opt(None, help="JSON object of fsspec options for a --store URL (endpoint_url, "
                                                    "profile, ...; credentials better from the environment).",
                                         group="data")
    clip_score: bool = opt(True, help="Render the prompt suite in both arms and score it with CLIP (off: only the "
                                      "--store report, no image generated).", group="inference")
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
    steps: int = option("steps")
    guidance: float = option("guidance")
    size: Optional[int] = option("size")
    batch_size: int = option("batch_size")
    negative_prompt: str = option("negative_prompt")
    dtype: DtypeName = option("dtype")
    device: str = option("device")
    scheduler: SchedulerName = option("scheduler")
    adapter_weight: Optional[float] = option("adapter_weight")
    revision: Optional[str] = option("revision")
    clip_revision: Optional[str] = opt(None, help="Hub revision of --clip-model.", group="model")
    save_images: bool = opt(True, help="Save every image under OUT/images and per-category grids under OUT/grids.",
                            group="output")


def _validate(cfg: EvalConfig) -> list[str]:
    from surpipe.config import declared_problems

    p = declared_problems(cfg)
    if not cfg.clip_score and not cfg.store:
        p.append("nothing to do: --no-clip-score without --store; give --store S for the held-out report")
    if cfg.clip_score and not cfg.out:
        p.append("out: give --out DIR for the CLIP-score results (or --no-clip-score with --store)")
    if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():  # before any work
        p.append(f"--out {cfg.out} is a file, not a folder: give a folder for the results")
    return p + size_problems(cfg.size)


def run(cfg: EvalConfig) -> dict:
    """Render the suite without and with the adapter, score every image, write the results;
    return what ``OUT/results.json`` holds."""
    from surpipe.store.location import apply_store_options

    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    from surpipe import config as cfgmod
    from surpipe.evaluation import suite as evaluate
    from surpipe.evaluation import generate as inference
    from surpipe.evaluation import render
    from surpipe.evaluation.clip_score import DEFINITION, CLIPScorer
    from surpipe.devices import resolve_device
    from surpipe.hub import check_model_source

    problems = _validate(cfg)
    if problems:
        raise SurpipeError("invalid eval settings:", problems)
    held = _held_out(cfg) if cfg.store else None
    if not cfg.clip_score:
        return {"held_out": held}
    if cfg.model is None:
        cfg.model = (run_config(cfg.adapter) or {}).get("model")
        if cfg.model is None:
            raise SurpipeError("give --model: the adapter comes without its training run")
    seeds = evaluate.parse_seeds(cfg.seeds)
    suite = evaluate.select(evaluate.read_suite(cfg.prompts), cfg.categories, cfg.max_prompts_per_category)
    items = evaluate.eval_items(suite, seeds)

    t0 = time.perf_counter()
    # The CLIP model first: a wrong --clip-model fails before any image is rendered.
    check_model_source(cfg.clip_model, option="--clip-model", what="CLIP model")
    scorer = CLIPScorer(cfg.clip_model, revision=cfg.clip_revision, device=resolve_device(cfg.device, mps=True))
    models = inference.open_models(cfg.model, cfg.adapter, revision=cfg.revision, device=cfg.device,
                                   dtype=cfg.dtype, scheduler=cfg.scheduler, adapter_weight=cfg.adapter_weight)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SurpipeError(f"--out {out} is a file, not a folder: give a folder for the results")
    out.mkdir(parents=True, exist_ok=True)
    note = render.tiny_model_note(cfg.model, cfg.clip_model)
    if note:
        log.info(f"note: {note}")
    log.info(f"eval: {len(items)} image(s) per arm in {len(suite)} categories on {models.device}")
    texts = [it[2] for it in items]
    images = inference.render_arms(models, texts, arms=evaluate.ARMS, label="eval", seeds=[it[3] for it in items],
                                   steps=cfg.steps, guidance=cfg.guidance, size=cfg.size,
                                   negative_prompt=cfg.negative_prompt, batch_size=cfg.batch_size)
    scores = {arm: scorer.score(ims, texts) for arm, ims in images.items()}

    rows = evaluate.score_rows(items, scores, images if cfg.save_images else None, out)
    grids = evaluate.category_grids(out, items, images, scores, seeds[0], note) if cfg.save_images else {}
    table, overall = evaluate.category_stats(items, scores)
    first = images["with"][0]
    settings = {
        **models.describe(), "prompts": str(Path(cfg.prompts) if cfg.prompts else DEFAULT_SUITE),
        "categories": list(suite), "prompts_per_category": {c: len(ps) for c, ps in suite.items()},
        "seeds": seeds, "steps": cfg.steps, "guidance": cfg.guidance, "scheduler": cfg.scheduler,
        "size": [first.width, first.height], "negative_prompt": cfg.negative_prompt,
    }
    title = f"CLIP score ({Path(cfg.clip_model).name}), {len(seeds)} seed(s), {cfg.steps} steps"
    chart = evaluate.chart(table, overall, out / "clip_scores.png", title + (" - RANDOM TINY MODELS" if note else ""))
    result = {"definition": DEFINITION, "clip": scorer.describe(), "settings": settings, "categories": table,
              "overall": overall, "grids": grids, "chart": {"file": "clip_scores.png", **chart},
              "tiny_models": note, "seconds": round(time.perf_counter() - t0, 2), "versions": inference.versions()}
    header = {"model": cfg.model, "adapter": str(models.folder), "CLIP model": cfg.clip_model,
              "seeds": ", ".join(map(str, seeds)), "steps": cfg.steps, "guidance": cfg.guidance,
              "scheduler": f"{cfg.scheduler} ({settings['scheduler_class']})",
              "size": f"{first.width}x{first.height}", "adapter_weight": models.adapter.adapter_weight}
    if held is not None:
        result["held_out"] = held
    evaluate.write_results(out, result, rows, header, note)
    if held is not None:  # beside the CLIP-score table
        with open(out / "results.md", "a", encoding="utf-8") as f:
            f.write("\n" + held_out_report.markdown(held))
    cfgmod.save(cfg, out / "config.json")
    print(evaluate.markdown(table, overall, {}).split("\n\n", 1)[-1], file=sys.stderr)
    log.info(f"wrote {out / 'results.md'}, results.json, clip_scores.png")
    return result


def _held_out(cfg: EvalConfig) -> dict:
    """The --store report: computed, printed, and written under --out when given."""
    t0 = time.perf_counter()
    held = held_out_report.evaluate_store(cfg.store, cfg.adapter, model=cfg.model, revision=cfg.revision,
                                          device=cfg.device, batch_size=cfg.batch_size,
                                          adapter_weight=cfg.adapter_weight)
    text = held_out_report.markdown(held)
    print(text, end="")
    if cfg.out:
        out = Path(cfg.out)
        held_out_report.write(out, held)
        if not cfg.clip_score:
            from surpipe import config as cfgmod

            cfgmod.save(cfg, out / "config.json")
    log.info(f"held-out report: {held['rows']} rows in {time.perf_counter() - t0:.1f}s")
    return held
