"""The split recipe: check() returns the checked inputs and runs once; checkpoints carry no unused
Python RNG state, and checkpoints written before still load."""

from __future__ import annotations

import dataclasses
import json

import pytest


def _cfg(store, tiny_models, out, **kw):
    from surpipe.train.config import TrainConfig

    return TrainConfig(store=str(store), model=str(tiny_models / "sd"), out=str(out), llm_layer=3, nhead=4,
                       dim_feedforward=64, workers=0, device="cpu", progress=False, loss_curve=False, **kw)


def test_check_returns_frozen_inputs_and_runs_once(tmp_path, store, tiny_models, monkeypatch):
    import surpipe.train.inputs as TI
    from stages.train import run
    from surpipe.train.inputs import TrainingInputs

    calls = {"n": 0}
    orig = TI.gather

    def counting(cfg):
        calls["n"] += 1
        return orig(cfg)

    monkeypatch.setattr(TI, "gather", counting)
    from surpipe.train.recipe import TrainRecipe

    inputs = TrainRecipe(_cfg(store, tiny_models, tmp_path / "a")).check()
    assert isinstance(inputs, TrainingInputs) and inputs.width == 32 and inputs.groups.llm_layer == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.width = 8
    calls["n"] = 0
    assert run(_cfg(store, tiny_models, tmp_path / "b", max_steps=1))["step"] == 1
    assert calls["n"] == 1  # run(): check() once, setup() reuses its result


def test_checkpoints_hold_no_python_random_and_old_ones_still_load(tmp_path, store, tiny_models, capsys):
    from stages.train import run

    out = tmp_path / "run"
    run(_cfg(store, tiny_models, out, max_steps=1))
    state_file = out / "checkpoints" / "step-00000001" / "state.json"
    state = json.loads(state_file.read_text())
    assert "python_random" not in state and state["step"] == 1
    # a checkpoint written before (with the never-restored Python RNG state) resumes as before
    state["python_random"] = repr((3, tuple(range(625)), None))
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert run(_cfg(store, tiny_models, out, max_steps=2))["step"] == 2
    assert "resuming" in capsys.readouterr().out
