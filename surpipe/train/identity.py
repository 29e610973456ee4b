"""A training run's identity: what it was trained on (store, model, groups, layer, settings, global
batch, held-out split), recorded in its ``config.json`` and compared at every resume, so a resume
never silently mixes two stores, models, groups or settings. The folder's side of the check (a file
in the way, a damaged config.json) is :meth:`surpipe.train.run_folder.RunFolder.resume_problems`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from surpipe.config import to_dict
from surpipe.features import open_group
from surpipe.store import settings_hash
from surpipe.store.location import canonical
from surpipe.train.groups import model_id
from surpipe.train.run_layout import CONFIG
from surpipe.train.validation.split import check_same_split

# Settings that may change between a run and its resume: they do not change what is learned.
RESUMABLE_CHANGES = {
    "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "tensorboard", "report_to", "workers",
    "progress", "device", "validation_every", "validation_prompts", "validation_steps",
    "validation_size", "validation_seed", "loss_curve", "validation_images", "keep_best",
    "log_denoise_every", "storage_options", "cache_dir", "cache_gb",
    # how the same computation runs (advice in train's messages says to change these and rerun)
    "compile_unet", "compile_mode", "unet_fp8", "gradient_checkpointing", "mixed_precision",
    # an override of a check: the group it lets through is recorded in the identity
    "allow_other_vae",
}

# Settings compared resolved at a resume (``run_identity``), not as typed: the same store or model
# given by a relative path, a symlink or with a trailing slash is the same.
IDENTITY_KEYS = {"store", "out", "model", "llm_group", "clip_group", "vae_group", "llm_layer"}

KINDS = ("llm", "clip", "vae")

# The held-out split's settings: compared through the recorded split (``check_same_split``), which
# also notices when the same settings pick other rows (the store's keys changed).
SPLIT_KEYS = {"val_rows", "val_fraction", "val_seed"}

# The batch options: compared as the run's global batch (``batch_problem``), with the number of
# processes recorded in ``_surpipe.world_size``, not one by one.
BATCH_KEYS = {"batch_size", "grad_accum"}


def resume_settings(cfg: Any) -> dict:
    """The settings a resume must share with the run, with the identity keys (store, model,
    groups, layer, out) left out: those are compared resolved, through ``run_identity``."""
    return {k: v for k, v in to_dict(cfg).items()
            if k not in RESUMABLE_CHANGES and k not in IDENTITY_KEYS and k not in SPLIT_KEYS and k not in BATCH_KEYS}


def batch_problem(old: dict, meta: dict, cfg: Any, world: int) -> Optional[str]:
    """Why a resume with ``cfg``'s batch options on ``world`` processes would train another global
    batch than the run ``old`` (its saved options, ``meta`` its ``_surpipe`` record); None: the same.

    The global batch, batch-size x processes x grad-accum, is the run's identity; how it is split
    is not: the sample stream is one row sequence cut into steps of that many rows
    (surpipe.train.data.SampleStream), so every split reads the same rows at every step and a
    checkpoint's data position is exact for all of them (only the noise draws and dropout masks
    fall otherwise, as on another device). A folder from before ``world_size`` was recorded ran on
    one process."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    bs, ga = old.get("batch_size", defaults["batch_size"]), old.get("grad_accum", defaults["grad_accum"])
    w = meta.get("world_size", 1)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (bs, ga, w)):
        return (f"{Path(cfg.out) / CONFIG} is damaged: batch_size {bs!r}, grad_accum {ga!r}, world_size "
                f"{w!r} are not all positive integers; restore it, or choose another --out")
    then, now = bs * w * ga, cfg.batch_size * world * cfg.grad_accum
    if then == now:
        return None

    def procs(n):
        return f"{n} process" + ("es" if n != 1 else "")

    # the run's global batch on this many processes: keep this run's accumulation, else the run's,
    # else micro-batches of one row; on one process when this many do not divide it
    way = next((f"--batch-size {then // (world * g)} --grad-accum {g} on {procs(world)}"
                for g in (cfg.grad_accum, ga, then // world) if g and then % (world * g) == 0),
               f"--batch-size {bs * w} --grad-accum {ga} on 1 process")
    return (f"run folder {cfg.out} trains a global batch of {then} rows per step (batch-size {bs} x {procs(w)} "
            f"x grad-accum {ga}), this run would take {now} (batch-size {cfg.batch_size} x {procs(world)} x "
            f"grad-accum {cfg.grad_accum}); resume with {way} (any split of {then} rows resumes), "
            "or choose another --out")


def run_identity(cfg: Any, store, groups, split: Optional[dict] = None) -> Optional[dict]:
    """What this run trains on, resolved: the store (path, dataset fingerprint, rows, blocks),
    the model, the LLM layer, each group with its settings and the held-out ``split``
    (``surpipe.train.validation.split.split_record``, when given); None when the store or a group could not be
    resolved."""
    g = groups
    if store is None or g is None or None in (g.llm_group, g.clip_group, g.vae_group):
        return None
    recorded = {}
    for kind in KINDS:
        path, req = getattr(g, f"{kind}_group"), getattr(cfg, f"{kind}_group")
        s = open_group(store, path).settings
        if kind == "llm":  # layers added to the group later leave the stored ones unchanged
            s = {k: v for k, v in s.items() if k != "layers"}
        recorded[kind] = {"path": path, "picked": "auto" if req is None else "option",
                          "settings_hash": settings_hash(s), "settings": s}
    return {"store": canonical(cfg.store),  # a URL as given, a local path resolved
            "dataset_fingerprint": store.fingerprint, "num_samples": store.num_samples,
            "block_rows": store.block_rows, "model": model_id(cfg.model), "llm_layer": g.llm_layer,
            "groups": recorded, **({"split": split} if split is not None else {})}


def _legacy_changes(old: dict, meta: dict, new: dict) -> list[str]:
    """Changes against a run folder from before identities were recorded (typed options only)."""
    fp = meta.get("store_fingerprint")
    changes = []
    if fp is not None and fp != new["dataset_fingerprint"]:
        changes.append(f"the store's dataset changed: fingerprint {str(fp)[:12]} then, "
                       f"{new['dataset_fingerprint'][:12]} now")
    for k, now in (("llm_layer", new["llm_layer"]), ("model", new["model"])):
        then = old.get(k)
        if k == "model" and isinstance(then, str):
            then = model_id(then)
        if then != now:
            changes.append(f"{k}: {then!r} then, {now!r} now")
    for kind in KINDS:
        then = old.get(f"{kind}_group")
        if isinstance(then, str) and not then.startswith(kind + "/"):
            then = f"{kind}/{then}"
        if then is not None and then != new["groups"][kind]["path"]:
            changes.append(f"{kind} group: {then!r} then, {new['groups'][kind]['path']!r} now")
    return changes


def identity_changes(cfg: Any, store, groups, old: dict, meta: dict) -> list[str]:
    """What differs between the run folder's recorded identity (``meta["run"]``, or the typed
    options ``old`` of an older folder) and this run's, one line each."""
    new = run_identity(cfg, store, groups)
    if new is None:
        return []  # the store or a group is unusable: reported by the checks already
    rec = meta.get("run")
    if not isinstance(rec, dict):
        return _legacy_changes(old, meta, new)
    changes = []
    if rec.get("dataset_fingerprint") != new["dataset_fingerprint"]:
        changes.append(
            f"the store's dataset changed: {rec.get('store')} held {rec.get('num_samples')} rows (dataset "
            f"fingerprint {str(rec.get('dataset_fingerprint'))[:12]}), {new['store']} holds "
            f"{new['num_samples']} rows (fingerprint {new['dataset_fingerprint'][:12]})"
            + (" (the store grew: dataset rows were appended to it since)"
               if isinstance(rec.get("num_samples"), int) and new["num_samples"] > rec["num_samples"] else ""))
    else:
        for k in ("num_samples", "block_rows"):
            if rec.get(k) != new[k]:
                changes.append(f"store {k}: {rec.get(k)!r} then, {new[k]!r} now")
    if rec.get("model") != new["model"]:
        changes.append(f"model: {rec.get('model')!r} then, {new['model']!r} now")
    if rec.get("llm_layer") != new["llm_layer"]:
        hint = " (--llm-layer -1 means the last stored layer, and the group's layers changed)" \
            if cfg.llm_layer < 0 else ""
        changes.append(f"llm layer: {rec.get('llm_layer')!r} then, {new['llm_layer']!r} now{hint}")
    old_groups = rec.get("groups") if isinstance(rec.get("groups"), dict) else {}
    for kind in KINDS:
        was, now = old_groups.get(kind), new["groups"][kind]
        if not isinstance(was, dict):
            changes.append(f"{kind} group: not recorded then, {now['path']} now")
            continue
        if was.get("path") != now["path"]:
            how = "picked automatically" if now["picked"] == "auto" else f"given by --{kind}-group"
            changes.append(f"{kind} group: {was.get('path')} then, {now['path']} now ({how})")
        elif was.get("settings_hash") != now["settings_hash"]:
            ws = was.get("settings") if isinstance(was.get("settings"), dict) else {}
            diff = sorted(k for k in set(ws) | set(now["settings"]) if ws.get(k) != now["settings"].get(k))
            what = "; ".join(f"{k}: {ws.get(k)!r} then, {now['settings'].get(k)!r} now" for k in diff[:6])
            changes.append(f"{now['path']} was rewritten with other settings since the run began "
                           f"({what or 'settings hash ' + str(was.get('settings_hash')) + ' then, ' + now['settings_hash'] + ' now'})")
    return changes


def settings_problems(cfg: Any, saved: dict, meta: dict, store, groups, split: Optional[dict] = None,
                      world: int = 1) -> list[str]:
    """What keeps ``cfg`` on ``world`` processes from resuming the run whose saved options are
    ``saved`` (``meta`` its ``_surpipe`` record): other settings, another global batch, other data
    than recorded, or another held-out ``split`` (every one at once)."""
    out = Path(cfg.out)
    identity = {k: v for k, v in saved.items() if k in IDENTITY_KEYS}
    batch = batch_problem(saved, meta, cfg, world)
    new = resume_settings(cfg)
    # a key missing from an older run folder holds its default (options added since keep it)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    old = {k: v for k, v in saved.items()
           if k not in RESUMABLE_CHANGES and k not in IDENTITY_KEYS and k not in SPLIT_KEYS and k not in BATCH_KEYS}
    diff = sorted(k for k in set(old) | set(new) if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k)))
    problems = [f"run folder {out} was started with other settings ({k}: {old.get(k, defaults.get(k))!r} "
                f"there, {new.get(k)!r} now); resume with the same settings or choose another --out"
                for k in diff]
    if batch:
        problems.append(batch)
    changes = identity_changes(cfg, store, groups, identity, meta)
    if changes:
        problems.append(f"run folder {out} was trained on other data than this run would read; a resume "
                        "must see the same store, groups and layer (restore them, or choose another --out "
                        "for a new run). Changed since the run began: " + "; ".join(changes))
    if split is not None:  # a folder from before splits existed recorded none: the split was off
        problems += [f"run folder {out}: {p}" for p in check_same_split(recorded_split(meta), split)]
    return problems


def recorded_split(meta: dict) -> Optional[dict]:
    """The held-out split recorded in a run's ``_surpipe`` record ``meta`` (None: none recorded)."""
    rec = meta.get("run") if isinstance(meta.get("run"), dict) else {}
    return rec.get("split") if isinstance(rec.get("split"), dict) else None
