"""The names of a training run folder's parts: the one place they are spelled.

A leaf (no surpipe import) so that :mod:`surpipe.adapter_io`, which reads adapters out of run
folders, can know them without importing training code. What is done with the parts (finding,
saving, pruning, the resume check) is :class:`surpipe.train.run_folder.RunFolder`'s; a test
(tests/test_run_folder_names.py) fails when another module spells one of these names.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.json"  # the TrainConfig with its _surpipe record: identity, held-out split, world size
CHECKPOINTS = "checkpoints"  # checkpoints/step-<8 digits>/, written under .tmp-step-* then renamed
ADAPTER = "adapter"  # the final adapter (save_pretrained layout) with FINAL_PROJECTION
BEST = "best"  # --keep-best: the adapter of the best held-out score, its note BEST/best.json
UNTRAINED = "untrained"  # the adapter at step 0 (runs with a held-out split): the control eval --store compares with
METRICS = "metrics.jsonl"  # one JSON object per logged step and per held-out evaluation
LOG = "train.log"  # the human log
LOSS_CURVE = "loss_curve.png"
LOCK = ".lock"  # held by the one job that trains into the folder
VALIDATION = "validation"  # validation/step-<8 digits>.png: the with/without picture grids
FINAL_PROJECTION = "llm_projection.safetensors"  # inside ADAPTER and BEST

# inside checkpoints/step-<8 digits>/
STEP_PREFIX = "step-"
TMP = ".tmp-"  # what a save writes under before its one rename (a killed run may leave one)
TMP_PREFIX = TMP + STEP_PREFIX
CK_ADAPTER = "adapter"
CK_PROJECTION = "projection.safetensors"
CK_OPTIMIZER = "optimizer.pt"  # optimizer, LR schedule, fp16 scaler
CK_RNG = "rng.safetensors"
CK_STATE = "state.json"  # step and data position, read first when loading

STEP_NAME = re.compile(re.escape(STEP_PREFIX) + r"\d{8}")


def step_name(step: int) -> str:
    """``step-<8 digits>``: a checkpoint folder's (and a validation grid's) name."""
    return f"{STEP_PREFIX}{step:08d}"


def note_name(name: str) -> str:
    """The note file saved inside an adapter folder of the run (``best`` -> ``best.json``)."""
    return f"{name}.json"


def has_run_parts(folder: Path) -> bool:
    """Whether ``folder`` holds what a training run writes (adapter/, checkpoints/, metrics.jsonl)."""
    return (folder / ADAPTER).exists() or (folder / CHECKPOINTS).is_dir() or (folder / METRICS).is_file()
