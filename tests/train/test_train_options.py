"""train: option ranges, prompt_target, non-finite stops, --report-to trackers, the loss curve."""

import hashlib
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.cli import main
from helpers.stores import _args


def _named(err, key):
    """True when ``err`` names option ``key`` as a config key or as its flag (the CLI relabels)."""
    return f"{key}:" in err or f"--{key.replace('_', '-')}:" in err


def _tree_hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- option ranges
@pytest.mark.parametrize("flag,value,expect", [
    ("--llm-weight", "nan", "must be a finite number (got nan)"),
    ("--prompt-weight", "inf", "must be a finite number (got inf)"),
    ("--noise-offset", "nan", "must be a finite number (got nan)"),
    ("--min-snr-gamma", "nan", "must be a finite number (got nan)"),
    ("--learning-rate", "1e30", "must be <= 1 (got 1e+30)"),
    ("--adam-beta1", "5", "must be < 1 (got 5.0)"),
    ("--weight-decay", "-1", "must be >= 0 (got -1.0)"),
    ("--lr-warmup-steps", "-5", "must be >= 0 (got -5)"),
    ("--dropout", "1", "must be < 1 (got 1.0)"),
    ("--adam-epsilon", "0", "must be > 0 (got 0.0)"),
])
def test_absurd_option_refused_before_anything(tmp_path, store, tiny_models, capsys, flag, value, expect):
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, flag, value)) == 1
    err = capsys.readouterr().err
    assert _named(err, flag[2:].replace("-", "_")) and expect in err and "Traceback" not in err
    assert not out.exists()


def test_every_bad_option_reported_at_once(tmp_path, store, tiny_models, capsys):
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--llm-weight", "nan", "--adam-beta2", "1",
                      "--max-grad-norm", "0", "--nhead", "0", "--seed", "-1", "--adapter-weight", "2")) == 1
    err = capsys.readouterr().err
    for key in ("llm_weight", "adam_beta2", "max_grad_norm", "nhead", "seed", "adapter_weight"):
        assert _named(err, key), key
    assert not out.exists()


def test_python_built_config_is_range_checked_too(tmp_path, store, tiny_models):
    """A TrainConfig made in Python skips from_dict: run() still refuses, before writing anything."""
    from stages.train import TrainConfig, run
    from surpipe.errors import SurpipeError

    out = tmp_path / "run"
    cfg = TrainConfig(store=str(store), model=str(tiny_models / "sd"), out=str(out), llm_layer=3, nhead=4,
                      learning_rate=1e30, adam_beta1=5.0, noise_offset=float("nan"), lr_warmup_steps=10)
    with pytest.raises(SurpipeError) as ei:
        run(cfg)
    text = str(ei.value) + "\n".join(ei.value.problems)
    assert "learning_rate: must be <= 1" in text and "adam_beta1: must be < 1" in text
    assert "noise_offset: must be a finite number" in text
    assert "lr_warmup_steps: 10 warm-up steps have no effect with lr_scheduler constant" in text  # cross-field
    assert not out.exists()


# --------------------------------------------------------------------------- prompt_target
@pytest.mark.parametrize("target", ["out", "fc"])
def test_prompt_target_compares_the_right_tensor(tmp_path, store, tiny_models, target):
    from surpipe.train.config import TrainConfig
    from surpipe.train.recipe import TrainRecipe

    cfg = TrainConfig(store=str(store), model=str(tiny_models / "sd"), out=str(tmp_path / "run"), llm_layer=3,
                      nhead=4, dim_feedforward=64, batch_size=3, workers=0, device="cpu", prompt_target=target)
    r = TrainRecipe(cfg)
    r.setup()
    adapter = r.accelerator.unwrap_model(r.adapter)
    adapter.eval()  # no dropout: both computations see the same tensors
    b = r._batch_to_tensors(next(iter(r._stream())))
    with torch.no_grad():
        got = r.loss(b)["prompt"]
        out, _, fc = adapter.forward_with_aux(b["clip_simple"])
        ref = {name: F.kl_div(F.log_softmax(b["clip_complex"], dim=-1), F.softmax(t, dim=-1),
                              reduction="batchmean") for name, t in (("out", out), ("fc", fc))}
    assert not torch.allclose(ref["out"], ref["fc"], rtol=1e-3)  # the setting matters
    # the same KL of the same tensors (recipe vs written out), float32 sums over 77 x 32 terms: a few eps
    torch.testing.assert_close(got, ref[target], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- non-finite stops
def _inject(monkeypatch, at_call, poison):
    """Make TrainRecipe.loss poison its result from micro-batch call ``at_call`` (1-based) on."""
    from surpipe.train.recipe import TrainRecipe

    orig = TrainRecipe.loss
    calls = {"n": 0}

    def loss(self, b):
        calls["n"] += 1
        losses = orig(self, b)
        return poison(self, losses) if calls["n"] >= at_call else losses

    monkeypatch.setattr(TrainRecipe, "loss", loss)


def _nan_llm(self, losses):
    losses["llm"] = losses["llm"] * float("nan")
    losses["loss"] = losses["loss"] + losses["llm"]
    return losses


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, store, tiny_models, capsys, monkeypatch):
    sd, out = tiny_models / "sd", tmp_path / "run"
    assert main(_args(store, sd, out, "--max-steps", "2", "--checkpoint-every", "2")) == 0
    before = _tree_hashes(out / "checkpoints") | {f"adapter/{k}": v for k, v in _tree_hashes(out / "adapter").items()}
    capsys.readouterr()
    # resume to 4 steps (from step 2): the first micro-batch of this run is step 3's
    _inject(monkeypatch, 1, _nan_llm)
    assert main(_args(store, sd, out, "--max-steps", "4", "--checkpoint-every", "1")) == 1
    err = capsys.readouterr().err
    assert "training stopped at step 3" in err and "the llm loss is not finite" in err
    assert "step-00000002" in err and "Traceback" not in err
    after = _tree_hashes(out / "checkpoints") | {f"adapter/{k}": v for k, v in _tree_hashes(out / "adapter").items()}
    assert after == before  # no new checkpoint, no temporary folder, the final adapter untouched
    assert max(json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "error: training stopped at step 3" in (out / "train.log").read_text()


def test_nan_gradient_with_finite_loss_names_the_parameter(tmp_path, store, tiny_models, capsys, monkeypatch):
    def nan_grad(self, losses):
        p = self.accelerator.unwrap_model(self.adapter).fc.weight
        # sqrt(0 * w) is 0 (the loss stays finite) but its gradient is inf * 0 = nan
        losses["loss"] = losses["loss"] + torch.sqrt(p.flatten()[0] * 0.0)
        return losses

    from surpipe import SURAdapter

    assert hasattr(SURAdapter, "forward_with_aux")
    _inject(monkeypatch, 1, nan_grad)
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 1
    err = capsys.readouterr().err
    assert "training stopped at step 1: the gradient is not finite" in err
    assert "adapter.fc.weight" in err and "no checkpoint had been written yet" in err
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


def test_weight_gone_non_finite_after_the_step_stops(tmp_path, store, tiny_models, capsys, monkeypatch):
    orig = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):
        r = orig(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return r

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3", "--checkpoint-every", "1")) == 1
    err = capsys.readouterr().err
    assert "training stopped at step 2: a weight became non-finite" in err and "adapter." in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    assert not (out / "adapter").exists()


def test_save_paths_refuse_a_non_finite_adapter(tmp_path, store, tiny_models):
    from surpipe.train.config import TrainConfig
    from surpipe.train.recipe import TrainRecipe
    from surpipe.errors import SurpipeError

    out = tmp_path / "run"
    r = TrainRecipe(TrainConfig(store=str(store), model=str(tiny_models / "sd"), out=str(out), llm_layer=3, nhead=4,
                                dim_feedforward=64, workers=0, device="cpu"))
    r.setup()
    with torch.no_grad():
        r.accelerator.unwrap_model(r.adapter).fc.bias[0] = float("nan")
    with pytest.raises(SurpipeError, match="non-finite values in adapter.fc.bias"):
        r.save_final()
    with pytest.raises(SurpipeError, match="non-finite values in adapter.fc.bias"):
        r.save_checkpoint()
    assert not (out / "adapter").exists() and not (out / ".tmp-adapter").exists()
    assert not (out / "checkpoints").exists()


# --------------------------------------------------------------------------- --report-to
@pytest.mark.parametrize("choice", ["tensorboard", "wandb"])
def test_missing_tracker_package_refused_before_the_run_folder(tmp_path, store, tiny_models, capsys, choice):
    if importlib.util.find_spec(choice) is not None:
        pytest.skip(f"{choice} is installed here")
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--report-to", choice)) == 1
    err = capsys.readouterr().err
    assert f"--report-to: {choice} needs the {choice} package" in err
    assert "pip install 'surpipe[tracking]'" in err and "Traceback" not in err
    assert not out.exists()


def test_old_tensorboard_key_maps_to_report_to(tmp_path, store, tiny_models, capsys):
    from surpipe.train.config import TrainConfig
    from surpipe.config import from_dict
    from surpipe.errors import SurpipeError

    base = {"store": str(store), "model": str(tiny_models / "sd"), "out": str(tmp_path / "run"), "llm_layer": 3}
    assert from_dict(TrainConfig, {**base, "tensorboard": True}).report_to == "tensorboard"
    assert from_dict(TrainConfig, {**base, "tensorboard": False}).report_to == "none"
    with pytest.raises(SurpipeError, match="keep only report_to"):
        from_dict(TrainConfig, {**base, "tensorboard": True, "report_to": "wandb"})
    if importlib.util.find_spec("tensorboard") is None:  # an old config file asking for TensorBoard
        cfg = tmp_path / "old.json"
        cfg.write_text(json.dumps({**base, "nhead": 4, "tensorboard": True}))
        assert main(["train", "--config", str(cfg)]) == 1
        err = capsys.readouterr().err
        assert "report_to (in " in err and ": tensorboard needs the tensorboard package" in err
        assert not (tmp_path / "run").exists()


def test_metrics_and_validation_grids_reach_the_tracker(tmp_path, store, tiny_models, monkeypatch):
    """The tracker path through accelerate, with a recording tracker in place of TensorBoard/W&B
    (neither package is installed here)."""
    from accelerate.tracking import GeneralTracker
    from PIL import Image

    import surpipe.train.recipe as T

    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.config, self.rows, self.images, self.finished = None, [], [], False

        @property
        def tracker(self):
            return self

        def start(self):
            pass

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kw):
            self.rows.append((step, values))

        def log_images(self, values, step=None, **kw):
            self.images.append((step, values))

        def finish(self):
            self.finished = True

    rec = Recorder()
    monkeypatch.setattr(T, "_tracker_problem", lambda choice: None)
    monkeypatch.setattr(T, "_log_with", lambda choice: [rec])
    notes = []
    orig_curve = T._loss_curve
    monkeypatch.setattr(T, "_loss_curve", lambda m, p, note=None: (notes.append(note), orig_curve(m, p, note))[1])
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2", "--report-to", "wandb",
                      "--validation-every", "2", "--validation-steps", "2", "--validation-size", "32",
                      "--validation-prompts", "a red cube")) == 0
    assert rec.config["learning_rate"] == 1e-5 and rec.config["report_to"] == "wandb"
    assert [s for s, _ in rec.rows] == [1, 2]
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec.rows[1][1]["loss"] == metrics[1]["loss"] and "grad_norm" in rec.rows[1][1]
    (step, imgs), = rec.images
    grid = np.asarray(Image.open(out / "validation" / "step-00000002.png").convert("RGB"))
    assert step == 2 and np.array_equal(imgs["validation"][0], grid)
    assert rec.finished
    # the loss curve says the models are the random tiny ones
    assert notes and notes[0] and "random tiny" in notes[0] and (out / "loss_curve.png").is_file()


# --------------------------------------------------------------------------- loss curve
def test_smoothing_is_a_debiased_ema():
    from surpipe.train.log import smooth as _smooth
    from surpipe.train.log import smoothing_weight as _smoothing_weight

    # by hand: s = 0.5*s + 0.5*v, then / (1 - 0.5**(i+1))
    assert _smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    assert _smooth([4.0, 4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0] * 4)  # no pull towards 0
    assert _smooth([1.0, 5.0], 0.0) == [1.0, 5.0]
    assert _smoothing_weight(10) == 0.0 and _smoothing_weight(100) == pytest.approx(0.9)
    assert _smoothing_weight(10**6) == 0.98
    noisy = [math.sin(i) + 0.01 * i for i in range(400)]
    sm = _smooth(noisy, _smoothing_weight(len(noisy)))
    assert np.std(np.diff(sm)) < 0.2 * np.std(np.diff(noisy))


def test_loss_curve_png_with_note(tmp_path):
    from PIL import Image

    from surpipe.train.recipe import _loss_curve

    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": i + 1, "loss": 1 / (i + 1), "denoise": 1.0, "llm": 2.0,
                                     "prompt": 3.0}) + "\n" for i in range(30)))
    _loss_curve(m, tmp_path / "a.png")
    _loss_curve(m, tmp_path / "b.png", note="random tiny test models (sd): ...")
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.width == b.width and b.height > a.height  # room for the title line


def test_the_loop_reads_the_device_only_at_sync_points(tmp_path, store, tiny_models, monkeypatch):
    """Between sync points (--log-every, checkpoint, validation, last step) the train loop never
    reads a tensor on the host: every item()/float()/bool()/int()/tolist()/numpy()/cpu() called
    from surpipe/train/ during the loop is counted, outside the sync point's read and the step's
    checkpoint/validation (which persist, after the check), and so is every .to(<device>) without
    non_blocking=True (a copy to a GPU from pageable memory waits for the queued kernels). On CUDA
    each would be a host sync. (tests/test_gpu.py checks the same with CUDA's sync debug mode.)"""
    import inspect

    from surpipe.train import numerics
    from surpipe.train.recipe import TrainRecipe

    state = {"loop": False, "sync": 0, "recipe": None}
    reads, settled = [], []

    def around(cls, name, key, note=None):
        orig = getattr(cls, name)

        def wrapped(self, *a, **k):
            state[key] = state[key] + 1 if key == "sync" else True
            if note is not None:
                note.append(state["recipe"].step)
            try:
                return orig(self, *a, **k)
            finally:
                state[key] = state[key] - 1 if key == "sync" else False
        monkeypatch.setattr(cls, name, wrapped)

    orig_loop = TrainRecipe._loop
    monkeypatch.setattr(TrainRecipe, "_loop", lambda self, *a: (state.update(recipe=self), orig_loop(self, *a))[1])
    around(TrainRecipe, "_loop", "loop")
    around(numerics.PendingSteps, "settle", "sync", settled)
    around(TrainRecipe, "_after_step", "sync")

    def note(name, frame):
        if state["loop"] and not state["sync"]:
            caller = frame.f_code.co_filename.replace("\\", "/")
            if "/surpipe/train/" in caller and not caller.endswith("/data.py"):  # data.py: host arrays
                reads.append((name, caller.rsplit("/", 1)[-1], frame.f_lineno))

    def spy(name):
        orig = getattr(torch.Tensor, name)

        def f(t, *a, **k):
            note(name, inspect.currentframe().f_back)
            return orig(t, *a, **k)
        return f

    for name in ("item", "__float__", "__bool__", "__int__", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    to = torch.Tensor.to

    def moved(t, *a, **k):  # a copy to a device that would wait for the queued kernels
        to_device = any(isinstance(x, (torch.device, str, torch.Tensor)) for x in a) or "device" in k
        if to_device and not (k.get("non_blocking") or any(x is True for x in a[1:])):
            note("to(device)", inspect.currentframe().f_back)
        return to(t, *a, **k)
    monkeypatch.setattr(torch.Tensor, "to", moved)
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "7", "--log-every", "3",
                      "--checkpoint-every", "100", "--min-snr-gamma", "5")) == 0
    assert reads == []
    assert settled == [3, 6, 7]  # the logging steps and the last one: one read each
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [3, 6, 7]
    assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "denoise", "llm", "prompt", "grad_norm", "step_s"))


def test_fp16_loss_scaling_skips_a_non_finite_gradient_instead_of_stopping(tmp_path, store, tiny_models, capsys,
                                                                         monkeypatch):
    """With a loss scaler (fp16 on CUDA) a non-finite gradient is the scaler's signal to skip the step,
    not a reason to stop: emulated here by a scaler that scales by 1 and an AdamW step that skips
    non-finite gradients, as torch's GradScaler does."""
    from surpipe.train.recipe import TrainRecipe

    class Scaler:  # GradScaler's interface at a scale of 1
        def scale(self, loss):
            return loss

        def step(self, optimizer, *a, **k):
            return optimizer.step(*a, **k)

        def update(self, *a):
            pass

        def unscale_(self, optimizer):
            pass

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    orig_start = TrainRecipe._start_accelerator
    monkeypatch.setattr(TrainRecipe, "_start_accelerator",
                        lambda self: (orig_start(self), setattr(self.accelerator, "scaler", Scaler()))[0])
    orig_step, skipped = torch.optim.AdamW.step, []

    def step(self, *a, **k):
        if any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in self.param_groups[0]["params"]):
            skipped.append(1)
            return None
        return orig_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)

    def nan_grad_once(self, losses):
        p = self.accelerator.unwrap_model(self.adapter).fc.weight
        losses["loss"] = losses["loss"] + torch.sqrt(p.flatten()[0] * 0.0)  # finite loss, NaN gradient
        return losses

    orig_loss, calls = TrainRecipe.loss, {"n": 0}

    def loss(self, b):
        calls["n"] += 1
        out = orig_loss(self, b)
        return nan_grad_once(self, out) if calls["n"] == 1 else out

    monkeypatch.setattr(TrainRecipe, "loss", loss)
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3", "--grad-accum", "1")) == 0, \
        capsys.readouterr().err
    assert skipped == [1] and (out / "adapter").is_dir()


def test_log_every_auto_logs_every_step_on_a_cpu_and_every_10th_on_a_gpu(tmp_path, store, tiny_models):
    """--log-every 0 (the default) resolves per device: each log is a sync point, which on a GPU waits
    for the queued steps; the saved config keeps "auto" so a rerun on another device resolves again."""
    from surpipe.train.config import TrainConfig

    cfg = TrainConfig(store="s", model="m", out="o", llm_layer=3)
    assert cfg.log_every == 0 and cfg.problems() == []
    assert (cfg.on_device(cuda=False).log_every, cfg.on_device(cuda=True).log_every) == (1, 10)
    assert TrainConfig(store="s", model="m", out="o", llm_layer=3, log_every=4).on_device(cuda=True).log_every == 4
    out = tmp_path / "run"
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["log_every"] == 0


def test_a_gpu_index_other_than_the_processs_is_refused_not_ignored(monkeypatch):
    """accelerate puts a process on the GPU of its local rank: --device cuda:1 would silently train on
    cuda:0, so it is refused with the way to pick a GPU."""
    import torch

    from surpipe.errors import SurpipeError
    from surpipe.train.config import TrainConfig
    from surpipe.train.setup import start_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused before any CUDA call
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = TrainConfig(store="s", model="m", out="o", llm_layer=1, device="cuda:1")
    with pytest.raises(SurpipeError, match="CUDA_VISIBLE_DEVICES=1 and --device cuda"):
        start_accelerator(cfg, "o")


def test_auto_dtype_on_a_gpu_without_native_bf16_is_fp16(monkeypatch):
    import contextlib

    import torch

    from surpipe import devices as D

    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext(asked.append(i)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for native, want in ((False, "float16"), (True, "bfloat16")):
        # emulated bf16 (a V100, a T4) counts as no bf16: only native support picks it
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: (
            n or including_emulation))
        assert D.resolve_dtype("auto", "cuda:1") == want
    assert asked == [1, 1]
