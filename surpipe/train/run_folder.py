"""A training run folder (``surpipe train --out``): the one object that knows its layout.

    OUT/config.json        the TrainConfig and its _surpipe record (identity, held-out split, world size)
    OUT/checkpoints/step-<8 digits>/   written under .tmp-step-*, published by one rename, pruned
    OUT/adapter/           the final adapter (save_pretrained layout + llm_projection.safetensors)
    OUT/best/              --keep-best: the adapter of the best held-out score, with best.json
    OUT/metrics.jsonl, OUT/train.log, OUT/loss_curve.png, OUT/validation/step-<8 digits>.png
    OUT/.lock              held by the one job training into the folder

The names are spelled in :mod:`surpipe.train.run_layout`; what a checkpoint holds is
:mod:`surpipe.train.checkpoint`; what a resume must share with its run is
:mod:`surpipe.train.identity`. Torch-free at import.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

from surpipe.config import save
from surpipe.errors import SurpipeError
from surpipe.train import checkpoint, identity
from surpipe.train import run_layout as L


class _Part:
    """A fixed part of the run folder: on a RunFolder, the path ``out / <its name>``."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, folder, owner=None):
        return self if folder is None else folder.out / self.name


class RunFolder:
    """The run folder ``out``: its parts' paths, its checkpoints, its atomic saves and the check
    that a resume in it trains what the run began to train."""

    def __init__(self, out: Union[str, os.PathLike]):
        self.out = Path(out)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.out)!r})"

    # ------------------------------------------------------------------ the parts
    config = _Part(L.CONFIG)
    checkpoints = _Part(L.CHECKPOINTS)
    adapter = _Part(L.ADAPTER)
    best = _Part(L.BEST)
    untrained = _Part(L.UNTRAINED)
    metrics = _Part(L.METRICS)
    log = _Part(L.LOG)
    loss_curve = _Part(L.LOSS_CURVE)
    lock = _Part(L.LOCK)

    def validation_image(self, step: int) -> Path:
        """Where the with/without picture grid of ``step`` goes."""
        return self.out / L.VALIDATION / f"{L.step_name(step)}.png"

    def has_parts(self) -> bool:
        """Whether the folder holds what a training run writes."""
        return L.has_run_parts(self.out)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_list(self) -> list[Path]:
        """The checkpoint folders (``step-<8 digits>``), oldest first. They appear by one atomic
        rename, so a damaged one (even without state.json) is reported at load, never skipped."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if L.STEP_NAME.fullmatch(p.name) and p.is_dir())

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest checkpoint folder, or None."""
        done = self.checkpoint_list()
        return done[-1] if done else None

    def clean_stale_tmp(self) -> list[Path]:
        """Delete the ``.tmp-step-*`` folders that killed runs left in the checkpoint folder (only
        those; call it only with the run folder's lock held, so no live writer owns one)."""
        if not self.checkpoints.is_dir():
            return []
        stale = [p for p in self.checkpoints.iterdir()
                 if p.name.startswith(L.TMP_PREFIX) and p.is_dir() and not p.is_symlink()]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return stale

    def save_checkpoint(self, step: int, *, keep: int, **parts: Any) -> Path:
        """Write checkpoint ``step`` (``parts``: see :func:`surpipe.train.checkpoint.write_parts`)
        under a temporary name, rename it, then prune all but the newest ``keep``.

        A failed write (full disk, I/O error) raises SurpipeError; the earlier checkpoints are kept."""
        final = self.checkpoints / L.step_name(step)
        tmp = self.checkpoints / f"{L.TMP_PREFIX}{step:08d}-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            checkpoint.write_parts(tmp, step, **parts)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            raise SurpipeError(self.write_failure(f"checkpoint {L.step_name(step)}", e)) from None
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # publishes a whole folder: one rename, not a file write
        for old in self.checkpoint_list()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path, **into: Any) -> tuple[int, dict]:
        """Restore checkpoint ``path`` (``into``: see :func:`surpipe.train.checkpoint.load_parts`);
        returns ``(step, data position)``. A damaged one raises SurpipeError naming the file and the
        previous checkpoint (deleting the damaged folder is the user's choice)."""
        try:
            return checkpoint.load_parts(path, **into)
        except checkpoint.Damaged as e:
            earlier = [p for p in self.checkpoint_list() if p.name < path.name]
            todo = (f"delete {path} to resume from the previous checkpoint {earlier[-1].name}" if earlier
                    else f"it is the only checkpoint: delete {path} to start the run over from step 0")
            raise SurpipeError(f"checkpoint {path} cannot be loaded, it is damaged: {e}; {todo}") from None

    def write_failure(self, what: str, e: Exception) -> str:
        """The message of a failed write into the folder: what failed, what is kept, what to do."""
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
        why = "no space left on device" if full else f"write failed: {getattr(e, 'strerror', None) or e}"
        prev = self.latest_checkpoint()
        kept = (f"the previous checkpoint {prev.name} (step {prev.name[len(L.STEP_PREFIX):].lstrip('0') or 0}) "
                "is intact" if prev else "no earlier checkpoint exists")
        return (f"{why} while writing the {what} of run folder {self.out}; nothing of it was kept and {kept}. "
                f"{'Free space' if full else 'Fix the disk'}, then rerun the same command: it resumes from the "
                "latest checkpoint")

    # ------------------------------------------------------------------ the final and the best adapter
    def save_adapter(self, adapter, projection, name: str = L.ADAPTER, note: Optional[dict] = None) -> None:
        """The adapter in ``OUT/<name>`` (``adapter``, or ``best``; save_pretrained layout) with
        ``llm_projection.safetensors`` (and ``note`` as ``<name>.json`` inside), replaced by one rename."""
        tmp = self.out / f"{L.TMP}{name}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            adapter.save_pretrained(tmp)
            projection.save(tmp / L.FINAL_PROJECTION)
            if note is not None:
                (tmp / L.note_name(name)).write_text(json.dumps(note, indent=2) + "\n")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SurpipeError(self.write_failure("final adapter" if name == L.ADAPTER else f"{name} adapter",
                                                  e)) from None
        final = self.out / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def save_best(self, adapter, projection, note: dict) -> None:
        """The ``--keep-best`` adapter in ``OUT/best`` with its score in ``best.json``."""
        self.save_adapter(adapter, projection, name=L.BEST, note=note)

    def best_score(self) -> Optional[float]:
        """The ``--keep-best`` score recorded in ``OUT/best/best.json`` (None when there is none)."""
        try:
            score = json.loads((self.best / L.note_name(L.BEST)).read_text())["score"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None

    def final_adapter_stale(self) -> bool:
        """True when OUT/adapter is missing or older than the latest checkpoint (killed in between)."""
        from surpipe.adapter_io import WEIGHTS_NAME  # heavy: torch (the adapter's file names live there)

        final = self.adapter / WEIGHTS_NAME
        last = self.latest_checkpoint()
        if not final.is_file():
            return True
        return last is not None and final.stat().st_mtime_ns < (last / L.CK_STATE).stat().st_mtime_ns

    # ------------------------------------------------------------------ config.json and the resume check
    def save_config(self, cfg: Any, record: dict) -> None:
        """The run's config with its ``_surpipe`` ``record`` (identity, split, world size)."""
        try:
            save(cfg, self.config, extra=record)
        except OSError as e:
            raise SurpipeError(self.write_failure(L.CONFIG, e)) from None

    def saved_config(self) -> dict:
        """The training config saved in the folder, ``_surpipe`` record included. A damaged one is
        refused: which rows the run trained on cannot be told."""
        f = self.config
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise SurpipeError(f"{f}: the training run's config is unreadable ({e}); without it the rows the "
                               "adapter trained on are unknown") from None
        if not isinstance(data, dict) or (data.get("_surpipe") or {}).get("config") != "TrainConfig":
            raise SurpipeError(f"{f} is not a surpipe training config: the rows the adapter trained on are unknown")
        return data

    def recorded_split(self) -> Optional[dict]:
        """The held-out split recorded in config.json (None: none, or no readable config)."""
        try:
            meta = json.loads(self.config.read_text())["_surpipe"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return identity.recorded_split(meta) if isinstance(meta, dict) else None

    def resume_problems(self, cfg: Any, store, groups, split: Optional[dict] = None, world: int = 1) -> list[str]:
        """Problems with resuming (or starting) in this folder (``cfg.out``) on ``world`` processes: a
        file in the way, a foreign folder, a damaged config.json, or what
        :func:`surpipe.train.identity.settings_problems` finds (every one at once)."""
        out = self.out
        for folder in (out, *out.parents):  # a file where the run folder (or a folder above it) goes
            if folder.exists() or folder.is_symlink():
                if not folder.is_dir():
                    return [f"--out {out}: {folder} is a file, not a folder; choose another --out"]
                break
        saved = self.config
        if not saved.exists():
            if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
                return [f"{out} exists and is not a surpipe run folder (no {L.CONFIG}); choose another --out"]
            return []
        damaged = f"; restore it, or choose another --out (deleting {out} starts the run over)"
        ck = self.checkpoints
        if (ck.exists() or ck.is_symlink()) and not ck.is_dir():
            return [f"{ck} is not a folder (a run folder keeps its checkpoints there){damaged}"]
        try:
            old = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return [f"{saved} is damaged, not the JSON surpipe wrote ({e}){damaged}"]
        meta = old.pop("_surpipe", None) if isinstance(old, dict) else None
        if not isinstance(old, dict) or not isinstance(meta, dict):
            return [f"{saved} is damaged: it does not hold a surpipe training config (a JSON object with "
                    f"its _surpipe record){damaged}"]
        return identity.settings_problems(cfg, old, meta, store, groups, split=split, world=world)

    # ------------------------------------------------------------------ the run of an adapter
    @classmethod
    def of_adapter(cls, adapter: Union[str, os.PathLike]) -> Optional["RunFolder"]:
        """The training run an adapter argument belongs to (a run folder, its adapter/, best/ or a
        checkpoint's adapter/), or None (a hub id, an adapter folder without its run)."""
        from surpipe.adapter_io import WEIGHTS_NAME  # heavy: torch (the adapter's file names live there)

        p = Path(adapter).expanduser()
        if (p / L.ADAPTER).is_dir():
            p = p / L.ADAPTER
        if not p.exists():  # a hub id: no run beside it (and never the working directory by accident)
            return None
        for folder in (p, *list(p.parents)[:3]):
            if (folder / L.CONFIG).is_file() and L.has_run_parts(folder) and not (folder / WEIGHTS_NAME).is_file():
                return cls(folder)
        return None


def run_config(adapter: Union[str, os.PathLike]) -> Optional[dict]:
    """The training config saved in the run folder of ``adapter`` (a run folder, its adapter/,
    best/ or a checkpoint); None for an adapter folder that came without its run. A run whose
    config.json is damaged is refused: which rows it trained on cannot be told."""
    run = RunFolder.of_adapter(adapter)
    return None if run is None else run.saved_config()


def projection_file(adapter_folder: Path) -> Optional[Path]:
    """The LLM projection saved with an adapter folder: inside a final or best adapter, beside a
    checkpoint's adapter/ (None: not saved with it)."""
    return next((f for f in (adapter_folder / L.FINAL_PROJECTION, adapter_folder.parent / L.CK_PROJECTION)
                 if f.is_file()), None)
