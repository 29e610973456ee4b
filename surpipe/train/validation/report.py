"""Held-out numbers of a finished adapter on a feature store (``surpipe eval --store``), per prompt
category: the validation terms of training (surpipe.train.validation.metrics) without generating an image.

Which rows: those the adapter never trained on. For a training run on this very store, the rows its
held-out split kept out (recomputed from the recorded split settings, checked against the recorded
keys); of a run with ``--keep-best``, only the report part of them: the selection part chose the
best adapter, so its numbers would flatter it. For another store, or this store grown since, the training rows are found from the store the
run recorded (its keys minus its held-out ones) and left out by key; when that store cannot be
read, every row is evaluated and the report says the overlap is unknown. An adapter folder without
its run: every row, labelled so. A run that trained on every row of this store is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from surpipe.config import atomic_write_text, from_dict
from surpipe.devices import resolve_device
from surpipe.errors import SurpipeError
from surpipe.store import FeatureStore
from surpipe.train.config import TrainConfig
from surpipe.train.identity import recorded_split
from surpipe.train.inputs import gather
from surpipe.train.run_folder import RunFolder, projection_file, run_config
from surpipe.train.validation.metrics import evaluate_rows, markdown_table, per_category
from surpipe.train.validation.rows import CONST_ROWS, ValidationSet, mean_complex
from surpipe.train.validation.summary import prompt_verdict, retrieval_verdict
from surpipe.train.validation.split import (check_same_split, held_out_rows, selection_mask, split_record,
                                            training_rows)

FILES = ("held_out.md", "held_out.json")  # beside eval's other results in its --out
CHUNK_ROWS = 512  # rows evaluated at once: a whole store never sits in memory


def _train_config(store: str, saved: Optional[dict], model: Optional[str], revision: Optional[str], same: bool):
    """The TrainConfig the report reads the store with: the run's saved one on this ``store``."""
    if saved is None:
        if model is None:
            raise SurpipeError("give --model: the adapter comes without its training run, so the Stable Diffusion "
                               "model it was trained for is unknown")
        return TrainConfig(store=store, model=model, out=".", llm_layer=-1, revision=revision, nhead=1)
    data = {k: v for k, v in saved.items() if not k.startswith("_")}
    data.update(store=store, model=model or data.get("model"), revision=revision or data.get("revision"))
    if not same:  # the split is recomputed on the store the run trained on, not on this one
        data.update(val_rows=0, val_fraction=0.0)
    return from_dict(TrainConfig, data, what="the run's saved config")


def _training_keys(saved: dict) -> Optional[set]:
    """The sample keys the run trained on: its recorded store's keys minus its held-out ones (None
    when that store cannot be read)."""
    run = (saved.get("_surpipe") or {}).get("run") or {}
    path = run.get("store") or saved.get("store")
    try:
        keys = FeatureStore(path).keys()
    except (SurpipeError, OSError, TypeError):
        return None
    n = run.get("num_samples")
    if isinstance(n, int) and 0 < n <= len(keys):
        keys = keys[:n]  # a store that grew since keeps the run's rows first, in place
    split = dict(rows=saved.get("val_rows") or 0, fraction=saved.get("val_fraction") or 0.0,
                 seed=saved.get("val_seed") or 0)
    held = held_out_rows(keys, **split)
    recorded = recorded_split(saved.get("_surpipe") or {})
    if recorded is not None and check_same_split(recorded, split_record(keys, held, **split)):
        return None  # those are not the rows the run split: its store changed otherwise
    train = np.ones(len(keys), dtype=bool)
    train[np.asarray(held, dtype=np.int64)] = False
    return {str(k) for k in keys[train]}


def _select_rows(adapter, store, fs, saved, meta, found, same):
    """(row indices, scope text) of the rows to evaluate."""
    held = found.get("held_out")
    if same:
        if held is None or not len(held):
            raise SurpipeError(f"{adapter} was trained on every row of {store} (no held-out split): its numbers "
                               "there would not be held out; give a store of other rows, or train with "
                               "--val-rows/--val-fraction")
        recorded = recorded_split(meta)
        if recorded is not None:
            changed = check_same_split(recorded, found["split"])
            if changed:
                raise SurpipeError(f"the held-out rows of {adapter} cannot be found again in {store}:", changed)
        held = np.asarray(held, dtype=np.int64)
        if saved.get("keep_best"):  # the selection part chose OUT/best: report on the other part only
            held = held[~selection_mask(fs.keys()[held], saved.get("val_seed") or 0)]
            return held, "the report part of the run's held-out rows (the other part chose --keep-best's adapter)"
        return held, "the run's held-out rows"
    if saved is None:
        return np.arange(fs.num_samples), "every row of the store (the adapter's training rows are unknown)"
    train = _training_keys(saved)
    if train is None:
        return (np.arange(fs.num_samples), "every row of a store the run did not train on (its training store "
                "cannot be read, so an overlap of keys is not excluded)")
    keys = fs.keys()
    rows = np.array([i for i, k in enumerate(keys) if str(k) not in train], dtype=np.int64)
    if not len(rows):
        raise SurpipeError(f"every row of {store} is a row {adapter} trained on: nothing held out to evaluate")
    left = fs.num_samples - len(rows)
    return rows, (f"rows the run never trained on ({left} training rows of this store left out)" if left else
                  "every row of a store the run did not train on")


def evaluate_store(store: str, adapter: str, *, model: Optional[str] = None, revision: Optional[str] = None,
                   device: str = "auto", batch_size: int = 8, adapter_weight: Optional[float] = None) -> dict:
    """The held-out metrics of ``adapter`` (run folder, adapter folder, checkpoint or hub id) on
    ``store``: ``{"scope", "rows", "categories": per_category(...), "table": markdown, ...}``."""
    # heavy: torch, diffusers (and the adapter, losses and setup modules, which import torch)
    import torch
    from diffusers import DDPMScheduler

    from surpipe.adapter import SURAdapter
    from surpipe.adapter_io import resolve_adapter_dir
    from surpipe.train.losses import LLMProjection
    from surpipe.train.setup import Runtime, load_unet

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
    rows, scope = _select_rows(adapter, store, fs, saved, meta, found, same)

    dev = torch.device(resolve_device(device))
    adapter_model = SURAdapter.from_pretrained(folder).to(dev).eval()
    if adapter_weight is not None:
        adapter_model.config.adapter_weight = float(adapter_weight)
    if adapter_model.config.width != found["width"]:
        raise SurpipeError(f"the adapter is {adapter_model.config.width} wide but the store's CLIP embeddings are "
                           f"{found['width']}: evaluate it on a store made with its Stable Diffusion model")
    # the projection saved with the adapter (a finished run), with its checkpoint, or the seeded one
    pfile = projection_file(folder)
    if pfile is not None:
        projection = LLMProjection.load(pfile)
        where = f"{pfile.name} saved with the adapter"
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
    const_rows = (training_rows(fs.num_samples, found["held_out"]) if same and found.get("held_out") is not None
                  else np.setdiff1d(np.arange(fs.num_samples), rows))
    run = (cfg, found, rows, const_rows, batch_size)
    untrained = RunFolder.of_adapter(adapter)
    untrained = untrained.untrained if untrained is not None and untrained.untrained.is_dir() else None
    models = [adapter_model] + ([SURAdapter.from_pretrained(untrained).to(dev).eval()] if untrained else [])
    per, *base = _per_row(store, models, projection, unet, scheduler, run)
    if base:  # the run's step-0 adapter: what training started from
        per.update({name: base[0][k] for k, name in UNTRAINED.items() if k in base[0]})
    cats = fs.categories() if hasattr(fs, "categories") else None
    if cats is not None:
        cats = np.where(cats[rows] == "", "(none)", cats[rows])
    stats = per_category(per, cats)
    return {"store": str(store), "adapter": str(folder), "model": cfg.model, "scope": scope, "rows": int(len(rows)),
            "groups": {k: getattr(found["groups"], f"{k}_group") for k in ("llm", "clip", "vae")},
            "llm_layer": found["groups"].llm_layer, "projection": where, "val_seed": cfg.val_seed,
            "adapter_weight": adapter_model.config.adapter_weight, "untrained": str(untrained) if untrained else None,
            "constant_rows": int(min(len(const_rows), CONST_ROWS)), "categories": stats,
            "table": markdown_table(stats)}


# the untrained adapter's values, beside the trained one's in the report
UNTRAINED = {"val/prompt": "val/prompt_untrained", "val/cos_adapter": "val/cos_untrained", "val/r1": "val/r1_untrained",
             "val/median_rank": "val/median_rank_untrained"}


def _per_row(store, models: list, projection, unet, scheduler, run) -> list[dict]:
    """:func:`evaluate_rows` of each of ``models`` over the report's rows, a chunk at a time: each
    chunk (and the constant control) read once for all of them."""
    cfg, found, rows, const_rows, batch_size = run
    const = mean_complex(store, found["groups"], const_rows) if len(const_rows) else (None, 0)
    per: list[dict] = [{} for _ in models]
    for s in range(0, len(rows), CHUNK_ROWS):
        vset = ValidationSet.from_store(store, found["groups"], rows[s:s + CHUNK_ROWS],
                                        scaling_factor=found["scaling_factor"], shift_factor=found["shift_factor"],
                                        num_train_timesteps=scheduler.config.num_train_timesteps,
                                        seed=cfg.val_seed, resolution=found.get("resolution"))
        vset.const, vset.const_rows = const
        for model, out in zip(models, per):
            part = evaluate_rows(model, projection, unet, scheduler, vset, prediction_type=found["prediction_type"],
                                 min_snr_gamma=cfg.min_snr_gamma, prompt_target=cfg.prompt_target,
                                 batch_size=batch_size, control_seed=cfg.val_seed + s)
            for k, v in part.items():
                out[k] = np.concatenate([out[k], v], axis=-1) if k in out else v
    return per


def markdown(held: dict) -> str:
    """The report of :func:`evaluate_store` as a Markdown section (its title says which rows)."""
    return (f"## Held-out alignment ({held['scope']}: {held['rows']} rows of {held['store']})\n\n"
            "Each number stands beside its controls: the untrained adapter (the run's step 0), the raw simple-prompt "
            "embedding (what SD sees without the adapter), shuffled inputs (each row given another row's simple "
            "prompt), a constant output (the mean complex embedding of training rows), the best scaled copy of the "
            "input and chance. Lower is better for the prompt and llm terms (scale-dependent); cos is the "
            "token-averaged cosine to the own complex prompt; R@1 and the median rank say how often the own complex "
            "prompt is the nearest among the evaluated rows (scale-free, and chance for any output that ignores its "
            "input). A gain the scaled input or the constant also reaches is not learning.\n\n"
            + verdicts(held) + "\n\n" + held["table"])


def verdicts(held: dict) -> str:
    """What was learned, over all rows, against the untrained adapter and the controls (one line each)."""
    a = held["categories"]["all"]
    untrained = {k: a[v] for k, v in UNTRAINED.items() if v in a} or None
    return (f"- alignment: {retrieval_verdict(a, held['rows'], untrained)}\n"
            f"- prompt term: {prompt_verdict(a, untrained)}")


def write(out: Path, held: dict) -> None:
    """``held_out.md`` and ``held_out.json`` in folder ``out`` (made when missing), each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / FILES[0], markdown(held))
    atomic_write_text(out / FILES[1], json.dumps(held, indent=2) + "\n")
