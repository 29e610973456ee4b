"""``surpipe import-prompt2vec``: import the SUR-adapter authors' LLM features.

The authors stored their LLaMA features as one ``.pt`` file, ``{simple prompt: fp16 tensor [H]}``
(the mean over the prompt's tokens of one decoder layer's raw output). This command writes them
as ``llm/<name>/layer_<L>/pooled`` [N, H] of an existing store, row-aligned with the store's keys
by the store's simple prompts, so ``surpipe train --llm-group llm/<name> --llm-layer L`` can use them.

Matching: a store row takes the vector of its exact simple prompt; failing that, of the same prompt
with surrounding whitespace stripped and inner runs of whitespace collapsed (when that is unique in
the file). Rows with no vector get zeros and ``matched[i] = false``; they are counted and shown, and
``strict`` refuses the import instead. File prompts that no store row uses are reported too.
The file is read with ``torch.load(weights_only=True)``: no code in it is executed.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.safeload import file_sha256, load_torch_file


@dataclass
class ImportPrompt2VecConfig:
    file: str  # the authors' .pt: {simple prompt: tensor [H]}
    store: str  # an existing feature store (its keys and simple prompts fix the rows)
    layer: int  # decoder layer the file holds (the file does not say; authors' 13B release: 39)
    name: str = "prompt2vec"  # group llm/<name>
    model: Optional[str] = None  # the LLM the file came from (provenance only)
    store_dtype: Literal["float16", "float32"] = "float16"
    codec: Literal["zstd", "blosc-lz4", "gzip", "none"] = "zstd"
    strict: bool = False  # refuse when a store row has no vector
    overwrite: bool = False
    progress: bool = True


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def load_prompt2vec(path: str | Path) -> dict[str, np.ndarray]:
    """Read the authors' ``{prompt: tensor [H]}`` file safely; float32 numpy vectors."""
    import torch

    p = Path(path)
    obj = load_torch_file(p, "prompt2vec file")
    if not isinstance(obj, dict) or not obj:
        raise SurpipeError(f"{p} does not hold a non-empty {{prompt: tensor}} dict (got {type(obj).__name__})")
    out: dict[str, np.ndarray] = {}
    H = None
    for k, v in obj.items():
        if not isinstance(k, str):
            raise SurpipeError(f"{p}: keys must be prompt strings, found {type(k).__name__} {k!r}")
        if not isinstance(v, torch.Tensor):
            raise SurpipeError(f"{p}: value of {k[:60]!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().reshape(-1) if v.dim() == 2 and 1 in v.shape else v.detach()
        if v.dim() != 1:
            raise SurpipeError(f"{p}: value of {k[:60]!r} has shape {tuple(v.shape)}; expected one vector [H]")
        if H is None:
            H = v.shape[0]
        elif v.shape[0] != H:
            raise SurpipeError(f"{p}: vectors differ in size ({H} and {v.shape[0]} for {k[:60]!r})")
        out[k] = v.float().numpy()
    return out


def run(cfg: ImportPrompt2VecConfig) -> dict[str, Any]:
    from surpipe import config as cfgmod
    from surpipe.llm import sanitize_name
    from surpipe.parallel import DistEnv, run_block_job
    from surpipe.store import ArraySpec, FeatureStore

    if cfg.name != sanitize_name(cfg.name):
        raise SurpipeError(f"name: {cfg.name!r} is not a valid group name (e.g. {sanitize_name(cfg.name)!r})")
    if cfg.layer < 0:
        raise SurpipeError(f"layer: {cfg.layer} must be the 0-based index of the decoder layer the file holds")
    t0 = time.perf_counter()
    store = FeatureStore(cfg.store, mode="a")
    src = Path(cfg.file)
    vecs = load_prompt2vec(src)
    H = len(next(iter(vecs.values())))
    prompts = [str(x) for x in store.prompts("simple")]
    keys = [str(k) for k in store.keys()]

    normed: dict[str, list[str]] = {}
    for k in vecs:
        normed.setdefault(_norm(k), []).append(k)
    rows = np.zeros(len(prompts), dtype=np.int64) - 1
    file_keys = list(vecs)
    index = {k: i for i, k in enumerate(file_keys)}
    used = np.zeros(len(file_keys), dtype=bool)
    by_norm = 0
    for i, pr in enumerate(prompts):
        j = index.get(pr)
        if j is None:
            cands = normed.get(_norm(pr), [])
            if len(cands) == 1:
                j = index[cands[0]]
                by_norm += 1
        if j is not None:
            rows[i] = j
            used[j] = True
    missing = np.flatnonzero(rows < 0)
    unused = [file_keys[j] for j in np.flatnonzero(~used)]
    report: dict[str, Any] = {
        "group": f"llm/{cfg.name}", "rows": len(prompts), "file_prompts": len(vecs), "hidden_size": H,
        "matched_rows": int(len(prompts) - len(missing)), "matched_after_whitespace_normalisation": by_norm,
        "unmatched_rows": int(len(missing)), "unused_file_prompts": len(unused),
        "unmatched_examples": [{"key": keys[i], "prompt": prompts[i]} for i in missing[:10]],
        "unused_examples": unused[:10],
    }

    def show(msg: str) -> None:
        print(f"surpipe: {msg}", file=sys.stderr, flush=True)

    lines = [f"{src.name}: {len(vecs)} prompts, H={H}; {report['matched_rows']}/{len(prompts)} store rows matched"
             + (f" ({by_norm} after whitespace normalisation)" if by_norm else "")]
    if len(missing):
        lines.append(f"{len(missing)} store rows have no vector in the file, e.g. "
                     + "; ".join(f"{keys[i]}: {prompts[i][:70]!r}" for i in missing[:5]))
    if unused:
        lines.append(f"{len(unused)} file prompts match no store row, e.g. " + "; ".join(repr(u[:70]) for u in unused[:5]))
    show("\n  ".join(lines))
    if len(missing) and cfg.strict:
        raise SurpipeError(f"{len(missing)} of {len(prompts)} store rows have no vector in {src} (--strict); "
                           "drop --strict to import with zeros and matched=false for them")
    if len(missing) == len(prompts):
        raise SurpipeError(f"no store row's simple prompt is in {src}: is this the file for this dataset?")

    mat = np.stack([vecs[k] for k in file_keys])
    settings = {"source": "prompt2vec", "file_sha256": file_sha256(src), "layer": cfg.layer, "pooling": "mean",
                "output": "decoder layer output (residual stream, before the final norm)", "hidden_size": H,
                "store_dtype": cfg.store_dtype, "matching": "exact, then whitespace-normalised"}
    arrays = {f"layer_{cfg.layer}/pooled": ArraySpec((H,), cfg.store_dtype, cfg.codec),
              "matched": ArraySpec((), "bool", cfg.codec)}
    provenance = {"file": str(src.resolve()), "model": cfg.model, "layer": cfg.layer, "hidden_size": H,
                  "pooling": "mean", "quantization": "unknown (authors' features)", "dtype": "float16 (file)"}

    def block(start: int, stop: int) -> dict[str, np.ndarray]:
        r = rows[start:stop]
        x = np.zeros((stop - start, H), dtype=np.float32)
        ok = r >= 0
        x[ok] = mat[r[ok]]
        return {f"layer_{cfg.layer}/pooled": x, "matched": ok}

    res = run_block_job(store=store, kind="llm", name=cfg.name, settings=settings, arrays=arrays,
                        provenance=provenance, overwrite=cfg.overwrite, env=DistEnv(), compute_block=block,
                        unit="row", desc=f"llm/{cfg.name}", progress=cfg.progress)
    report.update(already_complete=res.already_complete, rows_done_now=res.rows_done_now,
                  seconds=round(time.perf_counter() - t0, 2))
    if res.already_complete:
        show(f"llm/{cfg.name}: nothing to do, already imported")
    else:
        store.root[f"llm/{cfg.name}"].attrs.update({"config": cfgmod.to_dict(cfg), "report": report})
        cfgmod.save(dataclasses.replace(cfg, overwrite=False), Path(cfg.store) / "configs" / f"import-prompt2vec-{cfg.name}.json")
        show(f"imported {src.name} into llm/{cfg.name}/layer_{cfg.layer}/pooled [{len(prompts)}, {H}] "
             f"in {report['seconds']} s")
    return report
