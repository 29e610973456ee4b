"""What a training run evaluates on the side: the held-out validation set, the best adapter by its
held-out score (``--keep-best``) and the with/without picture grid (``--validation-every``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from surpipe.evaluation.render import compare_grid
from surpipe.train.run_folder import RunFolder
from surpipe.train.validation.metrics import ValidationSet, selection_score


def validation_set(cfg, inputs, scheduler) -> Optional[ValidationSet]:
    """The held-out rows with their fixed latents, noise and timesteps (None without a split)."""
    if inputs.held_out is None or not len(inputs.held_out):
        return None
    return ValidationSet.from_store(cfg.store, inputs.groups, inputs.held_out, scaling_factor=inputs.scaling_factor,
                                    shift_factor=inputs.shift_factor,
                                    num_train_timesteps=scheduler.config.num_train_timesteps,
                                    seed=cfg.val_seed, resolution=inputs.resolution)


def keep_if_best(run: RunFolder, metrics: dict, step: int, modules: dict) -> Optional[float]:
    """Write ``OUT/best`` when ``metrics``' score (val/prompt + val/llm) beats the kept one; returns
    the score when it did. Checkpoints and resume are untouched."""
    score = selection_score(metrics)
    kept = run.best_score()
    if kept is not None and score >= kept:
        return None
    run.save_best(**modules, note={"step": step, "score": score, "selection": "val/prompt + val/llm", **metrics})
    return score


def validation_grid(cfg, inputs, adapter, unet, run: RunFolder, step: int, device, dtype) -> Path:
    """Render the validation prompts without and with the adapter (same seeds) into a grid."""
    prompts = cfg.validation_prompts or [str(p) for p in inputs.store.prompts("simple")[:4]]
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
