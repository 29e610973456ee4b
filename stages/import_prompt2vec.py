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
The file is read with ``torch.load(weights_only=True)``: no code in it is executed. The work is
``surpipe.llm.prompt2vec``'s; this module words the outcome and applies ``strict``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from surpipe import config as cfgmod
from surpipe.config import opt
from surpipe.errors import SurpipeError
from surpipe.options import StoreAccess
from surpipe.features import LLMFeatures
from surpipe.llm import prompt2vec, sanitize_name
from surpipe.logs import get_logger
from surpipe.store import FeatureStore, config_file
from surpipe.store.location import apply_store_options

log = get_logger()  # "surpipe: ..." on stderr, from rank 0 only


@dataclass
class ImportPrompt2VecConfig(StoreAccess):
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


def _summary(src: Path, vecs: dict, skipped: dict, m: prompt2vec.Matching, prompts: list[str], keys: list[str],
             H: int) -> str:
    """What matched, what did not, and what was unusable, with a few examples of each."""
    missing, unused, bad_rows, by_norm = m.missing, m.unused, m.bad_rows, m.by_norm
    lines = [f"{src.name}: {len(vecs)} prompts, H={H}; {len(prompts) - len(missing)}/{len(prompts)} store rows matched"
             + (f" ({by_norm} after whitespace normalisation)" if by_norm else "")]
    if skipped:
        lines.append(f"{len(skipped)} file vectors are unusable and were skipped ("
                     + ", ".join(f"{c} {r}" for r, c in m.skip_reasons.most_common()) + "), e.g. "
                     + "; ".join(f"{k[:60]!r}: {r}" for k, r in list(skipped.items())[:3])
                     + (f"; {len(bad_rows)} store rows use them and get zeros, matched=false" if bad_rows else ""))
    bad_set = set(bad_rows)
    absent = [i for i in missing if i not in bad_set]
    if absent:
        lines.append(f"{len(absent)} store rows have no vector in the file, e.g. "
                     + "; ".join(f"{keys[i]}: {prompts[i][:70]!r}" for i in absent[:5]))
    if unused:
        lines.append(f"{len(unused)} file prompts match no store row, e.g. " + "; ".join(repr(u[:70]) for u in unused[:5]))
    return "\n  ".join(lines)


def _refuse(cfg: ImportPrompt2VecConfig, src: Path, skipped: dict, m: prompt2vec.Matching, n_rows: int) -> None:
    """--strict refusals, and an import that would match no row at all."""
    if skipped and cfg.strict:
        raise SurpipeError(f"{len(skipped)} vectors in {src} are unusable (--strict):",
                           [f"{k[:70]!r}: {r}" for k, r in list(skipped.items())[:20]])
    if len(m.missing) and cfg.strict:
        raise SurpipeError(f"{len(m.missing)} of {n_rows} store rows have no vector in {src} (--strict); "
                           "drop --strict to import with zeros and matched=false for them")
    if len(m.missing) == n_rows:
        if m.bad_rows:
            raise SurpipeError(f"no store row has a usable vector in {src}: {len(m.bad_rows)} rows' prompts are "
                               f"there but their vectors are unusable (see above)")
        raise SurpipeError(f"no store row's simple prompt is in {src}: is this the file for this dataset?")


def run(cfg: ImportPrompt2VecConfig) -> dict[str, Any]:
    """Import the file into group llm/<name> of the store; returns a report dict."""
    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    if cfg.name != sanitize_name(cfg.name):
        raise SurpipeError(f"name: {cfg.name!r} is not a valid group name (e.g. {sanitize_name(cfg.name)!r})")
    if cfg.layer < 0:
        raise SurpipeError(f"layer: {cfg.layer} must be the 0-based index of the decoder layer the file holds")
    t0 = time.perf_counter()
    store = FeatureStore(cfg.store, mode="a")
    src = Path(cfg.file)
    vecs, skipped = prompt2vec.load_prompt2vec(src, cfg.store_dtype)
    H = len(next(iter(vecs.values())))
    prompts = [str(x) for x in store.prompts("simple")]
    keys = [str(k) for k in store.keys()]
    m = prompt2vec.match_rows(prompts, vecs, skipped)
    report = m.report(cfg.name, prompts, keys, vecs, skipped, H)
    log.info(_summary(src, vecs, skipped, m, prompts, keys, H))
    _refuse(cfg, src, skipped, m, len(prompts))
    res = prompt2vec.write_group(cfg, store, src, vecs, m, H)
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
