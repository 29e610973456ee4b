"""What a training run evaluates on the side: the held-out validation set, the best adapter by its
held-out score (``--keep-best``) and the with/without picture grid (``--validation-every``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from surpipe.evaluation.render import compare_grid
from surpipe.train.run_folder import RunFolder
import numpy as np

from surpipe.train.validation.metrics import selection_score
from surpipe.train.validation.rows import ValidationSet
from surpipe.train.validation.split import selection_mask, training_rows


def validation_set(cfg, inputs, scheduler) -> Optional[ValidationSet]:
    """The held-out rows with their fixed latents, noise and timesteps (None without a split)."""
    if inputs.held_out is None or not len(inputs.held_out):
        return None
    return ValidationSet.from_store(cfg.store, inputs.groups, inputs.held_out, scaling_factor=inputs.scaling_factor,
                                    shift_factor=inputs.shift_factor,
                                    num_train_timesteps=scheduler.config.num_train_timesteps,
                                    seed=cfg.val_seed, resolution=inputs.resolution,
                                    train_rows=training_rows(inputs.store.num_samples, inputs.held_out))


def selection_part(cfg, vset: Optional[ValidationSet]) -> Optional[np.ndarray]:
    """With ``--keep-best``: bool per held-out row, True on the part the best adapter is chosen on
    (the rest is what ``eval --store`` reports on); None otherwise."""
    if not cfg.keep_best or vset is None:
        return None
    return selection_mask(vset.keys, cfg.val_seed)


def keep_if_best(run: RunFolder, metrics: dict, step: int, modules: dict) -> Optional[float]:
    """Write ``OUT/best`` when the score on the selection part of the held-out rows
    (``val/select_score``: the trained terms, :func:`selection_score`) beats the kept one; returns
    the score when it did. Checkpoints and resume are untouched."""
    score = metrics.get("val/select_score", selection_score(metrics))
    kept = run.best_score()
    if kept is not None and score >= kept:
        return None
    run.save_best(**modules, note={"step": step, "score": score, "selection": "val/prompt (val/prompt_fc with "
                                   "--prompt-target fc) + val/llm on the selection part of the held-out rows",
                                   **metrics})
    return score


def validation_grid(cfg, inputs, adapter, unet, run: RunFolder, step: int, device, dtype) -> Optional[Path]:
    """Render the validation prompts without and with the adapter (same seeds) into a grid: the
    given ``--validation-prompt``s, else the first 4 held-out rows' simple prompts, never training rows."""
    prompts = cfg.validation_prompts or grid_prompts(inputs)
    if not prompts:
        return None
    was_training = adapter.training
    adapter.eval()
    path = run.validation_image(step)
    try:
        compare_grid(cfg.model, adapter, prompts, path, unet=unet, steps=cfg.validation_steps,
                     seed=cfg.validation_seed, size=cfg.validation_size, revision=cfg.revision,
                     device=device, dtype=dtype, progress=False)
    finally:
        adapter.train(was_training)
    return path


def grid_prompts(inputs, n: int = 4) -> list[str]:
    """The simple prompts of the first ``n`` held-out rows (empty without a split)."""
    held = inputs.held_out
    if held is None or not len(held):
        return []
    simple = inputs.store.prompts("simple")
    return [str(simple[int(r)]) for r in held[:n]]
