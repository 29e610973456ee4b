"""A training run folder's part names are spelled in one module, surpipe/train/run_layout.py;
everything else reaches the parts through surpipe.train.run_folder.RunFolder (or the layout's
constants). The scan reads the string constants of every module of surpipe/ and stages/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOME = ROOT / "surpipe" / "train" / "run_layout.py"

# Names used for nothing but a run folder's parts: flagged wherever a whole string constant is one.
# (".lock" alone: the store's lock files are built as f"{group}.{what}.lock", a piece of an
# f-string, which the scan does not treat as a whole constant.)
DISTINCT = {"checkpoints", "metrics.jsonl", "train.log", "loss_curve.png", ".lock", "best.json", "state.json",
            "optimizer.pt", "rng.safetensors", "projection.safetensors", "llm_projection.safetensors"}
# Names that are ordinary words elsewhere (the "adapter" option and record keys, matplotlib's
# loc="best", the "validation" option group): flagged when joined onto a path with ``/``.
JOINED = {"adapter", "best", "validation"}
# Every model folder and every stage's output folder has a config.json: flagged when joined onto
# a path whose expression names a run (run_dir / "config.json").
RUN_CONFIG = "config.json"
# Checkpoint folder names, also as pieces of f-strings (f"step-{step:08d}", f".tmp-step-{step}").
PIECES = ("step-", ".tmp-step-")


def _sources():
    for base in ("surpipe", "stages"):
        for p in sorted((ROOT / base).rglob("*.py")):
            if p != HOME:
                yield p


def _pieces(tree):
    """Ids of the Constant nodes that are pieces of an f-string."""
    return {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}


def _spellings(code: str, where: str) -> list[str]:
    tree = ast.parse(code)
    pieces = _pieces(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if id(node) in pieces:
                if v in PIECES or v.startswith(PIECES[1]):
                    found.append(f"{where}:{node.lineno}: f-string piece {v!r}")
            elif v in DISTINCT or v.startswith(PIECES[1]):
                found.append(f"{where}:{node.lineno}: {v!r}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            v = node.right.value
            if v in JOINED or (v == RUN_CONFIG and "run" in ast.unparse(node.left).lower()):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_run_folder_names_are_spelled_only_in_the_run_layout():
    found = [s for p in _sources() for s in _spellings(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not found, ("run-folder names spelled outside surpipe/train/run_layout.py (use RunFolder or the "
                       "layout's constants):\n" + "\n".join(found))


def test_the_scan_sees_the_names_it_looks_for():
    """The scan itself: each kind of spelling is caught, an unrelated use is not."""
    code = ('a = out / "checkpoints"\nb = run / "adapter"\nc = f"step-{s:08d}"\nd = run_dir / "config.json"\n'
            'e = model / "config.json"\nf = {"adapter": 1}\ng = f"{x}.{w}.lock"\n')
    found = _spellings(code, "sample")
    assert sorted(s.split(":")[1] for s in found) == ["1", "2", "3", "4"], found
    assert all(n in HOME.read_text() for n in DISTINCT | JOINED | {RUN_CONFIG})
