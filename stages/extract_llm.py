"""``surpipe extract-llm``: stage one, LLM side.

Stores, for each simple prompt of the dataset, the chosen decoder layers' raw outputs (residual
stream before the final norm), pooled over the prompt's tokens, in the store group ``llm/<name>``
(layout: docs/store-format.md, section "llm/<name>"). One forward pass serves every requested layer;
layers above the deepest one are never loaded nor run.

Resumable and data-parallel through ``surpipe.parallel.run_block_job``: a rerun computes only the
blocks not yet done (a SIGKILL loses at most the blocks in flight), a finished group is left alone,
a group written with other settings is refused unless ``overwrite``; under ``torchrun`` /
``accelerate launch`` each rank computes and writes only its own whole blocks.

Example (tiny CPU run on the bundled sample)::

    surpipe make-tiny-models runs/demo/models
    surpipe extract-llm --data data/sample --store runs/demo/store.zarr \\
        --model runs/demo/models/llm --layers 1,3 --quant 4bit
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from surpipe import config as cfgmod
from surpipe.errors import SurpipeError


@dataclass
class ExtractLLMConfig:
    data: str  # SURD imagefolder, folder of .tar shards, or brace pattern
    store: str  # feature store (Zarr) to create or extend
    model: str  # causal LM: hub id or local folder
    layers: list[int]  # 0-based decoder layer indices; negative count from the end (-1 = last)
    quant: Literal["none", "8bit", "4bit"] = "none"  # bitsandbytes: 8bit = LLM.int8, 4bit = NF4
    pooling: Literal["mean", "last", "tokens"] = "mean"  # tokens: every token (ragged) + the mean
    batch_size: int = 16  # prompts per forward (batches are length-bucketed)
    # Compute dtype of unquantized weights: auto = float32 on CPU, bfloat16 (else float16) on CUDA.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_tokens: Optional[int] = None  # truncate prompts to this many tokens [default: the model's limit]
    device: str = "auto"  # auto | cpu | cuda | cuda:i (under torchrun: this rank's GPU)
    name: Optional[str] = None  # group llm/<name> [default: model name (+ -8bit/-4bit, -last/-tokens)]
    store_dtype: Literal["float16", "float32"] = "float16"
    codec: Literal["zstd", "blosc-lz4", "gzip", "none"] = "zstd"
    double_quant: bool = True  # 4bit: also quantize the quantization constants
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False
    block_rows: Optional[int] = None  # rows per block when the store is created [default: 256]
    padding_side: Literal["right", "left"] = "right"  # values do not depend on it (positions are explicit)
    bucket: bool = True  # sort prompts by length within a block to minimise padding
    # Image check when opening the dataset: auto = full decode when this run creates the store (its
    # rows are fixed then, and encode-latents must be able to decode every one), header check (then
    # full if the row sets differ) for an existing store.
    check_images: Literal["auto", "full", "header", "none"] = "auto"
    overwrite: bool = False
    progress: bool = True


def _validate(cfg: ExtractLLMConfig) -> None:
    from surpipe.llm import sanitize_name

    problems = []
    if not cfg.layers:
        problems.append("layers: give at least one decoder layer index (e.g. --layers 39 or --layers 20,39)")
    if cfg.batch_size < 1:
        problems.append(f"batch_size: must be >= 1, got {cfg.batch_size}")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        problems.append(f"max_tokens: must be >= 1, got {cfg.max_tokens}")
    if cfg.block_rows is not None and cfg.block_rows < 1:
        problems.append(f"block_rows: must be >= 1, got {cfg.block_rows}")
    from surpipe.parallel import device_problem

    if device_problem(cfg.device):
        problems.append(device_problem(cfg.device))
    if cfg.name is not None and cfg.name != sanitize_name(cfg.name):
        problems.append(f"name: {cfg.name!r} is not a valid group name (letters, digits, '.', '_', '-'; "
                        f"e.g. {sanitize_name(cfg.name)!r})")
    if problems:
        raise SurpipeError("invalid extract-llm options:", problems)


def _log(msg: str, env) -> None:
    if env.is_main:
        print(f"surpipe: {msg}", file=sys.stderr, flush=True)


from surpipe.parallel import open_store  # noqa: E402  (shared with the other stage-one command)


def default_name(model: str, quant: str, pooling: str) -> str:
    from surpipe.llm import model_basename

    return model_basename(model) + (f"-{quant}" if quant != "none" else "") + (f"-{pooling}" if pooling != "mean" else "")


def token_layout(lengths: np.ndarray, store) -> tuple[int, np.ndarray]:
    """Block-ragged layout of per-token rows: (capacity C, offsets [N] int64). Block b owns flat rows
    [b*C, (b+1)*C); row i's tokens are flat rows offsets[i] .. offsets[i] + lengths[i]."""
    offsets = np.zeros(len(lengths), dtype=np.int64)
    cap = 1
    for b in range(store.num_blocks):
        s, e = store.block_range(b)
        ls = lengths[s:e].astype(np.int64)
        cap = max(cap, int(ls.sum()))
    for b in range(store.num_blocks):
        s, e = store.block_range(b)
        ls = lengths[s:e].astype(np.int64)
        offsets[s:e] = b * cap + np.concatenate([[0], np.cumsum(ls)[:-1]])
    return cap, offsets


def run(cfg: ExtractLLMConfig) -> dict[str, Any]:
    """Extract the configured layers' features into the store; returns a report dict."""
    from surpipe import llm as L
    from surpipe.parallel import barrier, dist_env, init_distributed, resolve_device, run_block_job
    from surpipe.store import ArraySpec

    _validate(cfg)
    L.quiet_libraries()
    env = dist_env()
    device = resolve_device(cfg.device, env)
    init_distributed(env, device)
    t_start = time.perf_counter()

    # ---- model identity, checked before the (slow) dataset scan and model load ----------------
    mcfg = L.read_config(cfg.model, cfg.revision, cfg.trust_remote_code)
    L.check_causal_lm(mcfg, cfg.model)
    n_layers = L.num_layers_of(mcfg)
    layers = L.resolve_layers(cfg.layers, n_layers)
    tok = L.load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    max_tokens = cfg.max_tokens or L.default_max_tokens(mcfg, tok)
    dtype = L.resolve_dtype(cfg.dtype, device)
    if cfg.quant != "none" and not device.startswith("cuda"):
        dtype = "float32"  # bitsandbytes on CPU: fp32 compute (bf16 is several times slower there)
    hidden = int(getattr(mcfg, "hidden_size", 0) or 0)
    if hidden < 1:
        raise SurpipeError(f"{cfg.model}: config has no hidden_size")
    local = L.is_local(cfg.model)
    name = cfg.name or default_name(cfg.model, cfg.quant, cfg.pooling)
    tok_settings = L.tokenizer_settings(tok, max_tokens)
    settings = {
        "model": os.path.abspath(os.path.expanduser(cfg.model)) if local else cfg.model,
        "revision": cfg.revision,
        "commit_hash": getattr(mcfg, "_commit_hash", None),
        "config_hash": L.config_hash(mcfg),
        "weights_fingerprint": L.weights_fingerprint(Path(cfg.model).expanduser()) if local else None,
        "layers": layers,
        "output": "decoder layer output (residual stream, before the final norm)",
        "pooling": cfg.pooling,
        "quantization": cfg.quant,
        "double_quant": cfg.double_quant if cfg.quant == "4bit" else None,
        "dtype": dtype,
        "store_dtype": cfg.store_dtype,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "tokenizer": tok_settings,
    }
    settings = json.loads(json.dumps(settings, default=str))
    resolved = dataclasses.replace(cfg, name=name, layers=layers, max_tokens=max_tokens, overwrite=False)
    cfg_path = Path(cfg.store) / "configs" / f"extract-llm-{name}.json"
    path = f"llm/{name}"

    # ---- dataset + store ----------------------------------------------------------------------
    ds, store = open_store(cfg.data, cfg.store, cfg.block_rows, cfg.check_images, cfg.progress, env)
    report: dict[str, Any] = {"group": path, "store": str(cfg.store), "rows": store.num_samples,
                              "layers": layers, "device": device, "world_size": env.world_size,
                              "config_file": str(cfg_path)}
    if not cfg.overwrite:
        store.check_settings("llm", name, settings)
        if store.has_group(path) and store.group(path).is_complete():
            _log(f"{path}: nothing to do, all {store.num_blocks} blocks are already done "
                 f"({store.num_samples} prompts, layers {layers})", env)
            report.update(already_complete=True, prompts_done_now=0, seconds=round(time.perf_counter() - t_start, 2))
            return report

    # ---- tokens (before any model work: lengths fix the per-token layout) ----------------------
    prompts = [str(p) for p in store.prompts("simple")]
    token_ids = L.tokenize(tok, prompts, max_tokens)
    lengths = np.array([len(t) for t in token_ids], dtype=np.int32)
    full_lengths = np.array([len(x) for x in tok(prompts, add_special_tokens=True)["input_ids"]], dtype=np.int64) \
        if int(lengths.max()) >= max_tokens else lengths
    n_trunc = int((full_lengths > max_tokens).sum())
    if n_trunc:
        _log(f"{n_trunc} prompts are longer than {max_tokens} tokens and were truncated "
             f"(longest {int(full_lengths.max())}); --max-tokens changes the limit", env)

    arrays: dict[str, ArraySpec] = {f"layer_{Lx}/pooled": ArraySpec((hidden,), cfg.store_dtype, cfg.codec)
                                    for Lx in layers}
    arrays["token_counts"] = ArraySpec((), "int32", cfg.codec)
    offsets = None
    cap = 0
    if cfg.pooling == "tokens":
        cap, offsets = token_layout(lengths, store)
        arrays["token_offsets"] = ArraySpec((), "int64", cfg.codec)
        for Lx in layers:
            arrays[f"layer_{Lx}/tokens"] = ArraySpec((hidden,), cfg.store_dtype, cfg.codec, block_capacity=cap)

    # ---- model ---------------------------------------------------------------------------------
    if env.is_main:
        cfgmod.save(resolved, cfg_path)  # saved before the work, so an interrupted run repeats with --config
    _log(f"loading {cfg.model} (layers 0..{layers[-1]} of {n_layers}, quant {cfg.quant}, {dtype}, {device}) ...", env)
    t_load = time.perf_counter()
    llm = L.load_llm(cfg.model, layers, quant=cfg.quant, dtype=cfg.dtype, device=device, revision=cfg.revision,
                     trust_remote_code=cfg.trust_remote_code, double_quant=cfg.double_quant, config=mcfg,
                     tokenizer=tok)
    load_s = time.perf_counter() - t_load
    if cfg.quant == "4bit" and not device.startswith("cuda"):
        L.check_cpu_nf4_shapes(llm.model, cfg.model)
    counters = {"tok": 0, "prompts": 0, "padded": 0}

    def on_batch(n_prompts: int, n_tokens: int) -> None:
        counters["prompts"] += n_prompts
        counters["tok"] += n_tokens

    def compute_block(start: int, stop: int) -> dict[str, np.ndarray]:
        ex = L.extract(llm, token_ids[start:stop], layers, pooling=cfg.pooling, batch_size=cfg.batch_size,
                       padding_side=cfg.padding_side, bucket=cfg.bucket, on_batch=on_batch)
        counters["padded"] += ex.padded_tokens
        out: dict[str, np.ndarray] = {f"layer_{Lx}/pooled": ex.pooled[Lx] for Lx in layers}
        out["token_counts"] = lengths[start:stop].astype(np.int32)
        if cfg.pooling == "tokens":
            out["token_offsets"] = offsets[start:stop]
            for Lx in layers:
                out[f"layer_{Lx}/tokens"] = np.concatenate(ex.tokens[Lx]) if ex.tokens[Lx] else \
                    np.zeros((0, hidden), np.float32)
        return out

    provenance = {
        "model": cfg.model, "revision": cfg.revision, "commit_hash": settings["commit_hash"],
        "config_hash": settings["config_hash"], "quantization": cfg.quant, "dtype": dtype,
        "pooling": cfg.pooling, "layers": layers, "hidden_size": hidden, "num_hidden_layers": n_layers,
        "tokenizer": tok_settings, "device": device, "world_size": env.world_size,
        "batch_size": cfg.batch_size, "padding_side": cfg.padding_side, "bucket": cfg.bucket,
        "tokens_block_capacity": cap or None, **{f"model_{k}": v for k, v in llm.info.items()},
    }
    _log(f"{path}: {store.num_samples} prompts, layers {layers} of {n_layers}, H={hidden}, pooling {cfg.pooling}, "
         f"{cfg.store_dtype} stored (model loaded in {load_s:.1f} s)", env)
    try:
        res = run_block_job(store=store, kind="llm", name=name, settings=settings, arrays=arrays,
                            provenance=provenance, overwrite=cfg.overwrite, env=env, compute_block=compute_block,
                            unit="prompt", desc=path, stats=lambda: {"tok": counters["tok"]}, progress=cfg.progress)
    except SurpipeError as e:
        if "overflows" in str(e):
            raise SurpipeError(f"{e}\n  (this group was started as {cfg.store_dtype}: rerun with "
                               "--store-dtype float32 --overwrite, or use another --name)") from None
        raise
    if res.already_complete:
        _log(f"{path}: nothing to do, all {store.num_blocks} blocks are already done", env)
    secs = max(res.seconds, 1e-9)
    waste = (counters["padded"] - counters["tok"]) / counters["padded"] if counters["padded"] else 0.0
    report.update(
        already_complete=res.already_complete, prompts_done_now=res.rows_done_now,
        tokens_done_now=counters["tok"], seconds=round(res.seconds, 2), load_seconds=round(load_s, 2),
        prompts_per_s=round(res.rows_done_now / secs, 2), tokens_per_s=round(counters["tok"] / secs, 1),
        padding_waste=round(waste, 4), truncated_prompts=n_trunc, max_tokens=max_tokens,
        tokens_block_capacity=cap or None,
    )
    if env.world_size > 1:
        report["rank"] = env.rank
    if env.is_main and not res.already_complete:
        g = store.root[path]
        g.attrs.update({"config": cfgmod.to_dict(resolved), "report": report})
        print(f"surpipe: extract-llm {path}: {res.rows_done_now} prompts, {counters['tok']} tokens in "
              f"{res.seconds:.1f} s ({report['prompts_per_s']} prompts/s, {report['tokens_per_s']} tok/s, "
              f"padding {100 * waste:.1f}%"
              f"{', this rank of ' + str(env.world_size) if env.world_size > 1 else ''}); "
              f"repeat with --config {cfg_path}", file=sys.stderr, flush=True)
    barrier(env)
    return report
