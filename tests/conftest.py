"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _numeric_matrix() -> None:
    """Run the suite under another numeric setup (README, "Tests on any CPU"):
    SURPIPE_TEST_THREADS=N sets torch's threads here and OMP_NUM_THREADS for the CLI subprocesses;
    SURPIPE_TEST_FASTPATH=0 turns off torch's fused transformer/MHA fast path in this process."""
    threads, fastpath = os.environ.get("SURPIPE_TEST_THREADS"), os.environ.get("SURPIPE_TEST_FASTPATH")
    if threads is None and fastpath is None:
        return
    import torch

    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = threads
        torch.set_num_threads(int(threads))
    if fastpath is not None:
        torch.backends.mha.set_fastpath_enabled(fastpath not in ("0", "false", "off"))


_numeric_matrix()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Tiny LLaMA (``/llm``) and tiny Stable Diffusion (``/sd``), built once per test session."""
    from surpipe.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny_models") / "models", seed=0)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def train_store(tmp_path) -> Path:
    """A small store with every group train reads (test_train.make_store) at ``tmp_path/s.zarr``."""
    from helpers.stores import make_store

    make_store(tmp_path / "s.zarr")
    return tmp_path / "s.zarr"


@pytest.fixture
def store(train_store) -> Path:
    """``train_store`` under the name most test files use (a file needing another store defines its own)."""
    return train_store


@pytest.fixture
def sample_dir() -> Path:
    """The bundled SURD-format sample (data/sample, made by data/make_sample.py)."""
    return REPO / "data" / "sample"


@pytest.fixture
def make_surd(tmp_path):
    """make_surd(lines, files) -> a SURD imagefolder. ``lines``: dicts (written as JSON lines) or
    raw str/bytes lines; ``files``: {relative path: bytes}. Returns the folder's Path."""
    counter = {"n": 0}

    def make(lines, files=None, name=None) -> Path:
        counter["n"] += 1
        root = tmp_path / (name or f"surd{counter['n']}")
        root.mkdir(parents=True)
        for rel, data in (files or {}).items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        out = bytearray()
        for ln in lines:
            if isinstance(ln, dict):
                ln = json.dumps(ln, ensure_ascii=False)
            out += ln if isinstance(ln, bytes) else ln.encode("utf-8")
            out += b"\n"
        (root / "metadata.jsonl").write_bytes(bytes(out))
        return root

    return make
