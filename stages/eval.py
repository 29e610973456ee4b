"""``surpipe eval``: the adapter judged on prompt suites by category, with and without it, at the same
seeds (the paper's table: semantic accuracy and CLIP score, image quality; user preference comes
from ``surpipe study``).

    surpipe eval --model stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter runs/sur-13b-l39 \
        --clip-model openai/clip-vit-large-patch14 --out out/eval --seeds 0,1,2 \
        --vqa-model Salesforce/blip-vqa-base --detector-model google/owlv2-base-patch16-ensemble

The suite (``data/eval_prompts/suite.jsonl``: action, color, counting, narrative; ``--prompts`` for
one's own: JSONL or a folder of CATEGORY.txt) is rendered by the stock diffusers pipeline in both
arms with the same initial noise. Writes ``OUT/results.md``/``results.json`` (CLIP score, semantic
accuracy with ``--vqa-model``/``--detector-model``, CLIP-IQA; per category, both arms, the paired
difference and its interval), ``clip_scores.png``, ``scores.jsonl``, ``judgements.jsonl``,
``questions.jsonl``, the images and grids, and ``config.json``. ``--ablation RUN`` (repeat) adds
rows to one table against the same no-adapter images. Results of random tiny models say so.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from surpipe import config as cfgmod
from surpipe.config import opt
from surpipe.evaluation.ablation import markdown as ablation_markdown, run_ablation
from surpipe.evaluation.clip_eval import clip_score_eval
from surpipe.evaluation.generate import DtypeName, SchedulerName, size_problems
from surpipe.evaluation.semantic import JudgeOptions
from surpipe.logs import get_logger
from surpipe.options import StoreAccess, option
from surpipe.store.location import apply_store_options
from surpipe.train.validation import report as held_out_report

log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


@dataclass
class EvalConfig(StoreAccess, JudgeOptions):
    """Settings of ``surpipe eval``."""

    adapter: str = option("adapter")
    model: Optional[str] = opt(None, help="Stable Diffusion model: a diffusers folder or hub id (default: the one "
                                          "the training run of --adapter used).", group="model")
    out: Optional[str] = opt(None, help="Output folder for results.md/json, clip_scores.png, scores.jsonl, images "
                                        "and grids (needed unless --no-clip-score).", group="output")
    store: Optional[str] = opt(None, help="Also report the held-out losses and alignment on this feature store, "
                                          "per category (the run's held-out rows when it trained on this store).",
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
    iqa: bool = opt(True, help="Also score each image's quality with CLIP-IQA (the --clip-model's 'Good photo.' vs "
                               "'Bad photo.'), per category and both arms.", group="output")
    extra_iqa: list[str] = opt(default_factory=list, group="output", help=(
        "One more no-reference quality metric by pyiqa name (e.g. musiq; repeat; needs pip install pyiqa)."))
    save_images: bool = opt(True, help="Save every image under OUT/images and per-category grids under OUT/grids.",
                            group="output")
    ablation: list[str] = opt(default_factory=list, group="data", help=(
        "Ablation: more adapters (run or adapter folders; repeat) evaluated against the same no-adapter images; "
        "writes OUT/ablation.md/json/png, one row per run, and each run's results under OUT/runs/."))

    def problems(self) -> list[str]:
        """Declared types and ranges, something to do, an --out folder for the CLIP-score results."""
        p = super().problems()
        if not self.clip_score and not self.store:
            p.append("nothing to do: --no-clip-score without --store; give --store S for the held-out report")
        if self.clip_score and not self.out:
            p.append("out: give --out DIR for the CLIP-score results (or --no-clip-score with --store)")
        if (self.questions or self.question_model) and not (self.vqa_model or self.detector_model):
            p.append("questions: --questions/--question-model need a judge: give --vqa-model and/or --detector-model")
        if self.ablation and not self.clip_score:
            p.append("ablation: compares rendered images: drop --no-clip-score")
        if (self.vqa_model or self.detector_model) and not self.clip_score:
            p.append("vqa_model: semantic accuracy judges rendered images: drop --no-clip-score")
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():  # before any work
            p.append(f"--out {self.out} is a file, not a folder: give a folder for the results")
        return p + size_problems(self.size)


def run(cfg: EvalConfig) -> dict:
    """Render the suite without and with the adapter, score every image, write the results;
    return what ``OUT/results.json`` holds."""
    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    cfg.raise_problems("invalid eval settings:")
    held = _held_out(cfg) if cfg.store else None
    if not cfg.clip_score:
        return {"held_out": held}
    if cfg.ablation:
        table = run_ablation(cfg, lambda c, without, keep: clip_score_eval(c, None, without, keep))
        print(ablation_markdown(table), file=sys.stderr)
        cfgmod.save(cfg, Path(cfg.out) / "config.json")
        return {"held_out": held, "ablation": table}
    return clip_score_eval(cfg, held)


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
            cfgmod.save(cfg, out / "config.json")
    log.info(f"held-out report: {held['rows']} rows in {time.perf_counter() - t0:.1f}s")
    return held
