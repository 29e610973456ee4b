"""``surpipe generate``: images from a STOCK diffusers StableDiffusionPipeline conditioned by a SUR-adapter.

    surpipe generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter runs/sur-13b-l39 \
        --prompt "a dog jumping over a fence" --out out/gen --compare

CLIP encodes the prompt and the negative prompt, the adapter conditions each one separately
(``surpipe.evaluation.render.encode``), and the pipeline takes them as ``prompt_embeds`` /
``negative_prompt_embeds``. No LLM is loaded. ``--adapter`` is a training run folder (its
``adapter/`` is used) or an adapter folder (``config.json`` + ``model.safetensors``).

Image ``k`` (counting over prompts, then ``--images-per-prompt``) uses seed ``--seed + k``, so
the same command gives the same images, and ``--compare`` renders each (prompt, seed) without and
with the adapter and writes ``compare_grid.png``. Every setting goes to ``OUT/generate.json``; the
config to repeat the run goes to ``OUT/config.json`` (``surpipe generate --config OUT/config.json``).

``--out`` must be a new or empty folder, so old and new images never mix: a folder holding an
earlier generate's files is refused unless ``--overwrite`` (which deletes only those files), and
the same command run again with the same adapter has nothing to do. An adapter with NaN/Inf
weights, or one whose output is not finite, is refused before any image is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from surpipe import config as cfgmod
from surpipe.config import Config, opt
from surpipe.evaluation import generate as inference
from surpipe.evaluation import render
from surpipe.evaluation.generate import DtypeName, SchedulerName, size_problems
from surpipe.options import option
from surpipe.logs import get_logger

log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


@dataclass
class GenerateConfig(Config):
    """Settings of ``surpipe generate``. Give ``prompt`` or ``prompts_file`` (or both)."""

    model: str = option("model")
    adapter: str = option("adapter")
    out: str = opt(help="Output folder for the images, generate.json and config.json; must be new or empty "
                        "(see --overwrite).", group="output")
    prompt: Optional[str] = opt(None, help="One prompt to render.", group="inference")
    prompts_file: Optional[str] = opt(None, help="Prompts file: one prompt a line (# comments), or JSONL with a "
                                                 "\"prompt\" field.", group="inference")
    negative_prompt: str = option("negative_prompt")
    steps: int = option("steps")
    guidance: float = option("guidance")
    seed: int = opt(0, help="Seed of the first image; image k uses seed + k.", group="inference", ge=0)
    size: Optional[int] = option("size")
    batch_size: int = option("batch_size")
    images_per_prompt: int = opt(1, help="Images per prompt, each with its own seed.", group="inference",
                                 ge=1, le=10000)
    dtype: DtypeName = option("dtype")
    device: str = option("device")
    scheduler: SchedulerName = option("scheduler")
    compare: bool = opt(False, help="Also render without the adapter at the same seeds; writes compare_grid.png.",
                        group="output")
    adapter_weight: Optional[float] = option("adapter_weight")
    revision: Optional[str] = option("revision")
    overwrite: bool = opt(False, help="Replace the images of an earlier generate in --out (nothing else is "
                                      "deleted).", group="output")

    def problems(self) -> list[str]:
        """Declared types and ranges, a prompt source, the image size."""
        p = super().problems()
        if not self.prompt and not self.prompts_file:
            p.append("give --prompt TEXT or --prompts-file FILE")
        return p + size_problems(self.size)


def run(cfg: GenerateConfig) -> dict:
    """Render the prompts (and, with ``compare``, the same without the adapter); return the record
    written to ``OUT/generate.json``."""
    cfg.raise_problems("invalid generate settings:")
    prompts = ([cfg.prompt] if cfg.prompt else []) + (inference.read_prompts(cfg.prompts_file)
                                                      if cfg.prompts_file else [])
    items = [(p, cfg.seed + i * cfg.images_per_prompt + j)
             for i, p in enumerate(prompts) for j in range(cfg.images_per_prompt)]
    t0 = time.perf_counter()
    out = Path(cfg.out)
    done = None if cfg.overwrite else inference.finished_run(out, cfg)
    if done is not None:
        log.info(f"{out} already holds this generate's {len(done['images'])} image(s) (same settings "
                 f"and adapter): nothing to do (--overwrite renders them again)")
        return done
    inference.prepare_out(out, cfg.overwrite)  # before loading anything: a wrong --out fails at once
    models = inference.open_models(cfg.model, cfg.adapter, revision=cfg.revision, device=cfg.device,
                                   dtype=cfg.dtype, scheduler=cfg.scheduler, adapter_weight=cfg.adapter_weight)
    note = render.tiny_model_note(cfg.model)
    if note:
        log.info(f"note: {note}")
    log.info(f"generating {len(items)} image(s){' x 2 (compare)' if cfg.compare else ''} on {models.device}")
    seeds = [s for _, s in items]
    images = inference.render_arms(models, [p for p, _ in items], arms=("without", "with") if cfg.compare else ("",),
                                   label="generate", seeds=seeds, steps=cfg.steps, guidance=cfg.guidance,
                                   size=cfg.size, negative_prompt=cfg.negative_prompt, batch_size=cfg.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    inference.prepare_out(out, cfg.overwrite)  # again: another job may have written there meanwhile
    records = inference.save_images(out, items, images)
    grid = None
    if cfg.compare:
        grid = "compare_grid.png"
        render.arms_grid([f"{p}  (seed {s})" for p, s in items], images["without"], images["with"],
                         cell=render.grid_cell(images["with"][0]), note=note).save(out / grid)
    first = next(iter(images.values()))[0]
    record = {
        **models.describe(),
        "adapter_sha256": inference.adapter_sha256(models.folder),
        "prompts": prompts,
        "negative_prompt": cfg.negative_prompt,
        "seeds": seeds,
        "images_per_prompt": cfg.images_per_prompt,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "scheduler": cfg.scheduler,
        "size": [first.width, first.height],
        "batch_size": cfg.batch_size,
        "adapter_dtype": str(models.adapter.dtype).removeprefix("torch."),
        "generator": "torch.Generator('cpu').manual_seed(seed), one per image",
        "compare": cfg.compare,
        "grid": grid,
        "tiny_models": note,
        "images": records,
        "seconds": round(time.perf_counter() - t0, 2),
        "versions": inference.versions(),
    }
    cfgmod.atomic_write_text(out / "generate.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    cfgmod.save(cfg, out / "config.json")
    log.info(f"wrote {len(records)} image(s){' and ' + grid if grid else ''} to {out}")
    return record
