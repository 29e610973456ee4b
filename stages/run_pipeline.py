"""``surpipe run CONFIG``: the whole chain from one config file.

    surpipe run configs/sample.json          # bundled sample, tiny models built offline (~5 min CPU)

make-tiny-models (optional) -> pack -> extract-llm -> encode-latents -> train -> generate --compare
-> eval. Each step is resumable, so rerunning the same command continues where it stopped and
skips finished steps. Point ``data``, ``llm_model``, ``sd_model`` and ``clip_model`` at real
models and the full SURD to run at scale: every stage's options can be set in its section.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from surpipe.config import atomic_write_text, from_dict, save
from surpipe.errors import SurpipeError
from surpipe.tiny import build_tiny_clip, make_tiny_models
from surpipe.train.validation.summary import first_validation, summary
from surpipe.train.run_folder import RunFolder

STEPS = ("make_tiny_models", "pack", "extract_llm", "encode_latents", "train", "generate", "eval")


@dataclass
class PipelineConfig:
    """Paths shared by the steps, plus one section of options per step (the stage's own config
    keys; the paths the chain wires together are filled in for you)."""

    workdir: str
    data: str
    llm_model: Optional[str] = None  # None with tiny_models: the tiny LLaMA built offline
    sd_model: Optional[str] = None
    clip_model: Optional[str] = None  # CLIP image-text model for eval
    tiny_models: bool = False
    tiny_sd: Literal["sd", "sdxl"] = "sd"  # with tiny_models: which tiny Stable Diffusion to use
    llm_layers: list[int] = field(default_factory=lambda: [1, 3])
    train_layer: Optional[int] = None  # default: the deepest of llm_layers
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    pack: dict = field(default_factory=dict)
    extract_llm: dict = field(default_factory=dict)
    encode_latents: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    generate: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)


def _stage(module: str, cls_name: str, values: dict):
    mod = importlib.import_module(f"stages.{module}")
    section = module
    cfg = from_dict(getattr(mod, cls_name), values, what=f"pipeline config, section {section!r}",
                    label=lambda k: f"{section}.{k}")
    return mod.run(cfg)


# A step reruns when its own settings or a step it reads from changed since it last finished.
DEPENDS = {"make_tiny_models": (), "pack": (), "extract_llm": ("make_tiny_models", "pack"),
           "encode_latents": ("make_tiny_models", "pack"), "train": ("extract_llm", "encode_latents"),
           "generate": ("train",), "eval": ("train",)}


class _Ledger:
    """``pipeline_state.json``: for each finished step, a hash of what it was run with."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text())
            self.done = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.done = {}
        self.keys: dict[str, str] = {}

    def key(self, name: str, values: dict) -> str:
        upstream = {d: self.keys.get(d, "") for d in DEPENDS[name]}
        blob = json.dumps({"values": values, "upstream": upstream}, sort_keys=True, default=str)
        self.keys[name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self.keys[name]

    def finished(self, name: str) -> bool:
        rec = self.done.get(name)
        return isinstance(rec, dict) and rec.get("key") == self.keys.get(name)

    def record(self, name: str) -> None:
        self.done[name] = {"key": self.keys[name], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")


def _banner(name: str) -> None:
    print(f"\n=== surpipe run: {name} ===", flush=True)


def _models(cfg: PipelineConfig, models: Path) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(LLM, Stable Diffusion, CLIP) the chain uses: the config's, else the tiny ones; refuses a missing one."""
    llm = cfg.llm_model or (str(models / "llm") if cfg.tiny_models else None)
    sd = cfg.sd_model or (str(models / cfg.tiny_sd) if cfg.tiny_models else None)
    clip = cfg.clip_model or (str(models / "clip") if cfg.tiny_models else None)
    missing = [n for n, v in (("llm_model", llm), ("sd_model", sd)) if v is None]
    if "eval" in cfg.steps and clip is None:
        missing.append("clip_model")
    if missing:
        raise SurpipeError("the pipeline config needs " + ", ".join(missing) + " (or tiny_models: true)")
    return llm, sd, clip


class _Steps:
    """Runs the chain's steps: each at most once, skipped when unchanged since it finished."""

    def __init__(self, cfg: PipelineConfig, work: Path):
        self.cfg = cfg
        self.ledger = _Ledger(work / "pipeline_state.json")
        self.timings: dict = {}
        self.skipped: list[str] = []

    def step(self, name, fn, values: dict, output: Path):
        if name not in self.cfg.steps:
            return
        self.ledger.key(name, values)
        if self.ledger.finished(name) and output.exists():
            self.skipped.append(name)
            print(f"--- {name}: unchanged since it finished ({output}); skipped", flush=True)
            return
        _banner(name)
        t0 = time.perf_counter()
        fn(values)
        self.timings[name] = round(time.perf_counter() - t0, 1)
        self.ledger.record(name)
        print(f"--- {name} done in {self.timings[name]}s", flush=True)


def _tiny(models: Path) -> None:
    if all((models / m).is_dir() for m in ("llm", "sd", "sdxl", "clip")):
        print(f"tiny models already in {models}")
        return
    if not all((models / m).is_dir() for m in ("llm", "sd", "sdxl")):
        make_tiny_models(models, seed=0, overwrite=True)
    if not (models / "clip").is_dir():
        build_tiny_clip(models / "clip", seed=0)
    print(f"tiny models written to {models}")


def _stage_fn(module, cls_name):
    return lambda values: _stage(module, cls_name, values)


def _print_results(results: dict, timings: dict, skipped: list[str]) -> None:
    if skipped and not timings:
        print("\n=== surpipe run: nothing to do: every step is unchanged since it finished "
              "(change the config, or delete a step's output, to redo it) ===")
    else:
        print("\n=== surpipe run: finished ===")
    if results["held_out"]:
        print(f"  {results['held_out']}")
    for k in ("grid", "eval_table", "metrics", "loss_curve", "adapter", "store"):
        v = results[k]
        print(f"  {k:<11} {', '.join(v) if isinstance(v, list) else v}")
    print(f"  step times  {json.dumps(timings)}")


def run(cfg: PipelineConfig) -> dict:
    """Run the configured steps in order (each skipped when unchanged); returns the results record."""
    unknown = [s for s in cfg.steps if s not in STEPS]
    if unknown:
        raise SurpipeError(f"unknown steps {unknown}; valid choices: {', '.join(STEPS)}")
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    save(cfg, work / "pipeline_config.json")
    models = work / "models"
    llm, sd, clip = _models(cfg, models)
    shards, store = work / "shards", work / "store.zarr"
    run_dir, gen_dir, eval_dir = work / "train", work / "generate", work / "eval"
    layer = cfg.train_layer if cfg.train_layer is not None else max(cfg.llm_layers)
    steps = _Steps(cfg, work)
    step, stage = steps.step, _stage_fn
    timings, skipped = steps.timings, steps.skipped

    def tiny(_values):
        _tiny(models)

    def pack(values):
        _stage("pack", "PackConfig", {**values, "overwrite": True})

    if cfg.tiny_models:
        step("make_tiny_models", tiny, {"seed": 0}, models / "clip")
    step("pack", pack, {"src": cfg.data, "out": str(shards), **cfg.pack}, shards / "pack_report.json")
    data = str(shards) if "pack" in cfg.steps else cfg.data
    step("extract_llm", stage("extract_llm", "ExtractLLMConfig"), {
        "data": data, "store": str(store), "model": llm, "layers": list(cfg.llm_layers), "quant": "4bit",
        **cfg.extract_llm}, store)
    step("encode_latents", stage("encode_latents", "EncodeLatentsConfig"), {
        "data": data, "store": str(store), "model": sd, "flip": True, **cfg.encode_latents}, store)
    step("train", stage("train", "TrainConfig"), {
        "store": str(store), "model": sd, "out": str(run_dir), "llm_layer": layer, **cfg.train},
        RunFolder(run_dir).adapter / "model.safetensors")
    # generate/eval rewrite their own folder when rerun for a changed config or adapter
    step("generate", stage("generate", "GenerateConfig"), {
        "model": sd, "adapter": str(run_dir), "out": str(gen_dir), "compare": True, "overwrite": True,
        **cfg.generate}, gen_dir)
    step("eval", stage("eval", "EvalConfig"), {
        "model": sd, "adapter": str(run_dir), "clip_model": clip, "out": str(eval_dir), "store": str(store),
        **cfg.eval}, eval_dir / "results.md")

    results = {
        "grid": sorted(str(p) for p in gen_dir.glob("*grid*.png")),
        "eval_table": str(eval_dir / "results.md"),
        "metrics": str(RunFolder(run_dir).metrics),
        "loss_curve": str(RunFolder(run_dir).loss_curve),
        "adapter": str(RunFolder(run_dir).adapter),
        "store": str(store),
        "timings_s": timings,
        "held_out": _held_out_line(run_dir),
    }
    (work / "pipeline_results.json").write_text(json.dumps(results, indent=2))
    _print_results(results, timings, skipped)
    return results


def _held_out_line(run_dir: Path) -> Optional[str]:
    """The training run's last held-out summary (None without a held-out split)."""
    run = RunFolder(run_dir)
    try:
        rows = [json.loads(line) for line in run.metrics.read_text().splitlines() if "val/" in line]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    split = run.recorded_split()
    if split is None:
        return None
    return summary(rows[-1], split.get("count", "?"), first_validation(run.metrics)) if rows else None
