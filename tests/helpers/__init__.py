"""Helpers shared by the test files (one home each; fixtures are in conftest.py).

Imported as ``helpers`` (pytest puts tests/ on sys.path; builders by area in its modules: stores, growth, images) and as ``tests.helpers`` by the
benchmarks, which build their synthetic stores from :class:`SyntheticDataset` too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_env(**extra) -> dict:
    """A subprocess's environment: this one's, offline, the repository first on PYTHONPATH with what
    was there kept (packages installed with ``pip --target``, as on the GPU machines), and no
    torch.distributed variables (a child is not a rank of this process's job unless ``extra`` says)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def _call_cli(args, capture_stdout: bool) -> tuple[int, str, str]:
    from stages.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if capture_stdout:
            stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def run_cli(*args) -> tuple[int, str, str]:
    """The CLI in-process (arguments turned into strings): (exit status, stdout, stderr)."""
    return _call_cli(args, capture_stdout=True)


def run_cli_err(*args) -> tuple[int, str]:
    """The CLI in-process: (exit status, stderr); stdout is left to pytest's capture."""
    rc, _, err = _call_cli(args, capture_stdout=False)
    return rc, err


@dataclass(frozen=True)
class Row:
    key: str
    simple: str
    complex: str


class SyntheticDataset:
    """The minimum a FeatureStore needs from a dataset (samples, source, fingerprint), from
    ``(key, simple prompt, complex prompt)`` rows; stands in for surpipe.data's datasets."""

    def __init__(self, rows, source: str = "synthetic"):
        self.samples = [Row(*r) for r in rows]
        self.source = source

    def __len__(self):
        return len(self.samples)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.samples:
            h.update(json.dumps([s.key, s.simple, s.complex]).encode())
        return h.hexdigest()


def sample_store(path: Path, block_rows: int = 16) -> Path:
    """A feature store (no groups yet) over the bundled sample data/sample; returns its path."""
    from surpipe.data import open_dataset
    from surpipe.store import FeatureStore

    ds = open_dataset(str(REPO / "data" / "sample"), check_images="none", progress=False)
    FeatureStore.create_or_open(path, ds, block_rows=block_rows)
    return Path(path)


def as_sdxl(src: Path, dst: Path) -> Path:
    """A copy of SD folder ``src`` at ``dst`` whose model_index.json names StableDiffusionXLPipeline."""
    import shutil

    shutil.copytree(src, dst)
    idx = json.loads((dst / "model_index.json").read_text())
    idx["_class_name"] = "StableDiffusionXLPipeline"
    (dst / "model_index.json").write_text(json.dumps(idx))
    return dst


def sigkill_when(proc, ready, timeout: float, poll: float = 0.05):
    """SIGKILL ``proc`` as soon as ``ready()`` returns something truthy, and return that (the state
    the kill was aimed at). None when ``proc`` ended or ``timeout`` passed first; then ``proc`` is
    killed too. Always waits for ``proc`` to end."""
    import signal
    import time

    deadline = time.time() + timeout
    seen = None
    try:
        while time.time() < deadline and proc.poll() is None:
            seen = ready()
            if seen:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(poll)
    finally:
        if proc.poll() is None and not seen:
            proc.kill()
        proc.wait(timeout=30)
    return seen or None


def png_bytes(size=(8, 8), color=(10, 200, 30), mode="RGB", fmt="PNG") -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new(mode, size, color).save(b, fmt)
    return b.getvalue()


def FakeDataset(n, tag=""):
    """Stands in for surpipe.data.SurdDataset: ``n`` rows with non-ASCII prompts."""
    return SyntheticDataset([(f"k{i:04d}", f"simple {i}{tag} ü😀", f"complex {i}, (masterpiece:1.2)")
                             for i in range(n)], source=f"fake{tag}")
