"""Advice in train's messages is followed, literally, on the same --out (issue 22, item 10 and the
global batch): every message that says "rerun with/without --option" names a change that a rerun
of that run folder accepts, and a run's identity is its global batch (batch-size x processes x
grad-accum), not how that batch is split.

Each test makes train fail the way a user meets the message, checks the advice is in it, applies
the advice to the same command line and the same --out, and checks the rerun resumes.
"""

import json

import numpy as np
import pytest
import torch

from stages.cli import main
from helpers.stores import _args

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _run(store, sd, out, capsys, *extra) -> tuple[int, str, str]:
    rc = main(_args(store, sd, out, "--no-loss-curve", *extra))
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


def _without(args: tuple, *flags) -> tuple:
    return tuple(a for a in args if a not in flags)


def _with(args: tuple, **opts) -> tuple:
    """``args`` with each ``--opt value`` replaced (or added)."""
    out = list(args)
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(v)
        else:
            out += [flag, str(v)]
    return tuple(out)


def _config(out):
    return json.loads((out / "config.json").read_text())


def test_rerun_without_compile_unet_after_a_compile_failure_resumes(store, tiny_models, tmp_path, monkeypatch,
                                                                    capsys):
    """'torch.compile failed ...; rerun without --compile-unet': that rerun was refused with
    'compile_unet: True there, False now'. --compile-unet changes no result: not the run's identity."""
    from surpipe.train import setup as train_setup

    sd, out = tiny_models / "sd", tmp_path / "run"
    rc, _, err = _run(store, sd, out, capsys, "--max-steps", "2")
    assert rc == 0, err  # a checkpoint at step 2

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(train_setup, "COMPILE_BACKEND", broken_backend)
    torch._dynamo.reset()
    args = ("--max-steps", "3", "--compile-unet")
    rc, _, err = _run(store, sd, out, capsys, *args)
    assert rc == 1 and "rerun without --compile-unet" in err, err
    rc, printed, err = _run(store, sd, out, capsys, *_without(args, "--compile-unet"))
    assert rc == 0, err  # was: "run folder ... was started with other settings (compile_unet: True there, False now)"
    assert "(step 2)" in printed and (out / "checkpoints" / "step-00000003").is_dir()
    assert _config(out)["compile_unet"] is False


@pytest.mark.parametrize("error", ["cuda", "cpu"])
def test_out_of_memory_advice_resumes_the_run(store, tiny_models, tmp_path, monkeypatch, capsys, error):
    """Out of memory at step 3 (after the checkpoint of step 2): each change the message suggests
    (a smaller micro-batch with more accumulation, gradient checkpointing, bf16 mixed precision)
    resumes the run on the same --out (lowering --batch-size alone was refused: batch_size differs)."""
    from surpipe.train import recipe as train_stage

    sd, out = tiny_models / "sd", tmp_path / "run"
    args = ("--batch-size", "2", "--grad-accum", "2", "--checkpoint-every", "2")
    assert _run(store, sd, out, capsys, *args, "--max-steps", "2")[0] == 0

    real = train_stage.TrainRecipe._accumulate
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if error == "cuda" \
        else MemoryError()

    def failing(self, it):
        raise oom

    monkeypatch.setattr(train_stage.TrainRecipe, "_accumulate", failing)
    rc, _, err = _run(store, sd, out, capsys, *args, "--max-steps", "3")
    assert rc == 1 and "out of memory" in err and len(err.strip().splitlines()) == 1, err
    assert "lower --batch-size and raise --grad-accum by the same factor" in err and "--gradient-checkpointing" in err
    monkeypatch.setattr(train_stage.TrainRecipe, "_accumulate", real)
    assert ("--mixed-precision bf16" in err) == (error == "cuda")
    steps = 3
    for change in (_with(args, batch_size=1, grad_accum=4), (*args, "--gradient-checkpointing"),
                   *([(*args, "--mixed-precision", "bf16")] if error == "cuda" else [])):
        rc, printed, err2 = _run(store, sd, out, capsys, *change, "--max-steps", str(steps))
        assert rc == 0, (change, err2)
        assert f"(step {steps - 1})" in printed and (out / "checkpoints" / f"step-{steps:08d}").is_dir()
        steps += 1


def test_fp16_scaler_advice_resumes_the_run(store, tiny_models, tmp_path, capsys):
    """'the fp16 loss scaler skipped 30 steps in a row ...; try --mixed-precision bf16 or no': a run
    folder recorded as fp16 (a CUDA run; faked here, this machine may have no GPU) resumes with
    either (mixed precision is how the same steps are computed, like --device)."""
    import inspect

    from surpipe.train import recipe as train_stage

    sd, out = tiny_models / "sd", tmp_path / "run"
    assert _run(store, sd, out, capsys, "--max-steps", "2")[0] == 0
    (out / "config.json").write_text(json.dumps({**_config(out), "mixed_precision": "fp16"}))

    assert "try --mixed-precision bf16 or no" in inspect.getsource(train_stage.TrainRecipe._loop)
    for steps, mp in ((3, "bf16"), (4, "no")):
        rc, printed, err = _run(store, sd, out, capsys, "--max-steps", str(steps), "--mixed-precision", mp)
        assert rc == 0, (mp, err)
        assert f"(step {steps - 1})" in printed


def test_keep_best_advice_names_when_it_needs_another_out(store, tiny_models, tmp_path, capsys):
    """'keep_best: needs a held-out split; give --val-rows N': on a run folder begun without a split
    a split cannot be added (its rows were trained on), so the advice says where it works."""
    sd, out = tiny_models / "sd", tmp_path / "run"
    assert _run(store, sd, out, capsys, "--max-steps", "1")[0] == 0
    rc, _, err = _run(store, sd, out, capsys, "--max-steps", "2", "--keep-best")
    assert rc == 1 and "give --val-rows N" in err and "another --out" in err, err
    rc, _, err = _run(store, sd, out, capsys, "--max-steps", "2", "--keep-best", "--val-rows", "4")
    assert rc == 1 and "held-out split cannot change on resume" in err, err
    rc, _, err = _run(store, sd, tmp_path / "other", capsys, "--max-steps", "2", "--keep-best", "--val-rows", "4")
    assert rc == 0, err


def test_stopped_run_advice_says_which_reruns_resume(store, tiny_models, tmp_path, monkeypatch, capsys):
    """A run stopped on a non-finite loss says a rerun of the same command resumes and that other
    option values need another --out (both followed here)."""
    from surpipe.train import numerics

    sd, out = tiny_models / "sd", tmp_path / "run"
    assert _run(store, sd, out, capsys, "--max-steps", "1")[0] == 0
    with monkeypatch.context() as m:
        m.setattr(numerics, "loss_problem", lambda sums: "loss is nan")
        rc, _, err = _run(store, sd, out, capsys, "--max-steps", "2")
    assert rc == 1 and "a rerun of the same command resumes" in err and "need another --out" in err, err
    assert _run(store, sd, out, capsys, "--max-steps", "2")[0] == 0
    rc, _, err = _run(store, sd, out, capsys, "--max-steps", "3", "--learning-rate", "1e-4")
    assert rc == 1 and "learning_rate" in err
    assert _run(store, sd, tmp_path / "new", capsys, "--max-steps", "1", "--learning-rate", "1e-4")[0] == 0


# --------------------------------------------------------------------------- the global batch

def _fake_world(out, world: int) -> None:
    """Make ``out`` look as if it was trained on ``world`` processes (what a torchrun run records)."""
    cfg = _config(out)
    cfg["_surpipe"]["world_size"] = world
    (out / "config.json").write_text(json.dumps(cfg))


def test_the_global_batch_is_the_identity_not_its_split(store, tiny_models, tmp_path, capsys):
    """A 2-rank run of batch 2 trains 4 rows per step: one process with --batch-size 2 (2 rows per
    step) was accepted, --batch-size 4 (the same 4) refused. Now the other way round, and any split
    of the 4 rows (micro-batch x accumulation) resumes; another global batch is one clear line."""
    sd, out = tiny_models / "sd", tmp_path / "run"
    base = ("--grad-accum", "1", "--checkpoint-every", "1")
    assert _run(store, sd, out, capsys, *base, "--batch-size", "2", "--max-steps", "2")[0] == 0
    assert _config(out)["_surpipe"]["world_size"] == 1  # recorded
    _fake_world(out, 2)
    rc, _, err = _run(store, sd, out, capsys, *base, "--batch-size", "2", "--max-steps", "3")
    assert rc == 1, err  # was: accepted, halving the global batch silently
    line = next(ln for ln in err.splitlines() if "global batch" in ln)
    assert ("global batch of 4 rows per step (batch-size 2 x 2 processes x grad-accum 1), this run would take 2 "
            "(batch-size 2 x 1 process x grad-accum 1); resume with --batch-size 4 --grad-accum 1 on 1 process") \
        in line, line
    assert not (out / "checkpoints" / "step-00000003").exists()
    steps = 3
    for split in (("--batch-size", "4"), ("--batch-size", "2", "--grad-accum", "2"),
                  ("--batch-size", "1", "--grad-accum", "4")):
        rc, printed, err = _run(store, sd, out, capsys, *base, *split, "--max-steps", str(steps))
        assert rc == 0, (split, err)  # was: "batch_size: 2 there, 4 now"
        assert f"(step {steps - 1})" in printed
        steps += 1
    assert _config(out)["_surpipe"]["world_size"] == 1 and _config(out)["batch_size"] == 1
    rc, _, err = _run(store, sd, out, capsys, *base, "--batch-size", "8", "--max-steps", str(steps))
    assert rc == 1 and "global batch of 4 rows per step" in err and "this run would take 8" in err, err


def test_resume_advice_for_a_global_batch_these_processes_do_not_divide(tmp_path):
    """The suggested options give the run's global batch on the processes of this run, or say to
    use one process when they cannot."""
    from surpipe.train.identity import batch_problem
    from surpipe.train.config import TrainConfig

    def advice(then: tuple, now: tuple, world: int):
        bs, w, ga = then
        cfg = TrainConfig(store="s", model="m", out=str(tmp_path), llm_layer=-1, batch_size=now[0], grad_accum=now[1])
        return batch_problem({"batch_size": bs, "grad_accum": ga}, {"world_size": w}, cfg, world)

    assert advice((2, 2, 1), (4, 1), 1) is None and advice((2, 2, 1), (1, 4), 1) is None
    assert advice((4, 1, 1), (2, 1), 2) is None  # one process of 4 resumed by 2 ranks of 2
    assert "resume with --batch-size 2 --grad-accum 1 on 2 processes" in advice((4, 1, 1), (4, 1), 2)
    assert "resume with --batch-size 3 --grad-accum 1 on 1 process" in advice((3, 1, 1), (2, 1), 1)
    assert "resume with --batch-size 1 --grad-accum 4 on 2 processes" in advice((2, 1, 4), (3, 3), 2)
    assert "resume with --batch-size 3 --grad-accum 1 on 1 process" in advice((3, 1, 1), (3, 1), 2)
    assert "damaged" in advice(("2", 1, 1), (2, 1), 1)


def test_every_split_of_a_global_batch_reads_the_same_rows_at_every_step(store):
    """Why a resume with another split is exact in its data: the stream is one row sequence cut
    into batches, so k micro-batches of b rows are the rows of one batch of k*b, and the position
    recorded after each step is the same."""
    from helpers.stores import block_reader
    from surpipe.train.data import SampleStream

    reader = block_reader(store)
    global_batch, steps = 6, 7  # 42 rows of 24: across an epoch boundary, batches across blocks
    ref = SampleStream(reader, global_batch, seed=3)
    it = iter(ref)
    want = [(next(it)["llm"], ref.position) for _ in range(steps)]
    for micro in (1, 2, 3):
        stream = SampleStream(reader, micro, seed=3)
        it = iter(stream)
        for rows, pos in want:
            got = np.concatenate([next(it)["llm"] for _ in range(global_batch // micro)])
            np.testing.assert_array_equal(got, rows)
            assert stream.position == pos
