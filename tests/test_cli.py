"""The command line as a user meets it: the real ``surpipe`` entry point in a subprocess.

Usage errors exit 2 with click's message, user errors exit 1 with one message, Ctrl-C exits 130
saying what a rerun does; none of them prints a traceback. Every option has a one-line help.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def surpipe(*args, env=None, timeout=120, cwd=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "stages", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=cwd or REPO)


def _no_traceback(p):
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]


@pytest.mark.parametrize("args, needle", [
    (["trian"], "No such command 'trian'"),
    (["train", "--bogus-flag", "1"], "No such option: --bogus-flag"),
    (["train", "--max-steps", "ten"], "--max-steps"),
    (["inspect"], "Missing argument 'STORE'"),
    (["verify"], "Missing argument 'STORE'"),
    (["pack", "only-src"], "Missing argument 'OUT'"),
    ([], "Usage"),
])
def test_usage_errors_exit_2_with_clicks_message(args, needle):
    p = surpipe(*args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert needle in p.stderr + p.stdout
    _no_traceback(p)


def test_version():
    from surpipe import __version__

    p = surpipe("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"surpipe {__version__}"


def _commands():
    """Every command by its full name; a command group's commands as ``group sub`` (``study make``)."""
    import typer.main

    from stages.cli import app

    out = {}
    for name, cmd in typer.main.get_command(app).commands.items():
        subs = getattr(cmd, "commands", None)
        out.update({f"{name} {s}": c for s, c in subs.items()} if subs else {name: cmd})
    return out


def test_every_option_of_every_command_has_a_one_line_help_and_a_panel():
    missing = []
    for name, cmd in _commands().items():
        for p in cmd.params:
            if p.name in ("help", "ctx"):
                continue
            h = (getattr(p, "help", None) or "").split(" (default")[0].split(" (required")[0]
            if len(h.strip()) < 8:
                missing.append(f"{name} {p.name}")
            if p.param_type_name == "option" and name != "run" and not getattr(p, "rich_help_panel", None):
                missing.append(f"{name} {p.name}: no panel")
    assert not missing, missing


def test_train_help_is_grouped_and_names_are_never_cut():
    p = surpipe("train", "--help", env={"COLUMNS": ""})
    assert p.returncode == 0
    for panel in ("Data", "Model", "Optimisation", "Losses", "Running"):
        assert f"─ {panel} " in p.stdout, panel
    from stages.cli import cli_fields, flag
    from surpipe.train.config import TrainConfig

    for f in cli_fields(TrainConfig):
        assert flag(f.name) in p.stdout, f.name
    assert "…" not in p.stdout
    assert "--gradient-path" in p.stdout and "denoising" in p.stdout.lower()


def test_option_errors_name_the_flag_and_every_problem_at_once(tmp_path):
    p = surpipe("train", "--store", tmp_path / "s.zarr", "--model", "m", "--out", tmp_path / "o", "--llm-layer", "1",
                "--learning-rate", "1e30", "--llm-weight", "nan", "--adam-beta1", "5", "--weight-decay", "-1",
                "--lr-warmup-steps", "-5", "--min-snr-gamma", "nan", "--noise-offset", "nan")
    assert p.returncode == 1
    _no_traceback(p)
    for f in ("--learning-rate", "--llm-weight", "--adam-beta1", "--weight-decay", "--lr-warmup-steps",
              "--min-snr-gamma", "--noise-offset"):
        assert f"- {f}:" in p.stderr, f
    assert "TrainConfig" not in p.stderr and "invalid options for 'surpipe train'" in p.stderr
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_values_from_a_config_file_are_named_by_key_and_file(tmp_path):
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps({"store": "s", "model": "m", "out": "o", "llm_layer": 1, "learning_rate": -1}))
    p = surpipe("train", "--config", cfg, "--weight-decay", "-1")
    assert p.returncode == 1
    assert f"learning_rate (in {cfg}): must be > 0" in p.stderr
    assert "--weight-decay: must be >= 0" in p.stderr
    _no_traceback(p)


def test_pipeline_config_errors_name_the_section_and_key(tmp_path):
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"workdir": str(tmp_path / "w"), "data": "data/sample", "tiny_models": True,
                               "steps": ["train"], "train": {"learning_rate": "fast"}}))
    p = surpipe("run", cfg)
    assert p.returncode == 1, p.stderr
    assert "train.learning_rate" in p.stderr and "TrainConfig" not in p.stderr
    _no_traceback(p)


def test_every_command_takes_config(tmp_path):
    for name, cmd in _commands().items():
        if name == "run":
            continue
        assert any("--config" in getattr(p, "opts", []) for p in cmd.params), name
    # inspect and verify read their STORE from --config too
    cfg = tmp_path / "i.json"
    cfg.write_text(json.dumps({"store": str(tmp_path / "nope.zarr")}))
    p = surpipe("inspect", "--config", cfg)
    assert p.returncode == 1 and "nope.zarr" in p.stderr
    _no_traceback(p)


def test_ctrl_c_during_train_exits_130_and_says_rerun_resumes(tmp_path, train_store, tiny_models):
    out = tmp_path / "run"
    args = ["train", "--store", train_store, "--model", tiny_models / "sd", "--llm-layer", "3", "--out", out,
            "--batch-size", "2", "--grad-accum", "1", "--workers", "0", "--device", "cpu", "--nhead", "4",
            "--dim-feedforward", "64", "--max-steps", "100000", "--checkpoint-every", "1000"]
    proc = subprocess.Popen([sys.executable, "-m", "stages", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "resume" in stderr
    assert "Traceback" not in stderr + stdout


def test_log_file_gets_plain_progress_lines_not_redraws(tmp_path, tiny_models):
    """stderr not a TTY: progress comes as whole lines, never carriage-return redraws."""
    p = surpipe("extract-llm", "--data", REPO / "data" / "sample", "--store", tmp_path / "s.zarr",
                "--model", tiny_models / "llm", "--layers", "1", "--device", "cpu",
                env={"SURPIPE_PROGRESS_INTERVAL": "0"})
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr
    assert "Failed to load CPU gemm_4bit_forward" not in p.stderr  # known third-party noise is hidden
    assert "100%" in p.stderr or "64/64" in p.stderr


def test_run_twice_does_nothing_and_a_changed_section_reruns_only_its_step(tmp_path):
    work = tmp_path / "w"
    cfg = {"workdir": str(work), "data": str(REPO / "data" / "sample"), "tiny_models": True,
           "llm_layers": [1], "steps": ["make_tiny_models", "pack", "extract_llm"],
           "extract_llm": {"quant": "none", "block_rows": 32}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(cfg))
    first = surpipe("run", path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "=== surpipe run: extract_llm ===" in first.stdout
    again = surpipe("run", path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout
    assert "=== surpipe run: extract_llm ===" not in again.stdout and "loading" not in again.stderr
    cfg["extract_llm"]["batch_size"] = 4  # a changed section reruns its step, not the ones before it
    path.write_text(json.dumps(cfg))
    third = surpipe("run", path, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "=== surpipe run: extract_llm ===" in third.stdout
    assert "pack: unchanged" in third.stdout and "make_tiny_models: unchanged" in third.stdout


def test_an_unanticipated_exception_is_one_message_and_verbose_shows_the_traceback(monkeypatch, capsys, tmp_path):
    import errno

    import stages.inspect
    from stages.cli import main

    def boom(cfg):
        raise KeyError("no such thing")

    monkeypatch.setattr(stages.inspect, "run", boom)
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unexpected KeyError" in err and "--verbose" in err and "Traceback" not in err
    with pytest.raises(KeyError):
        main(["--verbose", "inspect", str(tmp_path)])

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(stages.inspect, "run", full)
    assert main(["inspect", str(tmp_path)]) == 1
    assert "no space left on device" in capsys.readouterr().err


def test_the_cli_reaches_click_through_typer_s_public_names():
    """typer < 0.26 has no ``typer._click`` (it imports the ``click`` package): a GPU image's typer
    failed every command on it. ``.ci/run`` runs this file again at pyproject's oldest typer."""
    from stages import cli

    used = [str(p.relative_to(REPO)) for d in ("stages", "surpipe") for p in (REPO / d).rglob("*.py")
            if "typer._click" in p.read_text()]
    assert not used, used
    assert cli._click_exceptions().UsageError.__module__ == type(cli.typer.BadParameter("x")).__module__
