"""``surpipe extract-llm``: stage one, LLM side.

Stores, for each simple prompt of the dataset, the chosen decoder layers' raw outputs (residual
stream before the final norm), pooled over the prompt's tokens, in the store group ``llm/<name>``
(layout: docs/store-format.md, section "llm/<name>"). One forward pass serves every requested layer;
layers above the deepest one are never loaded nor run.

The work is ``surpipe.llm.group``'s. Resumable and data-parallel through ``surpipe.store.blockjob.run_block_job``: a rerun computes only the
blocks not yet done (a SIGKILL loses at most the blocks in flight), a finished group is left alone,
a group written with other settings is refused unless ``overwrite``; under ``torchrun`` /
``accelerate launch`` each rank computes and writes only its own whole blocks.

Example (tiny CPU run on the bundled sample)::

    surpipe make-tiny-models runs/demo/models
    surpipe extract-llm --data data/sample --store runs/demo/store.zarr \\
        --model runs/demo/models/llm --layers 1,3 --quant 4bit
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

from surpipe import llm as L
from surpipe.config import opt
from surpipe.devices import device_problem, resolve_device
from surpipe.hub import check_model_source
from surpipe.llm.group import plan, write_group
from surpipe.options import StageOneCommon, option
from surpipe.store.blockjob import dist_env, init_distributed
from surpipe.store.location import apply_store_options
from surpipe.store.opening import discard_new_store_on_error, open_store


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

    def problems(self) -> list[str]:
        """Declared types and ranges, then layers, device and group name."""
        problems = super().problems()
        if not self.layers:
            problems.append("layers: give at least one decoder layer index (e.g. --layers 39 or --layers 20,39)")
        if device_problem(self.device):
            problems.append(device_problem(self.device))
        if self.name is not None and self.name != L.sanitize_name(self.name):
            problems.append(f"name: {self.name!r} is not a valid group name (letters, digits, '.', '_', '-'; "
                            f"e.g. {L.sanitize_name(self.name)!r})")
        return problems


def run(cfg: ExtractLLMConfig) -> dict[str, Any]:
    """Extract the configured layers' features into the store; returns a report dict."""
    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    cfg.raise_problems("invalid extract-llm options:")
    check_model_source(cfg.model)
    L.quiet_libraries()
    env = dist_env()
    device = resolve_device(cfg.device, env.local_rank)
    init_distributed(env, device)
    t_start = time.perf_counter()
    p = plan(cfg, device)  # the model's identity, checked before the (slow) dataset scan and model load
    ds, store = open_store(cfg.data, cfg.store, block_rows=cfg.block_rows, check_images=cfg.check_images,
                           progress=cfg.progress, is_main=env.is_main, simple_field=cfg.simple_field,
                           complex_field=cfg.complex_field)
    with discard_new_store_on_error(store, env.is_main):
        return write_group(cfg, env, store, ds, p, device, t_start)
