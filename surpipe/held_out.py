"""Held-out numbers of a finished adapter on a feature store (``surpipe eval --store``), per prompt
category: the validation terms of training (surpipe.validation) without generating an image.

Which rows: for a training run on this very store, the rows its held-out split kept out of
training (recomputed from the recorded split settings, and checked against the recorded keys);
for another store, or an adapter folder without its run, every row of the store, labelled so.
A run that trained on every row of this store is refused: its numbers would not be held out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from surpipe.errors import SurpipeError


def run_config(adapter: str) -> Optional[dict]:
    """The training config saved in the run folder ``adapter`` (or the parent of an ``adapter/``
    folder); None for an adapter folder that came without its run."""
    p = Path(adapter).expanduser()
    for folder in (p, p.parent):
        f = folder / "config.json"
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and (data.get("_surpipe") or {}).get("config") == "TrainConfig":
                return data
    return None


def _train_config(store: str, saved: Optional[dict], model: Optional[str], revision: Optional[str], same: bool):
    from surpipe.config import from_dict
    from surpipe.train_config import TrainConfig

    if saved is None:
        if model is None:
            raise SurpipeError("give --model: the adapter comes without its training run, so the Stable Diffusion "
                               "model it was trained for is unknown")
        return TrainConfig(store=store, model=model, out=".", llm_layer=-1, revision=revision, nhead=1)
    data = {k: v for k, v in saved.items() if not k.startswith("_")}
    data.update(store=store, model=model or data.get("model"), revision=revision or data.get("revision"))
    if not same:  # another store: its own rows are all unseen, no split to recompute
        data.update(val_rows=0, val_fraction=0.0)
    return from_dict(TrainConfig, data, what="the run's saved config")


def evaluate_store(store: str, adapter: str, *, model: Optional[str] = None, revision: Optional[str] = None,
                   device: str = "auto", batch_size: int = 8) -> dict:
    """The held-out metrics of ``adapter`` (run folder, adapter folder or hub id) on ``store``:
    ``{"scope", "rows", "categories": per_category(...), "table": markdown, ...}``."""
    import torch
    from diffusers import DDPMScheduler

    from surpipe.adapter import SURAdapter
    from surpipe.adapter_io import resolve_adapter_dir
    from surpipe.devices import resolve_device
    from surpipe.losses import LLMProjection
    from surpipe.store import FeatureStore
    from surpipe.train_inputs import gather
    from surpipe.train_setup import Runtime, load_unet
    from surpipe.validation import ValidationSet, evaluate_rows, markdown_table, per_category

    folder = resolve_adapter_dir(adapter)
    saved = run_config(adapter)
    fs = FeatureStore(store)
    meta = (saved or {}).get("_surpipe") or {}
    trained_on = (meta.get("run") or {}).get("dataset_fingerprint") or meta.get("store_fingerprint")
    same = saved is not None and trained_on == fs.fingerprint
    cfg = _train_config(store, saved, model, revision, same)
    found, problems = gather(cfg)
    problems = [p for p in problems if not p.startswith("nhead ")]  # the adapter's own heads are used
    if problems:
        raise SurpipeError(f"cannot evaluate {adapter} on {store}:", problems)
    held = found.get("held_out")
    if same and (held is None or not len(held)):
        raise SurpipeError(f"{adapter} was trained on every row of {store} (no held-out split): its numbers there "
                           "would not be held out; give a store of other rows, or train with --val-rows/--val-fraction")
    recorded = (meta.get("run") or {}).get("split")
    if same and recorded is not None:
        from surpipe.validation import check_same_split

        changed = check_same_split(recorded, found["split"])
        if changed:
            raise SurpipeError(f"the held-out rows of {adapter} cannot be found again in {store}:", changed)
    rows = np.asarray(held, dtype=np.int64) if same else np.arange(fs.num_samples)
    scope = ("the run's held-out rows" if same else
             "every row of a store the run did not train on" if saved is not None else
             "every row of the store (the adapter's training rows are unknown)")

    dev = torch.device(resolve_device(device))
    adapter_model = SURAdapter.from_pretrained(folder).to(dev).eval()
    if adapter_model.config.width != found["width"]:
        raise SurpipeError(f"the adapter is {adapter_model.config.width} wide but the store's CLIP embeddings are "
                           f"{found['width']}: evaluate it on a store made with its Stable Diffusion model")
    pfile = folder / "llm_projection.safetensors"
    if pfile.is_file():
        projection = LLMProjection.load(pfile)
        where = "saved with the adapter"
    else:
        projection = LLMProjection(found["llm_size"], found["width"], seed=cfg.projection_seed)
        where = f"not saved with the adapter: the frozen random one of seed {cfg.projection_seed}"
    if (projection.llm_size, projection.width) != (found["llm_size"], found["width"]):
        raise SurpipeError(f"the adapter's LLM projection maps {projection.llm_size} -> {projection.width} but the "
                           f"store's LLM layer {found['groups'].llm_layer} is {found['llm_size']} wide: choose the "
                           "LLM group and layer the adapter was trained with")
    projection = projection.to(dev).eval()
    unet = load_unet(cfg, Runtime(None, dev, torch.float32, "no"))
    scheduler = DDPMScheduler.from_config(found["sched_config"])
    vset = ValidationSet.from_store(store, found["groups"], rows, scaling_factor=found["scaling_factor"],
                                    shift_factor=found["shift_factor"],
                                    num_train_timesteps=scheduler.config.num_train_timesteps, seed=cfg.val_seed,
                                    resolution=found.get("resolution"))
    per = evaluate_rows(adapter_model, projection, unet, scheduler, vset, prediction_type=found["prediction_type"],
                        min_snr_gamma=cfg.min_snr_gamma, prompt_target=cfg.prompt_target, batch_size=batch_size)
    cats = fs.categories() if hasattr(fs, "categories") else None
    if cats is not None:
        cats = np.where(cats[rows] == "", "(none)", cats[rows])
    stats = per_category(per, cats)
    return {"store": str(store), "adapter": str(folder), "model": cfg.model, "scope": scope, "rows": int(len(rows)),
            "groups": {k: getattr(found["groups"], f"{k}_group") for k in ("llm", "clip", "vae")},
            "llm_layer": found["groups"].llm_layer, "projection": where, "val_seed": cfg.val_seed,
            "categories": stats, "table": markdown_table(stats)}
