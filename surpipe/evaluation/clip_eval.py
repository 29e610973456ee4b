"""One CLIP-score evaluation (``surpipe eval``): the prompt suite rendered without and with the
adapter at the same seeds, every image scored against its prompt by a CLIP image-text model
(:mod:`surpipe.evaluation.clip_score`), and the results written: ``results.md``/``results.json``
(per category, both arms, the paired difference, its standard error, the share of pairs the adapter
wins), ``clip_scores.png``, ``scores.jsonl``, the images and per-category grids."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from surpipe import config as cfgmod
from surpipe.devices import resolve_device
from surpipe.errors import SurpipeError
from surpipe.evaluation import generate as inference
from surpipe.evaluation import render
from surpipe.evaluation import accuracy, paper
from surpipe.evaluation import suite as evaluate
from surpipe.evaluation.clip_score import DEFINITION, IQA_DEFINITION, IQA_PAIRS, CLIPScorer
from surpipe.evaluation.semantic import load_judges, precheck, semantic_accuracy, wanted
from surpipe.evaluation.suite import DEFAULT_SUITE
from surpipe.hub import check_model_source
from surpipe.logs import get_logger
from surpipe.train.run_folder import run_config
from surpipe.train.validation import report as held_out_report

log = get_logger()


def clip_score_eval(cfg, held: dict | None, without: list | None = None, keep: dict | None = None) -> dict:
    """Render, score and write the CLIP-score results of ``cfg`` (an ``EvalConfig``); ``held``, the
    ``--store`` report, goes beside them. Returns what ``OUT/results.json`` holds.

    ``without``: the no-adapter images of the same suite and seeds, rendered before (an ablation
    renders them once); ``keep`` receives this run's images by arm."""
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
    judges = None
    if wanted(cfg):  # judges, question LM and question file: refused before rendering too
        precheck(cfg)
        judges = load_judges(cfg)
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
    images = inference.render_arms(models, texts, arms=evaluate.ARMS if without is None else ("with",), label="eval",
                                   seeds=[it[3] for it in items], steps=cfg.steps, guidance=cfg.guidance,
                                   size=cfg.size, negative_prompt=cfg.negative_prompt, batch_size=cfg.batch_size)
    if without is not None:
        images = {"without": without, "with": images["with"]}
    if keep is not None:
        keep.update(images)
    scores = {arm: scorer.score(ims, texts) for arm, ims in images.items()}

    rows = evaluate.score_rows(items, scores, images if cfg.save_images else None, out)
    quality = image_quality(scorer, items, images, rows, cfg.extra_iqa, cfg.device) if cfg.iqa else None
    semantic = semantic_accuracy(cfg, items, images, out, judges) if judges else None
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
    result.update({k: v for k, v in (("held_out", held), ("clip_iqa", quality), ("accuracy", semantic)) if v})
    evaluate.write_results(out, result, rows, header, note)
    _append_sections(out, result)
    cfgmod.save(cfg, out / "config.json")
    print(evaluate.markdown(table, overall, {}).split("\n\n", 1)[-1], file=sys.stderr)
    log.info(f"wrote {out / 'results.md'}, results.json, clip_scores.png")
    return result


def _append_sections(out: Path, result: dict) -> None:
    """results.md after the CLIP-score table: accuracy, image quality, the held-out report; then the
    paper-layout table at the top (no study tallied yet)."""
    sections = [accuracy.markdown(result["accuracy"])] if result.get("accuracy") else []
    sections += [quality_markdown(result["clip_iqa"])] if result.get("clip_iqa") else []
    sections += [held_out_report.markdown(result["held_out"])] if result.get("held_out") else []
    with open(out / "results.md", "a", encoding="utf-8") as f:
        for section in sections:
            f.write("\n" + section)
    paper.fill_preference(out, None)


def image_quality(scorer: CLIPScorer, items, images: dict, rows: list[dict], extra: list[str] = (),
                  device: str = "cpu") -> dict:
    """CLIP-IQA of every image (added to its ``scores.jsonl`` record), per category and overall, both
    arms, with the paired difference; ``extra``: more no-reference metrics by pyiqa name (e.g. musiq),
    each as its own section under ``extra``."""
    metrics = {"clip_iqa": {arm: scorer.iqa(ims) for arm, ims in images.items()}}
    for name in extra:
        metrics[name] = pyiqa_scores(name, images, resolve_device(device))
    for r in rows:  # rows: one per item and arm, in the items' order
        k = next(i for i, it in enumerate(items) if (it[0], it[2], it[3]) == (r["category"], r["prompt"], r["seed"]))
        for name, v in metrics.items():
            r[name] = round(v["with" if r["adapter"] else "without"][k], 5)
    table, overall = evaluate.category_stats(items, metrics["clip_iqa"])
    out = {"definition": IQA_DEFINITION, "prompts": [list(p) for p in IQA_PAIRS], "categories": table,
           "overall": overall, "extra": {}}
    for name in extra:
        t, o = evaluate.category_stats(items, metrics[name])
        out["extra"][name] = {"definition": f"pyiqa metric {name!r}", "categories": t, "overall": o}
    return out


def pyiqa_scores(name: str, images: dict, device: str) -> dict:
    """{arm: scores} of pyiqa's no-reference metric ``name`` (pip install pyiqa; it fetches its weights)."""
    try:
        import pyiqa  # optional: one more no-reference metric by name
    except ImportError:
        raise SurpipeError(f"--extra-iqa {name}: needs pyiqa (pip install pyiqa)") from None
    import numpy as np
    import torch  # heavy: keeps --help torch-free

    try:
        metric = pyiqa.create_metric(name, device=device, as_loss=False)
    except Exception as e:  # noqa: BLE001 - pyiqa raises many types for unknown names or missing weights
        raise SurpipeError(f"--extra-iqa {name}: pyiqa cannot create it ({type(e).__name__}: {e})") from None
    out = {}
    with torch.no_grad():
        for arm, ims in images.items():
            x = [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
                 for im in ims]
            out[arm] = [float(metric(t.to(device)).reshape(-1)[0]) for t in x]
    return out


def quality_markdown(quality: dict) -> str:
    """The image-quality section(s) of results.md."""
    text = ("## Image quality (CLIP-IQA, no reference)\n\n"
            + "\n".join(evaluate.table_lines(quality["categories"], quality["overall"], ".3f"))
            + f"\n\n{quality['definition']}. Mean ± standard error over the images; difference over paired images.\n")
    for name, q in quality.get("extra", {}).items():
        text += (f"\n## Image quality ({name}, pyiqa)\n\n"
                 + "\n".join(evaluate.table_lines(q["categories"], q["overall"], ".3f")) + "\n")
    return text
