"""extract-llm's work: the ``llm/<name>`` group of a store (layout: docs/store-format.md).

:func:`plan` reads the model's config and tokenizer (no weights) and fixes what will be stored:
layers, width, dtype, token limit, the group's name and settings, so a bad model fails before the
dataset scan. :func:`write_group` tokenizes the store's simple prompts, loads the model (truncated
after the deepest layer), and writes every pending block through the resumable block loop
(``surpipe.store.blockjob.run_block_job``); layers added to an existing group are computed apart
and adopted (:mod:`surpipe.llm.add_layers`). The stage (``stages/extract_llm.py``) calls these.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surpipe import config as cfgmod
from surpipe import llm as L  # through the package: tests replace L.load_llm there
from surpipe.devices import resolve_dtype
from surpipe.errors import SurpipeError
from surpipe.features import LLMFeatures, open_group
from surpipe.llm.add_layers import added_layers, adopt_arrays, remove_side_stores, side_store, stored_capacity
from surpipe.logs import get_logger
from surpipe.store import FeatureStore
from surpipe.store.blockjob import DistEnv, barrier, run_block_job
from surpipe.store.locks import group_lock
from surpipe.store.sharding import default_shard_blocks
from surpipe.store.sidecar import config_file

log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


def default_name(model: str, quant: str, pooling: str) -> str:
    """The group name extract-llm picks: the model's name, plus -8bit/-4bit and -last/-tokens."""
    return L.model_basename(model) + (f"-{quant}" if quant != "none" else "") + (f"-{pooling}" if pooling != "mean" else "")


@dataclass
class Plan:
    """What extract-llm will store, fixed from the model's config and tokenizer before any weights load."""

    name: str
    path: str  # llm/<name>
    layers: list[int]  # resolved (0-based, sorted)
    n_layers: int  # of the full model
    hidden: int
    dtype: str  # compute dtype of unquantized weights
    max_tokens: int
    tok: Any
    mcfg: Any  # the model's config
    settings: dict
    resolved: Any  # the options as saved for --config (name, layers and max_tokens filled in)
    cfg_path: Path


def plan(cfg, device: str) -> Plan:
    """Read and check ``cfg.model``'s config and tokenizer (``cfg``: the extract-llm options) and fix
    the group's settings; refuses a model that is not a causal LM or has no hidden size."""
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
        tokenizer=L.tokenizer_settings(tok, max_tokens),
    )
    return Plan(name=name, path=f"llm/{name}", layers=layers, n_layers=n_layers, hidden=hidden, dtype=dtype,
                max_tokens=max_tokens, tok=tok, mcfg=mcfg, settings=json.loads(json.dumps(settings, default=str)),
                resolved=dataclasses.replace(cfg, name=name, layers=layers, max_tokens=max_tokens, overwrite=False),
                cfg_path=config_file(cfg.store, "extract-llm", name))


class _GroupWriter:
    """One extract-llm run on one rank: the tokens, the loaded model, the counters and the block jobs."""

    def __init__(self, cfg, env: DistEnv, store, p: Plan, device: str):
        self.cfg, self.env, self.store, self.p, self.device = cfg, env, store, p, device
        self.counters = {"tok": 0, "prompts": 0, "padded": 0}
        self.llm = None
        self.cap, self.offsets = 0, None

    def tokens(self) -> int:
        """Tokenize the store's simple prompts (lengths fix the per-token layout); returns how many
        were truncated (and says so)."""
        tok, max_tokens = self.p.tok, self.p.max_tokens
        prompts = [str(p) for p in self.store.prompts("simple")]
        self.token_ids = L.tokenize(tok, prompts, max_tokens)
        self.lengths = lengths = np.array([len(t) for t in self.token_ids], dtype=np.int32)
        full_lengths = np.array([len(x) for x in tok(prompts, add_special_tokens=True)["input_ids"]],
                                dtype=np.int64) if int(lengths.max()) >= max_tokens else lengths
        n_trunc = int((full_lengths > max_tokens).sum())
        if n_trunc:
            log.info(f"{n_trunc} prompts are longer than {max_tokens} tokens and were truncated "
                     f"(longest {int(full_lengths.max())}); --max-tokens changes the limit")
        if self.cfg.pooling == "tokens":
            self.cap, self.offsets = LLMFeatures.token_layout(lengths, self.store)
            if not self.cfg.overwrite:
                self.cap, self.offsets = stored_capacity(self.store, self.p.path, lengths, self.cap, self.offsets)
        return n_trunc

    def load(self, all_layers: list[int]) -> float:
        """Load the model up to the deepest layer; returns the seconds it took."""
        cfg, p = self.cfg, self.p
        log.info(f"loading {cfg.model} (layers 0..{all_layers[-1]} of {p.n_layers}, quant {cfg.quant}, {p.dtype}, "
                 f"{self.device}) ...")
        t_load = time.perf_counter()
        self.llm = L.load_llm(cfg.model, all_layers, quant=cfg.quant, dtype=cfg.dtype, device=self.device,
                              revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                              double_quant=cfg.double_quant, config=p.mcfg, tokenizer=p.tok)
        load_s = time.perf_counter() - t_load
        if cfg.quant == "4bit" and not self.device.startswith("cuda"):
            L.check_cpu_nf4_shapes(self.llm.model, cfg.model)
        return load_s

    def _on_batch(self, n_prompts: int, n_tokens: int) -> None:
        self.counters["prompts"] += n_prompts
        self.counters["tok"] += n_tokens

    def block_fn(self, lays, with_counts: bool):
        """compute_block(start, stop) of layers ``lays`` (with the row arrays: token counts, offsets)."""
        cfg, hidden = self.cfg, self.p.hidden

        def compute_block(start: int, stop: int) -> dict[str, np.ndarray]:
            ex = L.extract(self.llm, self.token_ids[start:stop], lays, pooling=cfg.pooling, batch_size=cfg.batch_size,
                           padding_side=cfg.padding_side, bucket=cfg.bucket, on_batch=self._on_batch)
            self.counters["padded"] += ex.padded_tokens
            toks = cfg.pooling == "tokens"
            return LLMFeatures.block(
                {Lx: ex.pooled[Lx] for Lx in lays},
                tokens={Lx: np.concatenate(ex.tokens[Lx]) if ex.tokens[Lx] else np.zeros((0, hidden), np.float32)
                        for Lx in lays} if toks else None,
                token_counts=self.lengths[start:stop].astype(np.int32) if with_counts else None,
                token_offsets=self.offsets[start:stop] if with_counts and toks else None)
        return compute_block

    def provenance(self, lays) -> dict:
        """Provenance of a block job computing layers ``lays``."""
        cfg, p, settings = self.cfg, self.p, self.p.settings
        return {
            "model": cfg.model, "revision": cfg.revision, "commit_hash": settings["commit_hash"],
            "config_hash": settings["config_hash"], "quantization": cfg.quant, "dtype": p.dtype,
            "pooling": cfg.pooling, "layers": lays, "hidden_size": p.hidden, "num_hidden_layers": p.n_layers,
            "tokenizer": settings["tokenizer"], "device": self.device, "world_size": self.env.world_size,
            "batch_size": cfg.batch_size, "padding_side": cfg.padding_side, "bucket": cfg.bucket,
            "tokens_block_capacity": self.cap or None, **{f"model_{k}": v for k, v in self.llm.info.items()},
        }

    def job(self, target, lays, sets, arrs, with_counts: bool, desc: str, shards):
        """Run the block loop for layers ``lays`` into store ``target``; an fp16 overflow gets advice."""
        cfg = self.cfg
        try:
            return run_block_job(store=target, kind="llm", name=self.p.name, settings=sets, arrays=arrs,
                                 provenance=self.provenance(lays), overwrite=cfg.overwrite and target is self.store,
                                 env=self.env, compute_block=self.block_fn(lays, with_counts), unit="prompt",
                                 desc=desc, stats=lambda: {"tok": self.counters["tok"]}, progress=cfg.progress,
                                 shard_blocks=shards)
        except SurpipeError as e:
            if "overflows" in str(e):
                raise SurpipeError(f"{e}\n  (this group was started as {cfg.store_dtype}: rerun with "
                                   "--store-dtype float32 --overwrite, or use another --name)") from None
            raise

    def add(self, ds, extra: list[int], all_layers: list[int], shards):
        """Compute the added layers ``extra`` into a side store with the same rows (same resumable
        block machinery), then move their arrays into the group, whose settings then list them."""
        cfg, p, store = self.cfg, self.p, self.store
        side_path = side_store(cfg.store, p.name, extra)
        side = FeatureStore.create_or_open(side_path, ds, store.block_rows, grow=True)  # grows with the store
        side_settings = LLMFeatures.with_layers(p.settings, extra)
        res = self.job(side, extra, side_settings,
                       LLMFeatures.arrays(side_settings, cfg.codec, tokens_capacity=self.cap or None, row_arrays=False),
                       False, f"{p.path} (adding layers {extra})", shards)
        if self.env.is_main:
            with group_lock(store.path, p.path, exclusive=True, wait_s=30.0):  # nobody writes it meanwhile
                adopt_arrays(store, p.path, open_group(side, f"llm/{p.name}"), LLMFeatures.with_layers(p.settings, all_layers),
                             note={"layers": extra, "by": "extract-llm --layers"})
            remove_side_stores(side_path, p.name)
            log.info(f"{p.path}: layers {extra} added; it now holds layers {all_layers}")
        barrier(self.env)
        return res


def _layer_sets(cfg, store, p: Plan, report: dict) -> tuple[list[int], list[int], list[int]]:
    """(layers the group is written with, layers to add, all layers): layers added to an existing
    group leave its settings (stored layers) alone until they are complete; stored layers are never
    recomputed."""
    stored, extra = ([], []) if cfg.overwrite else added_layers(store, p.path, p.settings)
    base_layers = stored or p.layers
    all_layers = sorted(set(base_layers) | set(extra))
    if stored:
        p.resolved = dataclasses.replace(p.resolved, layers=all_layers)
        report["layers"] = all_layers
        requested_stored = sorted(set(p.layers) & set(stored))
        log.info(f"{p.path}: holds layers {stored}; "
                 + (f"adding layers {extra} (stored layers are not recomputed)" if extra else
                    f"requested layers {requested_stored} are already stored"))
    return base_layers, extra, all_layers


def write_group(cfg, env: DistEnv, store, ds, p: Plan, device: str, t_start: float) -> dict[str, Any]:
    """Write (or complete, or add layers to) group ``p.path`` of ``store``; returns the run's report."""
    report: dict[str, Any] = {"group": p.path, "store": str(cfg.store), "rows": store.num_samples,
                              "layers": p.layers, "device": device, "world_size": env.world_size,
                              "config_file": str(p.cfg_path)}
    base_layers, extra, all_layers = _layer_sets(cfg, store, p, report)
    base_settings = LLMFeatures.with_layers(p.settings, base_layers)
    if not cfg.overwrite:
        store.check_settings("llm", p.name, base_settings)
        if store.has_group(p.path) and open_group(store, p.path).is_complete() and not extra:
            log.info(f"{p.path}: nothing to do, all {store.num_blocks} blocks are already done "
                     f"({store.num_samples} prompts, layers {base_layers})")
            report.update(already_complete=True, prompts_done_now=0, seconds=round(time.perf_counter() - t_start, 2))
            return report
    w = _GroupWriter(cfg, env, store, p, device)
    n_trunc = w.tokens()  # before any model work: lengths fix the per-token layout
    arrays = LLMFeatures.arrays(base_settings, cfg.codec, tokens_capacity=w.cap or None)
    if env.is_main:
        cfgmod.save(p.resolved, p.cfg_path)  # saved before the work, so an interrupted run repeats with --config
    load_s = w.load(all_layers)
    log.info(f"{p.path}: {store.num_samples} prompts, layers {all_layers} of {p.n_layers}, H={p.hidden}, "
             f"pooling {cfg.pooling}, {cfg.store_dtype} stored (model loaded in {load_s:.1f} s)")
    # added layers are built in a side store and moved into the group: the same shard layout
    shards = (open_group(store, p.path).shard_blocks if store.has_group(p.path) and not cfg.overwrite else
              default_shard_blocks(cfg.store, cfg.shard_blocks))
    res = w.job(store, base_layers, base_settings, arrays, True, p.path, shards)
    rows_now, secs_total = res.rows_done_now, res.seconds
    if extra:
        res2 = w.add(ds, extra, all_layers, shards)
        rows_now += res2.rows_done_now
        secs_total += res2.seconds
        res = dataclasses.replace(res, already_complete=False)
    if res.already_complete:
        log.info(f"{p.path}: nothing to do, all {store.num_blocks} blocks are already done")
    _finish(cfg, env, store, p, w, report, res.already_complete, rows_now, secs_total, load_s, n_trunc, extra)
    return report


def _finish(cfg, env: DistEnv, store, p: Plan, w: _GroupWriter, report: dict, already_complete: bool,
            rows_now: int, secs_total: float, load_s: float, n_trunc: int, extra: list[int]) -> None:
    """Fill the report (speeds, padding waste), record it with the options in the group, say so."""
    secs = max(secs_total, 1e-9)
    tok, padded = w.counters["tok"], w.counters["padded"]
    waste = (padded - tok) / padded if padded else 0.0
    report.update(
        already_complete=already_complete, prompts_done_now=rows_now,
        tokens_done_now=tok, seconds=round(secs_total, 2), load_seconds=round(load_s, 2),
        prompts_per_s=round(rows_now / secs, 2), tokens_per_s=round(tok / secs, 1),
        padding_waste=round(waste, 4), truncated_prompts=n_trunc, max_tokens=p.max_tokens,
        tokens_block_capacity=w.cap or None, layers_added=extra or None,
    )
    if env.world_size > 1:
        report["rank"] = env.rank
    if env.is_main and not already_complete:
        store.root[p.path].attrs.update({"config": cfgmod.to_dict(p.resolved), "report": report})
        log.info(f"extract-llm {p.path}: {rows_now} prompts, {tok} tokens in "
                 f"{secs_total:.1f} s ({report['prompts_per_s']} prompts/s, {report['tokens_per_s']} tok/s, "
                 f"padding {100 * waste:.1f}%"
                 f"{', this rank of ' + str(env.world_size) if env.world_size > 1 else ''}); "
                 f"repeat with --config {p.cfg_path}")
    barrier(env)
