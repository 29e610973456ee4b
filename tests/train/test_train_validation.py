"""Issue 17 in training: the held-out split (--val-rows/--val-fraction) is never read by the
training stream, its losses are logged as val/* rows, and a resume with another split is refused."""

import json

import numpy as np
import pytest

from stages.cli import main
from helpers.stores import _args, _metrics

VAL_ARGS = ("--val-rows", "6", "--validation-every", "5", "--prompt-weight", "1", "--llm-weight", "1")


def _groups(store):
    from surpipe.store import FeatureStore
    from surpipe.train.groups import resolve_groups

    g, problems = resolve_groups(FeatureStore(store), llm_layer=3, llm_group=None, clip_group=None, vae_group=None,
                                 use_flip=True)
    assert not problems
    return g


def _row_of(reader):
    """Store row index of each row's (unique, random) LLM vector: identifies a streamed sample."""
    lookup = {}
    for b in range(reader.num_blocks):
        for i, v in enumerate(reader[b]["llm"]):
            lookup[v.tobytes()] = b * reader.block_rows + i
    assert len(lookup) == reader.num_rows
    return lambda v: lookup[v.tobytes()]


def _old_plan(num_rows, block_rows, seed, epoch):
    """The epoch plan as it was before held-out splits (independent copy of the formula)."""
    rng = np.random.default_rng([seed, epoch, 7])
    nb = -(-num_rows // block_rows)
    return [(int(b), rng.permutation(min(block_rows, num_rows - int(b) * block_rows))) for b in rng.permutation(nb)]


def _stream_rows(reader, keep, batches, batch_size=3, position=None, seed=5):
    from surpipe.train.data import SampleStream

    row = _row_of(reader)
    s = SampleStream(reader, batch_size, seed=seed, workers=0, keep=keep, position=position)
    out, it = [], iter(s)
    for _ in range(batches):
        out += [row(v) for v in next(it)["llm"]]
    return out, s


def test_stream_never_reads_held_out_rows_and_keeps_the_old_order(train_store):
    from surpipe.store import FeatureStore
    from surpipe.train.data import BlockReader
    from surpipe.train.validation.split import held_out_rows

    reader = BlockReader(str(train_store), _groups(train_store), 8)
    keys = FeatureStore(train_store).keys()
    held = held_out_rows(keys, rows=6, seed=0)
    assert len(held) == 6
    keep = np.ones(24, dtype=bool)
    keep[held] = False
    # without a split: exactly the order of the plan as it was (two epochs, 24 rows each)
    plain, _ = _stream_rows(reader, None, 16)
    old = [b * 8 + int(r) for e in (0, 1) for b, order in _old_plan(24, 8, 5, e) for r in order]
    assert plain == old
    # with a split: two full epochs of the 18 training rows, never a held-out key, in the relative
    # order of the run without a split
    split, _ = _stream_rows(reader, keep, 12)
    assert len(split) == 36
    held_keys = set(keys[held].tolist())
    assert not held_keys & {str(keys[r]) for r in split}
    for e in (0, 1):
        epoch = split[18 * e:18 * (e + 1)]
        assert sorted(epoch) == sorted(np.flatnonzero(keep).tolist())
        assert epoch == [r for r in old[24 * e:24 * (e + 1)] if keep[r]]


def test_stream_with_split_resumes_at_its_position_and_drops_emptied_blocks(train_store):
    from surpipe.train.data import BlockReader, epoch_plan

    reader = BlockReader(str(train_store), _groups(train_store), 8)
    keep = np.ones(24, dtype=bool)
    keep[8:16] = False  # block 1 entirely held out: not in the plan, never read
    keep[[0, 23]] = False
    plan = epoch_plan(24, 8, 5, 0, keep)
    assert [b for b, _ in plan] == [b for b, _ in _old_plan(24, 8, 5, 0) if b != 1]
    straight, _ = _stream_rows(reader, keep, 10, batch_size=2)
    first, s = _stream_rows(reader, keep, 4, batch_size=2)
    rest, _ = _stream_rows(reader, keep, 6, batch_size=2, position=s.position)
    assert first + rest == straight
    assert not {0, 23, *range(8, 16)} & set(straight)


def _run(store, sd, out, *extra):
    return main(_args(store, sd, out, *VAL_ARGS, "--learning-rate", "3e-3", "--checkpoint-every", "100", *extra))


def test_validation_rows_logged_split_recorded_resume_refused_and_reproducible(tmp_path, train_store, tiny_models,
                                                                               capsys, monkeypatch):
    """One short run (CPU time is scarce): val/* rows every 5 steps and at the end, the split in
    config.json, a resume with another split refused, and the end-of-training values reproduced
    exactly by the adapter reloaded from its checkpoint, twice."""
    from surpipe.train.config import TrainConfig
    from surpipe.train.recipe import TrainRecipe
    from surpipe.store import FeatureStore
    from surpipe.train.validation.metrics import METRICS
    from surpipe.train.validation.split import held_out_rows, split_record

    # --validation-every also renders the picture grid (minutes on CPU), not what is tested here
    monkeypatch.setattr(TrainRecipe, "validate", lambda self: self.out / "grid.png")
    out, sd = tmp_path / "run", tiny_models / "sd"
    assert _run(train_store, sd, out, "--max-steps", "10") == 0
    printed = capsys.readouterr().out
    rows = _metrics(out)
    val = [r for r in rows if "val/prompt" in r]
    assert [r["step"] for r in val] == [0, 5, 10]  # step 0: the untrained adapter
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    logged = set(METRICS) - {"val/prompt_fc"}  # the fc term only with --prompt-target fc
    for r in val:
        assert set(r) == {"step", *logged} and all(np.isfinite(r[k]) for k in logged)
    # the baseline (no adapter) does not depend on the training; the adapter's terms move
    assert val[0]["val/prompt_baseline"] == val[1]["val/prompt_baseline"] == val[2]["val/prompt_baseline"]
    assert val[1]["val/prompt"] != val[2]["val/prompt"] and val[1]["val/llm"] != val[2]["val/llm"]
    print("held-out:", val)
    assert "held-out (6 rows, step 10):\n  retrieval of the own complex prompt: R@1" in printed and "prompt term" in printed
    saved = json.loads((out / "config.json").read_text())
    keys = FeatureStore(train_store).keys()
    assert saved["val_rows"] == 6
    assert saved["_surpipe"]["run"]["split"] == split_record(keys, held_out_rows(keys, rows=6, seed=0), rows=6, seed=0)
    assert "held-out" in (out / "train.log").read_text() and (out / "loss_curve.png").is_file()

    # (c) another split is refused, naming both; no split is another split too
    assert _run(train_store, sd, out, "--max-steps", "11", "--val-rows", "4") == 1
    err = capsys.readouterr().err
    assert "--val-rows 6" in err and "--val-rows 4" in err and "held-out split cannot change" in err
    assert main(_args(train_store, sd, out, "--prompt-weight", "1", "--llm-weight", "1", "--learning-rate", "3e-3",
                      "--checkpoint-every", "100", "--max-steps", "11")) == 1
    assert "no held-out split" in capsys.readouterr().err

    # (d) fixed validation noise: the reloaded adapter gives the logged end values, twice
    cfg = TrainConfig(store=str(train_store), model=str(sd), out=str(out), llm_layer=3, batch_size=2, grad_accum=2,
                      workers=0, progress=False, device="cpu", dim_feedforward=64, nhead=4, val_rows=6,
                      validation_every=5, prompt_weight=1, llm_weight=1, learning_rate=3e-3, checkpoint_every=100,
                      max_steps=10)
    r = TrainRecipe(cfg)
    r.setup()
    assert r.step == 10
    a, b = r.evaluate_held_out(), r.evaluate_held_out()
    assert a == b and {"step": 10, **a} == val[-1]


def test_a_restart_without_checkpoint_logs_each_step_once(tmp_path, train_store, tiny_models):
    """A run killed before its first checkpoint starts over: metrics.jsonl holds each step (and the
    step-0 validation) once, not the killed run's rows followed by the new ones."""
    import shutil

    out, sd = tmp_path / "run", tiny_models / "sd"
    args = ("--max-steps", "3", "--validation-every", "0", "--val-rows", "6")
    assert main(_args(train_store, sd, out, *args)) == 0
    first = _metrics(out)
    shutil.rmtree(out / "checkpoints")  # as if killed before any checkpoint was written
    shutil.rmtree(out / "adapter")
    assert main(_args(train_store, sd, out, *args)) == 0
    again = _metrics(out)
    assert [r["step"] for r in again] == [r["step"] for r in first] == [0, 1, 2, 3, 3]
    timing = ("_s", "samples_per_s")
    same = lambda rows: [{k: v for k, v in r.items() if not k.endswith(timing)} for r in rows]  # noqa: E731
    assert same(again) == same(first)  # the same run, replayed
