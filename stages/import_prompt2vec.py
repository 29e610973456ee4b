"""``surpipe import-prompt2vec``: import the SUR-adapter authors' LLM features.

The authors stored their LLaMA features as one ``.pt`` file, ``{simple prompt: fp16 tensor [H]}``
(the mean over the prompt's tokens of one decoder layer's raw output). This command writes them
as ``llm/<name>/layer_<L>/pooled`` [N, H] of an existing store, row-aligned with the store's keys
by the store's simple prompts, so ``surpipe train --llm-group llm/<name> --llm-layer L`` can use them.

Matching: a store row takes the vector of its exact simple prompt; failing that, of the same prompt
with surrounding whitespace stripped and inner runs of whitespace collapsed (when that is unique in
the file). Rows with no vector get zeros and ``matched[i] = false``; they are counted and shown, and
``strict`` refuses the import instead. File prompts that no store row uses are reported too.
Unusable vectors (empty, of another width than most, NaN/Inf, beyond float16 when stored as float16)
are skipped and counted the same way; tensors that are not dense real floating point (sparse,
quantized, complex, integer) make the whole file refused.
The file is read with ``torch.load(weights_only=True)``: no code in it is executed.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from surpipe.config import opt
from surpipe.errors import SurpipeError
from surpipe.logs import get_logger
from surpipe.safeload import file_sha256, load_torch_file, tensor_kind_problem

log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only

FP16_MAX = 65504.0


@dataclass
class ImportPrompt2VecConfig:
    file: str = opt(help="The authors' prompt2vec .pt: {simple prompt: tensor [H]}.", group="data", argument=True)
    store: str = opt(help="Existing feature store; its keys and simple prompts fix the rows.", group="data")
    layer: int = opt(help="Decoder layer the file holds (the file does not say; the authors' 13B release: 39).",
                     group="model", ge=0)
    name: str = opt("prompt2vec", help="Name of the group written: llm/<name>.", group="output")
    model: Optional[str] = opt(None, help="The LLM the file came from (recorded as provenance only).",
                               group="model")
    store_dtype: Literal["float16", "float32"] = opt("float16", help="dtype of the stored vectors.",
                                                     group="output")
    codec: Literal["zstd", "blosc-lz4", "gzip", "none"] = opt("zstd", help="Compression of the stored arrays.",
                                                              group="output")
    strict: bool = opt(False, help="Refuse when a store row has no vector or a file vector is unusable "
                       "(instead of zeros with matched=false, counted).", group="data")
    overwrite: bool = opt(False, help="Replace an existing llm/<name> group written with other settings.",
                          group="output")
    progress: bool = opt(True, help="Show a progress bar.", group="running")
    storage_options: Optional[str] = opt(None, help="JSON object of fsspec options for a --store URL (endpoint_url, "
                                                    "profile, ...; credentials better from the environment).",
                                         group="data")


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def load_prompt2vec(path: str | Path, store_dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read the authors' ``{prompt: tensor [H]}`` file safely: ``(vectors, skipped)``.

    ``vectors``: float32 numpy vectors of the file's width H (the width most vectors have).
    ``skipped``: ``{prompt: reason}`` for unusable vectors (empty, another width, NaN/Inf, beyond
    float16's range when stored as float16), counted by the caller; a file whose structure is wrong
    (not a dict, non-string keys, non-tensors, sparse/quantized/complex/integer tensors, matrices)
    is refused whole.
    """
    import torch

    p = Path(path)
    obj = load_torch_file(p, "prompt2vec file")
    if not isinstance(obj, dict) or not obj:
        raise SurpipeError(f"{p} does not hold a non-empty {{prompt: tensor}} dict (got {type(obj).__name__})")
    flat: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise SurpipeError(f"{p}: keys must be prompt strings, found {type(k).__name__} {k!r}")
        if not isinstance(v, torch.Tensor):
            raise SurpipeError(f"{p}: value of {k[:60]!r} is a {type(v).__name__}, not a tensor")
        why = tensor_kind_problem(v)
        if why:
            raise SurpipeError(f"{p}: value of {k[:60]!r} is {why}; expected dense floating-point vectors")
        v = v.detach().reshape(-1) if v.dim() == 2 and 1 in v.shape else v.detach()
        if v.dim() != 1:
            raise SurpipeError(f"{p}: value of {k[:60]!r} has shape {tuple(v.shape)}; expected one vector [H]")
        flat[k] = v
    widths = Counter(v.shape[0] for v in flat.values() if v.shape[0] > 0)
    if not widths:
        raise SurpipeError(f"{p}: every vector is empty (shape [0])")
    (H, n1), *rest = widths.most_common(2) + [(None, 0)]
    if rest[0][1] == n1:  # no majority width: which vectors are the damaged ones is unclear
        raise SurpipeError(f"{p}: vectors differ in size ({', '.join(f'{c} of size {w}' for w, c in widths.most_common(5))})")
    out: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for k, v in flat.items():
        if v.shape[0] == 0:
            skipped[k] = "empty vector (shape [0])"
            continue
        if v.shape[0] != H:
            skipped[k] = f"{v.shape[0]} values where the file's vectors have {H}"
            continue
        a = v.float().numpy()
        if not np.isfinite(a).all():
            skipped[k] = "NaN or Inf values"
        elif store_dtype == "float16" and np.abs(a).max() > FP16_MAX:
            skipped[k] = f"values beyond float16's range (max |x| {np.abs(a).max():.4g}; use --store-dtype float32)"
        else:
            out[k] = a
    if not out:
        reasons = Counter(skipped.values())
        raise SurpipeError(f"{p}: no usable vector in the file:", [f"{c} x {r}" for r, c in reasons.most_common(5)])
    return out, skipped


def run(cfg: ImportPrompt2VecConfig) -> dict[str, Any]:
    from surpipe.store.location import apply_store_options

    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    from surpipe import config as cfgmod
    from surpipe.features import LLMFeatures
    from surpipe.llm import sanitize_name
    from surpipe.store.blockjob import DistEnv, run_block_job
    from surpipe.store import FeatureStore, config_file

    if cfg.name != sanitize_name(cfg.name):
        raise SurpipeError(f"name: {cfg.name!r} is not a valid group name (e.g. {sanitize_name(cfg.name)!r})")
    if cfg.layer < 0:
        raise SurpipeError(f"layer: {cfg.layer} must be the 0-based index of the decoder layer the file holds")
    t0 = time.perf_counter()
    store = FeatureStore(cfg.store, mode="a")
    src = Path(cfg.file)
    vecs, skipped = load_prompt2vec(src, cfg.store_dtype)
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
    # rows whose prompt IS in the file, but with an unusable vector (counted apart from absent ones)
    skipped_norm = {_norm(k) for k in skipped}
    bad_rows = [int(i) for i in missing if prompts[i] in skipped or _norm(prompts[i]) in skipped_norm]
    skip_reasons = Counter(r.split(" (")[0] if r.startswith("values beyond") else
                           ("other width" if " values where " in r else r) for r in skipped.values())
    report: dict[str, Any] = {
        "group": f"llm/{cfg.name}", "rows": len(prompts), "file_prompts": len(vecs), "hidden_size": H,
        "matched_rows": int(len(prompts) - len(missing)), "matched_after_whitespace_normalisation": by_norm,
        "unmatched_rows": int(len(missing)), "unused_file_prompts": len(unused),
        "unmatched_examples": [{"key": keys[i], "prompt": prompts[i]} for i in missing[:10]],
        "unused_examples": unused[:10],
        "unusable_file_vectors": len(skipped), "unusable_reasons": dict(skip_reasons),
        "unusable_examples": [{"prompt": k, "reason": r} for k, r in list(skipped.items())[:10]],
        "rows_with_unusable_vector": len(bad_rows),
    }

    lines = [f"{src.name}: {len(vecs)} prompts, H={H}; {report['matched_rows']}/{len(prompts)} store rows matched"
             + (f" ({by_norm} after whitespace normalisation)" if by_norm else "")]
    if skipped:
        lines.append(f"{len(skipped)} file vectors are unusable and were skipped ("
                     + ", ".join(f"{c} {r}" for r, c in skip_reasons.most_common()) + "), e.g. "
                     + "; ".join(f"{k[:60]!r}: {r}" for k, r in list(skipped.items())[:3])
                     + (f"; {len(bad_rows)} store rows use them and get zeros, matched=false" if bad_rows else ""))
    bad_set = set(bad_rows)
    absent = [i for i in missing if i not in bad_set]
    if absent:
        lines.append(f"{len(absent)} store rows have no vector in the file, e.g. "
                     + "; ".join(f"{keys[i]}: {prompts[i][:70]!r}" for i in absent[:5]))
    if unused:
        lines.append(f"{len(unused)} file prompts match no store row, e.g. " + "; ".join(repr(u[:70]) for u in unused[:5]))
    log.info("\n  ".join(lines))
    if skipped and cfg.strict:
        raise SurpipeError(f"{len(skipped)} vectors in {src} are unusable (--strict):",
                           [f"{k[:70]!r}: {r}" for k, r in list(skipped.items())[:20]])
    if len(missing) and cfg.strict:
        raise SurpipeError(f"{len(missing)} of {len(prompts)} store rows have no vector in {src} (--strict); "
                           "drop --strict to import with zeros and matched=false for them")
    if len(missing) == len(prompts):
        if bad_rows:
            raise SurpipeError(f"no store row has a usable vector in {src}: {len(bad_rows)} rows' prompts are "
                               f"there but their vectors are unusable (see above)")
        raise SurpipeError(f"no store row's simple prompt is in {src}: is this the file for this dataset?")

    mat = np.stack([vecs[k] for k in file_keys])
    settings = LLMFeatures.settings(layers=[cfg.layer], pooling="mean", hidden_size=H, store_dtype=cfg.store_dtype,
                                    source=LLMFeatures.IMPORTED, file_sha256=file_sha256(src),
                                    matching="exact, then whitespace-normalised")
    path = f"llm/{cfg.name}"
    if not cfg.overwrite and store.has_group(path):
        try:
            old = store.group(path).settings
        except SurpipeError:  # half-created or damaged: run_block_job deals with it
            old = {}
        if old != settings and LLMFeatures.with_layers(old, LLMFeatures.settings_layers(old) or []) == settings:
            settings = old  # imported before settings said ``layers`` (``layer``): the same group
    arrays = LLMFeatures.arrays(settings, cfg.codec)
    provenance = {"file": str(src.resolve()), "model": cfg.model, "layer": cfg.layer, "hidden_size": H,
                  "pooling": "mean", "quantization": "unknown (authors' features)", "dtype": "float16 (file)"}

    def block(start: int, stop: int) -> dict[str, np.ndarray]:
        r = rows[start:stop]
        x = np.zeros((stop - start, H), dtype=np.float32)
        ok = r >= 0
        x[ok] = mat[r[ok]]
        return LLMFeatures.block({cfg.layer: x}, matched=ok)

    res = run_block_job(store=store, kind="llm", name=cfg.name, settings=settings, arrays=arrays,
                        provenance=provenance, overwrite=cfg.overwrite, env=DistEnv(), compute_block=block,
                        unit="row", desc=f"llm/{cfg.name}", progress=cfg.progress)
    report.update(already_complete=res.already_complete, rows_done_now=res.rows_done_now,
                  seconds=round(time.perf_counter() - t0, 2))
    if res.already_complete:
        log.info(f"llm/{cfg.name}: nothing to do, already imported")
    else:
        store.root[f"llm/{cfg.name}"].attrs.update({"config": cfgmod.to_dict(cfg), "report": report})
        cfgmod.save(dataclasses.replace(cfg, overwrite=False), config_file(cfg.store, "import-prompt2vec", cfg.name))
        log.info(f"imported {src.name} into llm/{cfg.name}/{LLMFeatures.pooled(cfg.layer)} [{len(prompts)}, {H}] "
                 f"in {report['seconds']} s")
    return report
