"""Fault injection: SIGKILL at random moments (train, extract-llm, encode-latents) then rerun equals an
uninterrupted run and `surpipe verify` passes; a full disk during a block write; a read-only store
refused before any model loads; a second job on a group that is being written is refused.

The default run keeps one of each (a few seconds each); the repeated random kills are `-m slow`.
Set SURPIPE_FAULT_SEED to replay a failing random schedule (the seed is in every assertion message).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers import child_env
from helpers import run_cli as _run
from helpers.stores import make_store

from surpipe.errors import SurpipeError
from surpipe.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("SURPIPE_FAULT_SEED", random.SystemRandom().randrange(10**6)))


def _env() -> dict:
    return child_env(TOKENIZERS_PARALLELISM="false")


def _verify_ok(store) -> dict:
    import json

    rc, out, err = _run("verify", store, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["sound"] and not rep["warnings"], rep["warnings"]
    return rep


# The CLI with every chunk write slowed down (test-only), so a kill can land between the arrays of
# a block: the most adversarial moment (some chunks of the block written, done[b] not yet set).
_SLOW_WRITES_CLI = (
    "import sys, time\nimport zarr.storage._local as _l\n_put = _l._put\n"
    "def slow_put(path, value, *a, **k):\n    time.sleep(float(sys.argv[1]))\n    return _put(path, value, *a, **k)\n"
    "_l._put = slow_put\nfrom stages.cli import main\nsys.exit(main(sys.argv[2:]))\n"
)


def _start(args, slow_writes: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SLOW_WRITES_CLI, str(slow_writes), *map(str, args)],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill(p: subprocess.Popen) -> bool:
    """SIGKILL the process group; True when it was still running."""
    running = p.poll() is None
    if running:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    return running


# --------------------------------------------------------------------------- train


def _train_args(store, sd, out, steps):
    return ["train", "--store", store, "--model", sd, "--llm-layer", "3", "--out", out, "--batch-size", "2",
            "--grad-accum", "1", "--workers", "0", "--no-progress", "--device", "cpu", "--dim-feedforward", "64",
            "--nhead", "4", "--max-steps", str(steps), "--checkpoint-every", "1", "--keep-checkpoints", "2",
            "--no-loss-curve"]


def _checkpoints(out: Path) -> list[str]:
    d = out / "checkpoints"
    return sorted(p.name for p in d.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()) \
        if d.is_dir() else []


def _adapter_equal(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    for f in ("model.safetensors", "llm_projection.safetensors"):
        wa, wb = load_file(str(a / "adapter" / f)), load_file(str(b / "adapter" / f))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{f} differs (seed {SEED})"


def _kill_train(store, sd, out, steps, rng, max_delay) -> str:
    """Start train in a subprocess, wait for a checkpoint newer than the ones present, then SIGKILL it
    after a random delay; returns what happened (for messages)."""
    before = set(_checkpoints(out))
    p = _start(_train_args(store, sd, out, steps))
    deadline = time.time() + 240
    try:
        while p.poll() is None and time.time() < deadline:
            if set(_checkpoints(out)) - before:
                break
            time.sleep(0.02)
        delay = rng.uniform(0, max_delay)
        time.sleep(delay)
        killed = _kill(p)
    finally:
        if p.poll() is None:
            _kill(p)
    log = p.stdout.read().decode(errors="replace")
    assert killed or p.returncode == 0, f"train failed before the kill (seed {SEED}):\n{log[-3000:]}"
    assert "Traceback" not in log
    return f"killed={killed} after +{delay:.2f}s at {_checkpoints(out)[-1:]}"


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, tiny_models):
    """The synthetic store and an uninterrupted reference run."""
    from stages.cli import main

    d = tmp_path_factory.mktemp("train_faults")
    make_store(d / "s.zarr")
    ref = d / "ref"
    assert main([str(a) for a in _train_args(d / "s.zarr", tiny_models / "sd", ref, 12)]) == 0
    return d / "s.zarr", tiny_models / "sd", ref


def test_train_sigkill_at_random_moment_then_rerun_equals_uninterrupted(tmp_path, train_setup):
    store, sd, ref = train_setup
    rng = random.Random(SEED)
    out = tmp_path / "run"
    what = _kill_train(store, sd, out, 12, rng, max_delay=0.6)
    rc, o, err = _run(*_train_args(store, sd, out, 12))
    assert rc == 0, f"{what} (seed {SEED}): {err}"
    _adapter_equal(out, ref)
    import json

    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), (what, steps)  # replayed steps are logged once
    _verify_ok(store)


def test_train_killed_after_last_checkpoint_still_writes_the_adapter(tmp_path, train_setup):
    """A kill between the last checkpoint and the final adapter: the rerun has nothing to train but
    must still write OUT/adapter (it used to say 'nothing to do' and leave no adapter)."""
    import json
    import shutil

    store, sd, ref = train_setup
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "adapter")
    cfg = json.loads((out / "config.json").read_text())
    cfg["out"] = str(out)  # the copy is its own run folder
    (out / "config.json").write_text(json.dumps(cfg))
    rc, o, err = _run(*_train_args(store, sd, out, 12))
    assert rc == 0 and "nothing to do" in o, err
    _adapter_equal(out, ref)


@pytest.mark.slow
def test_train_killed_many_times_then_equals_uninterrupted(tmp_path, train_setup):
    store, sd, ref = train_setup
    rng = random.Random(SEED + 1)
    out = tmp_path / "run"
    history = [_kill_train(store, sd, out, 12, rng, max_delay=1.5) for _ in range(4)]
    rc, o, err = _run(*_train_args(store, sd, out, 12))
    assert rc == 0, f"{history} (seed {SEED}): {err}"
    _adapter_equal(out, ref)
    _verify_ok(store)


# --------------------------------------------------------------------------- full disk


def _prompt2vec_file(store, path, H=8):
    import torch

    prompts = [str(p) for p in FeatureStore(store).prompts("simple")]
    g = torch.Generator().manual_seed(0)
    torch.save({p: torch.randn(H, generator=g) for p in prompts}, path)
    return path


def _enospc_on(monkeypatch, needle: str):
    """Every chunk write whose path contains ``needle`` fails with ENOSPC (zarr's local write path)."""
    import zarr.storage._local as local

    real = local._put
    hits = []

    def put(path, value, *a, **k):
        if needle in str(path):
            hits.append(str(path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, value, *a, **k)

    monkeypatch.setattr(local, "_put", put)
    return hits


def test_full_disk_during_block_write_is_clear_and_resumable(tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    make_store(store)
    pt = _prompt2vec_file(store, tmp_path / "p2v.pt")
    args = ["import-prompt2vec", pt, "--store", store, "--layer", "3", "--name", "p2v"]
    hits = _enospc_on(monkeypatch, "llm/p2v/matched/c/1")  # block 1's second array: a half-written block
    rc, out, err = _run(*args)
    assert hits and rc == 1 and "Traceback" not in err
    assert "no space left on device while writing llm/p2v block 1" in err
    assert "No space left on device" in err and "llm/p2v/matched/c/1" in err and "rerun" in err
    g = FeatureStore(store).group("llm/p2v")
    assert g.done_mask().tolist() == [True, False, False]  # block 1 not marked done; later blocks never started
    rc, out, err = _run("verify", store)
    assert rc == 0 and "llm/p2v: 2 of 3 blocks incomplete" in out
    monkeypatch.undo()  # space freed: the rerun completes
    rc, out, err = _run(*args)
    assert rc == 0, err
    _verify_ok(store)


def test_full_disk_library_level_names_group_block_and_path(tmp_path, monkeypatch):
    st = make_store(tmp_path / "s.zarr", complete=False)
    g = st.group("vae/sd-16")
    _enospc_on(monkeypatch, "vae/sd-16/done/c/2")  # even the completion record failing leaves it not done
    s, e = st.block_range(2)
    with pytest.raises(SurpipeError) as ei:
        g.write_block(2, {n: np.ones((e - s, *g.array(n).shape[1:])) for n in g.array_names})
    msg = str(ei.value)
    assert "no space left on device while writing vae/sd-16 block 2" in msg and "vae/sd-16/done/c/2" in msg
    assert g.pending_blocks() == [2]


# --------------------------------------------------------------------------- read-only store


def _read_only(monkeypatch, folder: Path):
    """Make ``folder`` behave like a read-only mount (EROFS on any create or write under it). As root,
    chmod is ignored, so the file system calls are patched instead."""
    import builtins

    real_os_open, real_open, real_mkdir = os.open, builtins.open, Path.mkdir
    folder = str(folder)

    def under(p) -> bool:
        return os.path.abspath(str(p)).startswith(folder)

    def erofs(p):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))

    def os_open(path, flags, *a, **k):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise erofs(path)
        return real_os_open(path, flags, *a, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and under(file) and any(c in mode for c in "wax+"):
            raise erofs(file)
        return real_open(file, mode, *a, **k)

    def mkdir(self, mode=0o777, parents=False, exist_ok=False):
        if exist_ok and self.is_dir():  # as on Linux: EEXIST wins over EROFS
            return None
        if under(self):
            raise erofs(self)
        return real_mkdir(self, mode, parents, exist_ok)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(Path, "mkdir", mkdir)


def _no_model_loads(monkeypatch):
    import surpipe.llm.prompt2vec as ip
    from surpipe import llm
    from surpipe import sd

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the store was found read-only")

    for mod, name in ((sd, "load_text_encoder"), (sd, "load_vae_encoder"), (llm, "load_llm"),
                      (ip, "load_prompt2vec")):
        monkeypatch.setattr(mod, name, boom)


def test_read_only_store_refused_before_any_model_loads(tmp_path, monkeypatch, tiny_models, sample_dir):
    from surpipe.data import open_dataset

    store = tmp_path / "ro" / "s.zarr"
    FeatureStore.create_or_open(store, open_dataset(str(sample_dir), check_images="none", progress=False),
                                block_rows=16)
    pt = tmp_path / "p2v.pt"
    pt.write_bytes(b"unused")
    damaged = make_store(tmp_path / "ro" / "damaged.zarr").path
    (damaged / "llm/tiny/layer_1/pooled/c/1/0").write_bytes(b"garbage")
    _no_model_loads(monkeypatch)
    _read_only(monkeypatch, tmp_path / "ro")
    cases = {
        "encode-latents": ["encode-latents", "--data", sample_dir, "--store", store, "--model", tiny_models / "sd",
                           "--check-images", "header", "--no-progress"],
        "extract-llm": ["extract-llm", "--data", sample_dir, "--store", store, "--model", tiny_models / "llm",
                        "--layers", "1", "--check-images", "header", "--no-progress"],
        "import-prompt2vec": ["import-prompt2vec", pt, "--store", store, "--layer", "1"],
        "verify --repair (a damaged block to mark)": ["verify", damaged, "--repair"],
        "new store in a read-only folder": ["encode-latents", "--data", sample_dir, "--store",
                                            tmp_path / "ro" / "new.zarr", "--model", tiny_models / "sd",
                                            "--check-images", "header", "--no-progress"],
    }
    for what, args in cases.items():
        rc, out, err = _run(*args)
        assert rc == 1, (what, out, err)
        assert "read-only" in err and "Traceback" not in err, (what, err)
    # reading stays possible: verify without --repair passes (nothing is written)
    rc, out, err = _run("verify", store)
    assert rc == 0, err


# --------------------------------------------------------------------------- one writer per group


_HOLD_LOCK = (
    "import sys\nfrom surpipe.store.locks import writer_lock\n"
    "with writer_lock(sys.argv[1], sys.argv[2], 0):\n    print('LOCKED', flush=True)\n    sys.stdin.read()\n"
)


def test_second_job_on_a_group_being_written_is_refused(tmp_path):
    store = tmp_path / "s.zarr"
    make_store(store)
    pt = _prompt2vec_file(store, tmp_path / "p2v.pt")
    args = ["import-prompt2vec", pt, "--store", store, "--layer", "3", "--name", "p2v"]
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(store), "llm/p2v"], cwd=REPO, env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        rc, out, err = _run(*args)
        assert rc == 1 and "Traceback" not in err
        assert f"group llm/p2v of store {store} is being written by pid {holder.pid}" in err
        assert FeatureStore(store).group("llm/p2v").completed_blocks() == 0  # refused before writing
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    rc, out, err = _run(*args)  # the first job is gone: this one runs
    assert rc == 0, err
    _verify_ok(store)


# --------------------------------------------------------------------------- stage one, killed repeatedly


def _kill_randomly(args, n, rng, window, slow_writes, done_of):
    """Start the stage n times, each killed after a random moment in ``window`` seconds (some may
    land during start-up, some mid-block); returns a history for messages."""
    history = []
    for _ in range(n):
        p = _start(args, slow_writes)
        delay = rng.uniform(*window)
        t0 = time.time()
        while time.time() - t0 < delay and p.poll() is None:
            time.sleep(0.01)
        killed = _kill(p)
        log = p.stdout.read().decode(errors="replace")
        assert killed or p.returncode == 0, f"stage failed (seed {SEED}):\n{log[-3000:]}"
        history.append((round(delay, 2), killed, done_of()))
    return history


def _done(store, group):
    def f():
        try:
            return int(zarr.open_array(str(Path(store) / group / "done"), mode="r")[:].sum())
        except Exception:
            return None

    return f


@pytest.mark.slow
def test_extract_llm_killed_n_times_then_verify_and_equal(tmp_path, tiny_models, sample_dir):
    pytest.importorskip("stages.extract_llm")
    from stages.extract_llm import ExtractLLMConfig, run

    store = tmp_path / "k.zarr"
    args = ["extract-llm", "--data", sample_dir, "--store", store, "--model", tiny_models / "llm", "--layers", "1,3",
            "--block-rows", "8", "--batch-size", "4", "--no-progress", "--name", "t", "--check-images", "header"]
    hist = _kill_randomly(args, 4, random.Random(SEED + 2), (2.0, 12.0), 0.05, _done(store, "llm/t"))
    rc, out, err = _run(*args)
    assert rc == 0, f"{hist} (seed {SEED}): {err}"
    _verify_ok(store)
    ref = tmp_path / "ref.zarr"
    run(ExtractLLMConfig(data=str(sample_dir), store=str(ref), model=str(tiny_models / "llm"), layers=[1, 3],
                         block_rows=8, batch_size=4, name="t", progress=False, check_images="header"))
    _assert_same_arrays(store, ref, [f"llm/t/{n}" for n in ("layer_1/pooled", "layer_3/pooled", "token_counts")],
                        hist)


@pytest.mark.slow
def test_encode_latents_killed_n_times_then_verify_and_equal(tmp_path, tiny_models, sample_dir):
    pytest.importorskip("stages.encode_latents")
    from stages.encode_latents import EncodeLatentsConfig, run

    store = tmp_path / "k.zarr"
    args = ["encode-latents", "--data", sample_dir, "--store", store, "--model", tiny_models / "sd",
            "--block-rows", "8", "--batch-size", "4", "--workers", "0", "--flip", "--no-progress",
            "--check-images", "header"]
    hist = _kill_randomly(args, 4, random.Random(SEED + 3), (2.0, 14.0), 0.05, _done(store, "vae/sd-64"))
    rc, out, err = _run(*args)
    assert rc == 0, f"{hist} (seed {SEED}): {err}"
    _verify_ok(store)
    ref = tmp_path / "ref.zarr"
    run(EncodeLatentsConfig(data=str(sample_dir), store=str(ref), model=str(tiny_models / "sd"), block_rows=8,
                            batch_size=4, workers=0, flip=True, progress=False, check_images="header"))
    _assert_same_arrays(store, ref, ["clip/sd/simple", "clip/sd/complex", "clip/sd/simple_len", "clip/sd/complex_len",
                                     "vae/sd-64/mean", "vae/sd-64/std", "vae/sd-64/flip_mean", "vae/sd-64/flip_std"],
                        hist)


def _assert_same_arrays(store, ref, names, hist):
    """Each named array of ``store`` (killed and resumed) equals the uninterrupted ``ref``'s, bit for bit."""
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(ref), mode="r")
    for k in names:
        np.testing.assert_array_equal(a[k][:], b[k][:], err_msg=f"{k} {hist} seed {SEED}")


@pytest.mark.slow
def test_extract_llm_second_process_refused_while_first_writes(tmp_path, tiny_models, sample_dir):
    pytest.importorskip("stages.extract_llm")
    store = tmp_path / "s.zarr"
    args = ["extract-llm", "--data", sample_dir, "--store", store, "--model", tiny_models / "llm", "--layers", "1",
            "--block-rows", "8", "--no-progress", "--name", "t", "--check-images", "header"]
    p = _start(args, slow_writes=0.3)  # slow enough to still be writing when the second one arrives
    try:
        deadline = time.time() + 120
        while (_done(store, "llm/t")() or 0) < 1:
            assert p.poll() is None and time.time() < deadline, p.stdout.read().decode()[-2000:]
            time.sleep(0.05)
        rc, out, err = _run(*args)
        assert rc == 1 and "is being written by pid" in err and "Traceback" not in err, err
    finally:
        _kill(p)
    rc, out, err = _run(*args)
    assert rc == 0, err
    _verify_ok(store)
