"""What a training run records: ``metrics.jsonl`` (one JSON object per logged step), a human
``train.log``, the ``--report-to`` trackers (TensorBoard, W&B, through accelerate) and the loss curve.
Torch-free at import (the CLI's ``--help`` reads the train stage module, which imports this)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Optional

from surpipe.config import atomic_write_text
from surpipe.errors import SurpipeError, first_line

# --report-to choice -> the packages that provide it (any one suffices), as accelerate looks for them
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}

LOSS_TERMS = ("loss", "denoise", "llm", "prompt")


def tracker_problem(report_to: str) -> Optional[str]:
    """Why ``report_to`` cannot be used here (its package is missing), or None."""
    if report_to == "none":
        return None
    for mod in TRACKER_PACKAGES[report_to]:
        try:
            if importlib.util.find_spec(mod) is not None:
                return None
        except (ImportError, ValueError):
            continue
    return (f"report_to: {report_to} needs the {report_to} package, which is not installed: "
            f"pip install 'surpipe[tracking]' (or pip install {TRACKER_PACKAGES[report_to][0]})")


def init_trackers(accelerator, report_to: str, config: dict, out: Path) -> None:
    """Start the --report-to tracker (TensorBoard under OUT/tensorboard, or a W&B run) with the
    run's ``config`` (a flat dict)."""
    if report_to == "none" and not accelerator.log_with:
        return
    # trackers take flat scalars: lists and None as text
    values = {k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v)) for k, v in config.items()}
    project = "tensorboard" if report_to == "tensorboard" else "surpipe"
    try:
        accelerator.init_trackers(project, config=values, init_kwargs={"wandb": {"name": out.name, "dir": str(out)}})
    except Exception as e:  # e.g. wandb without a login: say so, no traceback
        hint = " (run `wandb login`, or set WANDB_MODE=offline)" if report_to == "wandb" else ""
        raise SurpipeError(f"cannot start the {report_to} tracker: {first_line(e)}{hint}") from None


class QuietLogger:
    """What data-parallel ranks other than 0 log: nothing (rank 0 writes the run's logs)."""

    def __getattr__(self, name):
        return lambda *a, **k: None


class RunLogger:
    """metrics.jsonl + a human train.log + the accelerate trackers of ``--report-to``, which also
    receive the validation grids."""

    def __init__(self, metrics: Path, human: Path, accelerator=None):
        self.metrics = open(metrics, "a", encoding="utf-8")
        self.human = open(human, "a", encoding="utf-8")
        self.accelerator = accelerator if accelerator is not None and accelerator.trackers else None

    def log_text(self, msg: str) -> None:
        self.human.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
        self.human.flush()

    def log(self, m: dict) -> None:
        self.metrics.write(json.dumps(m) + "\n")
        self.metrics.flush()
        self.log_text(
            f"step {m['step']} loss {m['loss']:.5f} (denoise "
            f"{'-' if m.get('denoise') is None else format(m['denoise'], '.5f')} llm {m['llm']:.4f} "
            f"prompt {m['prompt']:.4f}) lr {m['lr']:.2e} gnorm {m['grad_norm']:.3f} "
            f"{m['samples_per_s']:.1f} samples/s wait {m['data_wait_s'] / m['step_s']:.0%}")
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in m.items() if k != "step" and isinstance(v, (int, float))},
                                 step=m["step"])

    def log_validation(self, m: dict) -> None:
        """A held-out validation row ``{"step": s, "val/...": ...}``: metrics.jsonl, train.log, trackers."""
        self.metrics.write(json.dumps(m) + "\n")
        self.metrics.flush()
        self.log_text(f"step {m['step']} held-out " + " ".join(
            f"{k[4:]} {v:.5f}" for k, v in m.items() if k.startswith("val/")))
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in m.items() if k != "step" and isinstance(v, (int, float))},
                                 step=m["step"])

    def log_image(self, tag: str, png: Path, step: int) -> None:
        """Send a picture (the validation grid) to the trackers: TensorBoard add_image, W&B wandb.Image."""
        if self.accelerator is None:
            return
        # heavy: PIL, only when a tracker takes the pictures
        import numpy as np
        from PIL import Image

        with Image.open(png) as im:
            arr = np.asarray(im.convert("RGB"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, arr, global_step=step, dataformats="HWC")
                tracker.writer.flush()
            else:  # accelerate's W&B tracker wraps each array in a wandb.Image
                tracker.log_images({tag: [arr]}, step=step)

    def close(self) -> None:
        self.metrics.close()
        self.human.close()
        if self.accelerator is not None:
            self.accelerator.end_training()


def drop_metrics_after(metrics: Path, step: int) -> None:
    """Keep only the rows of metrics.jsonl up to ``step`` (atomically): a resumed run replays the
    steps a killed run logged after its last checkpoint."""
    if not metrics.is_file():
        return
    keep = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    atomic_write_text(metrics, "".join(k + "\n" for k in keep))


def smooth(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): ``s_i = w*s_{i-1} + (1-w)*v_i``
    from ``s_{-1} = 0``, divided by ``1 - w**(i+1)`` so the start is not pulled towards 0."""
    out, s = [], 0.0
    for i, v in enumerate(values):
        s = weight * s + (1.0 - weight) * v
        out.append(s / (1.0 - weight ** (i + 1)) if weight else s)
    return out


def smoothing_weight(n: int) -> float:
    """An EMA weight averaging over about a tenth of ``n`` points (none for 10 points or fewer)."""
    return min(0.98, max(0.0, 1.0 - 10.0 / n)) if n else 0.0


def loss_curve(metrics: Path, png: Path, note: Optional[str] = None) -> None:
    """The four loss terms per logged step (thin) with their smoothed line; ``note`` (e.g. that the
    models are random tiny ones) goes into the title."""
    import matplotlib  # heavy: only for the curve

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    val = [r for r in rows if "loss" not in r]  # held-out validation rows: val/* only
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    weight = smoothing_weight(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6 if note else 3.2))
    for ax, key in zip(axes, LOSS_TERMS):
        pts = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]  # denoise: logged steps only
        if not pts:
            continue
        xs, vals = zip(*pts)
        ax.plot(xs, vals, lw=0.8, alpha=0.35, marker="." if len(rows) <= 200 else None, ms=3,
                color="tab:blue", label="per step")
        ax.plot(xs, smooth(list(vals), weight), lw=1.8, color="tab:orange", label=f"EMA {weight:.2f}")
        for vkey, style in ((f"val/{key}", "-"), (f"val/{key}_baseline", "--")):
            pts = [(r["step"], r[vkey]) for r in val if r.get(vkey) is not None]
            if pts:
                ax.plot(*zip(*pts), style, lw=1.4, marker="o", ms=3, color="tab:green" if style == "-" else "tab:gray",
                        label="held-out" if style == "-" else "held-out, no adapter")
                ax.legend(fontsize=7)
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    if note:
        fig.suptitle(note, color="red", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
