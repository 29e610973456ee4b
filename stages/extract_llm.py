"""``surpipe extract-llm``: stage one, LLM side.

Stores, for each simple prompt of the dataset, the chosen decoder layers' raw outputs (residual
stream before the final norm), pooled over the prompt's tokens, in the store group ``llm/<name>``
(layout: docs/store-format.md, section "llm/<name>"). One forward pass serves every requested layer;
layers above the deepest one are never loaded nor run.

Resumable and data-parallel through ``surpipe.store.blockjob.run_block_job``: a rerun computes only the
blocks not yet done (a SIGKILL loses at most the blocks in flight), a finished group is left alone,
a group written with other settings is refused unless ``overwrite``; under ``torchrun`` /
``accelerate launch`` each rank computes and writes only its own whole blocks.

Example (tiny CPU run on the bundled sample)::

    surpipe make-tiny-models runs/demo/models
    surpipe extract-llm --data data/sample --store runs/demo/store.zarr \\
        --model runs/demo/models/llm --layers 1,3 --quant 4bit
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from surpipe import config as cfgmod
from surpipe.config import opt
from surpipe.stage_one_options import StageOneCommon, option
from surpipe.errors import SurpipeError
from surpipe.store.sharding import default_shard_blocks
from surpipe.logs import get_logger


@dataclass
class ExtractLLMConfig(StageOneCommon):
    data: str = option("data")
    store: str = option("store")
    model: str = opt(help="causal LM (LLaMA, Mistral, Qwen2 ...): local folder or hub id", group="model")
    layers: list[int] = opt(help="0-based decoder layers to store, comma separated (-1 = last); adding layers to "
                            "a group computes only the new ones", group="model", ge=-4096, lt=4096)
    quant: Literal["none", "8bit", "4bit"] = opt("none", help="bitsandbytes quantization: 8bit = LLM.int8, "
                                                 "4bit = NF4", group="model")
    pooling: Literal["mean", "last", "tokens"] = opt("mean", help="pool over the prompt's tokens: mean, last token, "
                                                     "or tokens (every token, ragged, plus the mean)", group="model")
    batch_size: int = opt(16, help="prompts per forward (batches are length-bucketed)", group="running",
                          ge=1, le=65536)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = opt(
        "auto", help="compute dtype of unquantized weights (auto: float32 on CPU, bfloat16/float16 on CUDA)",
        group="model")
    max_tokens: Optional[int] = opt(None, help="truncate prompts to this many tokens [default: the model's limit]",
                                    group="model", ge=1, le=1 << 22)
    device: str = opt("auto", help="auto, cpu, cuda or cuda:<i> (under torchrun: this rank's GPU)", group="running")
    name: Optional[str] = opt(None, help="group llm/<name> [default: model name (+ -8bit/-4bit, -last/-tokens)]",
                              group="output")
    store_dtype: Literal["float16", "float32"] = opt("float16", help="dtype of the stored values", group="output")
    codec: Literal["zstd", "blosc-lz4", "gzip", "none"] = opt("zstd", help="compression of the stored arrays",
                                                              group="output")
    double_quant: bool = opt(True, help="4bit: also quantize the quantization constants", group="model")
    revision: Optional[str] = opt(None, help="hub revision (branch, tag or commit) of --model", group="model")
    trust_remote_code: bool = opt(False, help="run the model repository's own Python code (only if you trust it)",
                                  group="model")
    padding_side: Literal["right", "left"] = opt("right", help="padding side of batches (values change only by "
                                                 "rounding: positions are explicit)", group="running")
    bucket: bool = opt(True, help="sort prompts by length within a block to minimise padding", group="running")


def _validate(cfg: ExtractLLMConfig) -> None:
    from surpipe.config import declared_problems
    from surpipe.llm import sanitize_name

    problems = declared_problems(cfg)  # types and declared ranges, also for configs built in Python
    if not cfg.layers:
        problems.append("layers: give at least one decoder layer index (e.g. --layers 39 or --layers 20,39)")
    from surpipe.devices import device_problem

    if device_problem(cfg.device):
        problems.append(device_problem(cfg.device))
    if cfg.name is not None and cfg.name != sanitize_name(cfg.name):
        problems.append(f"name: {cfg.name!r} is not a valid group name (letters, digits, '.', '_', '-'; "
                        f"e.g. {sanitize_name(cfg.name)!r})")
    if problems:
        raise SurpipeError("invalid extract-llm options:", problems)


log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


def default_name(model: str, quant: str, pooling: str) -> str:
    from surpipe.llm import model_basename

    return model_basename(model) + (f"-{quant}" if quant != "none" else "") + (f"-{pooling}" if pooling != "mean" else "")


def run(cfg: ExtractLLMConfig) -> dict[str, Any]:
    """Extract the configured layers' features into the store; returns a report dict."""
    from surpipe.store.location import apply_store_options

    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    from surpipe import llm as L
    from surpipe.features import LLMFeatures
    from surpipe.hub import check_model_source
    from surpipe.store.blockjob import dist_env, init_distributed
    from surpipe.devices import resolve_device, resolve_dtype
    from surpipe.store.opening import discard_new_store_on_error, open_store
    from surpipe.store.sidecar import config_file

    _validate(cfg)
    check_model_source(cfg.model)
    L.quiet_libraries()
    env = dist_env()
    device = resolve_device(cfg.device, env.local_rank)
    init_distributed(env, device)
    t_start = time.perf_counter()

    # ---- model identity, checked before the (slow) dataset scan and model load ----------------
    mcfg = L.read_config(cfg.model, cfg.revision, cfg.trust_remote_code)
    L.check_causal_lm(mcfg, cfg.model)
    n_layers = L.num_layers_of(mcfg)
    layers = L.resolve_layers(cfg.layers, n_layers)
    tok = L.load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    max_tokens = cfg.max_tokens or L.default_max_tokens(mcfg, tok)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.quant != "none" and not device.startswith("cuda"):
        dtype = "float32"  # bitsandbytes on CPU: fp32 compute (bf16 is several times slower there)
    hidden = int(getattr(mcfg, "hidden_size", 0) or 0)
    if hidden < 1:
        raise SurpipeError(f"{cfg.model}: config has no hidden_size")
    local = L.is_local(cfg.model)
    name = cfg.name or default_name(cfg.model, cfg.quant, cfg.pooling)
    tok_settings = L.tokenizer_settings(tok, max_tokens)
    settings = LLMFeatures.settings(
        layers=layers, pooling=cfg.pooling, hidden_size=hidden, store_dtype=cfg.store_dtype,
        model=os.path.abspath(os.path.expanduser(cfg.model)) if local else cfg.model,
        revision=cfg.revision,
        commit_hash=getattr(mcfg, "_commit_hash", None),
        config_hash=L.config_hash(mcfg),
        weights_fingerprint=L.weights_fingerprint(Path(cfg.model).expanduser()) if local else None,
        quantization=cfg.quant,
        double_quant=cfg.double_quant if cfg.quant == "4bit" else None,
        dtype=dtype,
        num_hidden_layers=n_layers,
        tokenizer=tok_settings,
    )
    settings = json.loads(json.dumps(settings, default=str))
    resolved = dataclasses.replace(cfg, name=name, layers=layers, max_tokens=max_tokens, overwrite=False)
    cfg_path = config_file(cfg.store, "extract-llm", name)
    path = f"llm/{name}"

    # ---- dataset + store ----------------------------------------------------------------------
    ds, store = open_store(cfg.data, cfg.store, block_rows=cfg.block_rows, check_images=cfg.check_images,
                           progress=cfg.progress, is_main=env.is_main, simple_field=cfg.simple_field,
                           complex_field=cfg.complex_field)
    with discard_new_store_on_error(store, env.is_main):
        return _extract(cfg, env, store, path=path, name=name, layers=layers, settings=settings,
                        resolved=resolved, cfg_path=cfg_path, ds=ds, tok=tok, mcfg=mcfg, max_tokens=max_tokens,
                        n_layers=n_layers, hidden=hidden, dtype=dtype, device=device, t_start=t_start)


def added_layers(store, path: str, settings: dict) -> tuple[list[int], list[int]]:
    """(stored layers, layers to add) when group ``path`` exists with settings that differ from
    ``settings`` in ``layers`` only; ([], []) otherwise (absent group, or any other difference,
    which ``check_settings`` then refuses)."""
    from surpipe.features import LLMFeatures

    if not store.has_group(path):
        return [], []
    old = store.group(path).settings
    stored, wanted = LLMFeatures.settings_layers(old), LLMFeatures.settings_layers(settings)
    if not isinstance(stored, list) or stored == wanted or not LLMFeatures.same_but_layers(old, settings):
        return [], []
    return [int(x) for x in stored], sorted(set(wanted) - set(stored))


def _side_store(cfg: ExtractLLMConfig, name: str, extra: list[int]) -> Path:
    """Where layers being added to group llm/<name> are computed before they join it: beside the
    store (``<store>.adding-layers/``), so a zarr reader of the store never meets the scratch folder."""
    from surpipe.store.sidecar import sidecar_dir

    return sidecar_dir(cfg.store, "adding-layers") / f"{name}-L{'_'.join(map(str, extra))}.zarr"


def adopt_arrays(store, path: str, src, settings: dict, note: dict | None = None):
    """Move the arrays of complete group ``src`` (of a side store made from the same rows) into
    complete group ``path`` of ``store``, then record ``settings`` (one metadata write, after the
    moves). Arrays already moved are left alone, so an interrupted call can simply be repeated.
    The caller holds the group's lock exclusively."""
    import datetime as _dt

    from surpipe.store import settings_hash

    dst = store.group(path)
    if (src.store.num_samples, src.store.block_rows, src.store.fingerprint) != \
            (store.num_samples, store.block_rows, store.fingerprint):
        raise SurpipeError(f"{src.store.path} does not have the rows of {store.path}; cannot adopt its arrays")
    src.require_complete()
    dst.require_complete()
    names = [a for a in src.array_names if a not in dst.array_names]
    for top in sorted({a.split("/")[0] for a in names}):
        if getattr(store, "remote", False):
            # object storage has no rename: every object copied, then the source deleted (a rerun after
            # a kill copies again what is still at the source)
            source, target = src.store.path / src.path / top, store.path / path / top
            objs = source.fs.find(source.path) if source.exists() else []
            for o in objs:
                source.fs.copy(o, target.path + o[len(source.path):])
            if objs:
                source.rmtree()
            continue
        target = Path(store.path) / path / top
        if not target.exists():
            os.replace(Path(src.store.path) / src.path / top, target)  # moves a whole array folder
    attrs = dst.attrs
    settings = json.loads(json.dumps(dict(settings), default=str))
    prov = dict(attrs.get("provenance") or {})
    prov["added"] = list(prov.get("added", [])) + [
        {**dict(note or {}), "arrays": names, "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}]
    update = {"settings": settings, "settings_hash": settings_hash(settings),
              "arrays": list(attrs.get("arrays", [])) + names, "provenance": prov}
    specs, src_specs = attrs.get("array_specs"), src.attrs.get("array_specs")
    if isinstance(specs, dict) and isinstance(src_specs, dict):  # layout recorded at creation (format 2)
        update["array_specs"] = {**specs, **{a: src_specs[a] for a in names if a in src_specs}}
    store.root[path].update_attributes(update)
    return store.group(path)


def _stored_capacity(store, path: str, lengths: np.ndarray, cap: int, offsets: np.ndarray) -> tuple[int, np.ndarray]:
    """The per-token layout of an existing group keeps the capacity it was created with (its done
    blocks' offsets depend on it): differs from ``cap`` only after the store grew. New rows that
    need more room than it has are refused."""
    if not store.has_group(path):
        return cap, offsets
    from surpipe.features import LLMFeatures

    g = store.root[path]
    names = [LLMFeatures.tokens(layer) for layer in LLMFeatures.settings_layers(store.group(path).settings) or []]
    stored = next((int(g[a].attrs["block_capacity"]) for a in names
                   if a in g and g[a].attrs.get("block_capacity")), None)
    if stored is None or stored == cap:
        return cap, offsets
    if cap > stored:
        need = [b for b in range(store.num_blocks) if int(lengths[slice(*store.block_range(b))].sum()) > stored]
        raise SurpipeError(f"store {store.path}: group {path} holds at most {stored} token rows per block (set when it "
                           f"was created); block {need[0]} of the grown store needs {cap}. Rerun with --overwrite "
                           "(recomputes every row) or choose another --name")
    blocks = np.arange(len(offsets)) // store.block_rows
    return stored, offsets + blocks * (stored - cap)


def _extract(cfg, env, store, *, path, name, layers, settings, resolved, cfg_path, ds, tok, mcfg, max_tokens,
             n_layers, hidden, dtype, device, t_start) -> dict[str, Any]:
    from surpipe import llm as L
    from surpipe.features import LLMFeatures
    from surpipe.store.blockjob import barrier, run_block_job
    from surpipe.store.locks import group_lock
    from surpipe.store import FeatureStore

    report: dict[str, Any] = {"group": path, "store": str(cfg.store), "rows": store.num_samples,
                              "layers": layers, "device": device, "world_size": env.world_size,
                              "config_file": str(cfg_path)}
    stored, extra = ([], []) if cfg.overwrite else added_layers(store, path, settings)
    # Layers added to an existing group: the group keeps its settings (stored layers) until the new
    # layers are complete; the stored layers are never recomputed.
    base_layers = stored or layers
    base_settings = LLMFeatures.with_layers(settings, base_layers)
    all_layers = sorted(set(base_layers) | set(extra))
    if stored:
        resolved = dataclasses.replace(resolved, layers=all_layers)
        report["layers"] = all_layers
        requested_stored = sorted(set(layers) & set(stored))
        log.info(f"{path}: holds layers {stored}; "
                + (f"adding layers {extra} (stored layers are not recomputed)" if extra else
                   f"requested layers {requested_stored} are already stored"))
    if not cfg.overwrite:
        store.check_settings("llm", name, base_settings)
        if store.has_group(path) and store.group(path).is_complete() and not extra:
            log.info(f"{path}: nothing to do, all {store.num_blocks} blocks are already done "
                    f"({store.num_samples} prompts, layers {base_layers})")
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
        log.info(f"{n_trunc} prompts are longer than {max_tokens} tokens and were truncated "
                f"(longest {int(full_lengths.max())}); --max-tokens changes the limit")

    offsets = None
    cap = 0
    if cfg.pooling == "tokens":
        cap, offsets = LLMFeatures.token_layout(lengths, store)
        if not cfg.overwrite:
            cap, offsets = _stored_capacity(store, path, lengths, cap, offsets)
    arrays = LLMFeatures.arrays(base_settings, cfg.codec, tokens_capacity=cap or None)

    # ---- model ---------------------------------------------------------------------------------
    if env.is_main:
        cfgmod.save(resolved, cfg_path)  # saved before the work, so an interrupted run repeats with --config
    log.info(f"loading {cfg.model} (layers 0..{all_layers[-1]} of {n_layers}, quant {cfg.quant}, {dtype}, {device}) ...")
    t_load = time.perf_counter()
    llm = L.load_llm(cfg.model, all_layers, quant=cfg.quant, dtype=cfg.dtype, device=device, revision=cfg.revision,
                     trust_remote_code=cfg.trust_remote_code, double_quant=cfg.double_quant, config=mcfg,
                     tokenizer=tok)
    load_s = time.perf_counter() - t_load
    if cfg.quant == "4bit" and not device.startswith("cuda"):
        L.check_cpu_nf4_shapes(llm.model, cfg.model)
    counters = {"tok": 0, "prompts": 0, "padded": 0}

    def on_batch(n_prompts: int, n_tokens: int) -> None:
        counters["prompts"] += n_prompts
        counters["tok"] += n_tokens

    def block_fn(lays, with_counts: bool):
        def compute_block(start: int, stop: int) -> dict[str, np.ndarray]:
            ex = L.extract(llm, token_ids[start:stop], lays, pooling=cfg.pooling, batch_size=cfg.batch_size,
                           padding_side=cfg.padding_side, bucket=cfg.bucket, on_batch=on_batch)
            counters["padded"] += ex.padded_tokens
            toks = cfg.pooling == "tokens"
            return LLMFeatures.block(
                {Lx: ex.pooled[Lx] for Lx in lays},
                tokens={Lx: np.concatenate(ex.tokens[Lx]) if ex.tokens[Lx] else np.zeros((0, hidden), np.float32)
                        for Lx in lays} if toks else None,
                token_counts=lengths[start:stop].astype(np.int32) if with_counts else None,
                token_offsets=offsets[start:stop] if with_counts and toks else None)
        return compute_block

    def provenance(lays) -> dict:
        return {
            "model": cfg.model, "revision": cfg.revision, "commit_hash": settings["commit_hash"],
            "config_hash": settings["config_hash"], "quantization": cfg.quant, "dtype": dtype,
            "pooling": cfg.pooling, "layers": lays, "hidden_size": hidden, "num_hidden_layers": n_layers,
            "tokenizer": settings["tokenizer"], "device": device, "world_size": env.world_size,
            "batch_size": cfg.batch_size, "padding_side": cfg.padding_side, "bucket": cfg.bucket,
            "tokens_block_capacity": cap or None, **{f"model_{k}": v for k, v in llm.info.items()},
        }

    log.info(f"{path}: {store.num_samples} prompts, layers {all_layers} of {n_layers}, H={hidden}, pooling {cfg.pooling}, "
            f"{cfg.store_dtype} stored (model loaded in {load_s:.1f} s)")

    # added layers are built in a side store and moved into the group: the same shard layout
    shards = (store.group(path).shard_blocks if store.has_group(path) and not cfg.overwrite else
              default_shard_blocks(cfg.store, cfg.shard_blocks))

    def job(target, lays, sets, arrs, with_counts, desc):
        try:
            return run_block_job(store=target, kind="llm", name=name, settings=sets, arrays=arrs,
                                 provenance=provenance(lays), overwrite=cfg.overwrite and target is store, env=env,
                                 compute_block=block_fn(lays, with_counts), unit="prompt", desc=desc,
                                 stats=lambda: {"tok": counters["tok"]}, progress=cfg.progress,
                                 shard_blocks=shards)
        except SurpipeError as e:
            if "overflows" in str(e):
                raise SurpipeError(f"{e}\n  (this group was started as {cfg.store_dtype}: rerun with "
                                   "--store-dtype float32 --overwrite, or use another --name)") from None
            raise

    res = job(store, base_layers, base_settings, arrays, True, path)
    rows_now, secs_total = res.rows_done_now, res.seconds
    if extra:
        # The added layers are computed into a side store with the same rows (same resumable block
        # machinery), then their arrays are moved into the group and its settings list them.
        side_path = _side_store(cfg, name, extra)
        side = FeatureStore.create_or_open(side_path, ds, store.block_rows, grow=True)  # grows with the store
        side_settings = LLMFeatures.with_layers(settings, extra)
        res2 = job(side, extra, side_settings,
                   LLMFeatures.arrays(side_settings, cfg.codec, tokens_capacity=cap or None, row_arrays=False),
                   False, f"{path} (adding layers {extra})")
        rows_now += res2.rows_done_now
        secs_total += res2.seconds
        if env.is_main:
            with group_lock(store.path, path, exclusive=True, wait_s=30.0):  # nobody writes it meanwhile
                adopt_arrays(store, path, side.group(f"llm/{name}"), LLMFeatures.with_layers(settings, all_layers),
                             note={"layers": extra, "by": "extract-llm --layers"})
            import re
            import shutil

            from surpipe.store.sidecar import remove_sidecars

            # this side store, and those of earlier attempts at other layer sets for this group
            mine = re.compile(re.escape(name) + r"-L\d+(_\d+)*\.zarr")
            for p in [side_path, *(q for q in side_path.parent.glob("*.zarr") if mine.fullmatch(q.name))]:
                if hasattr(p, "rmtree"):  # on object storage
                    p.rmtree()
                else:
                    shutil.rmtree(p, ignore_errors=True)
                remove_sidecars(p)  # its lock folder
            with contextlib.suppress(OSError, AttributeError):  # (object storage has no folders to remove)
                side_path.parent.rmdir()
            log.info(f"{path}: layers {extra} added; it now holds layers {all_layers}")
        barrier(env)
        res = dataclasses.replace(res, already_complete=False)
    if res.already_complete:
        log.info(f"{path}: nothing to do, all {store.num_blocks} blocks are already done")
    secs = max(secs_total, 1e-9)
    waste = (counters["padded"] - counters["tok"]) / counters["padded"] if counters["padded"] else 0.0
    report.update(
        already_complete=res.already_complete, prompts_done_now=rows_now,
        tokens_done_now=counters["tok"], seconds=round(secs_total, 2), load_seconds=round(load_s, 2),
        prompts_per_s=round(rows_now / secs, 2), tokens_per_s=round(counters["tok"] / secs, 1),
        padding_waste=round(waste, 4), truncated_prompts=n_trunc, max_tokens=max_tokens,
        tokens_block_capacity=cap or None, layers_added=extra or None,
    )
    if env.world_size > 1:
        report["rank"] = env.rank
    if env.is_main and not res.already_complete:
        g = store.root[path]
        g.attrs.update({"config": cfgmod.to_dict(resolved), "report": report})
        log.info(f"extract-llm {path}: {rows_now} prompts, {counters['tok']} tokens in "
                 f"{secs_total:.1f} s ({report['prompts_per_s']} prompts/s, {report['tokens_per_s']} tok/s, "
                 f"padding {100 * waste:.1f}%"
                 f"{', this rank of ' + str(env.world_size) if env.world_size > 1 else ''}); "
                 f"repeat with --config {cfg_path}")
    barrier(env)
    return report
