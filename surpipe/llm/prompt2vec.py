"""The SUR-adapter authors' LLM features (their ``prompt2vec`` ``.pt`` file) as an ``llm/<name>`` group.

The file is ``{simple prompt: fp16 tensor [H]}`` (the mean over the prompt's tokens of one decoder
layer's raw output). :func:`load_prompt2vec` reads it safely (``torch.load(weights_only=True)``) and
sorts out unusable vectors; :func:`match_rows` gives each store row the vector of its exact simple
prompt, else of the same prompt with whitespace normalised (when unique in the file);
:func:`write_group` writes the matched vectors (zeros and ``matched = false`` elsewhere) through the
resumable block loop. ``stages/import_prompt2vec.py`` words the outcome and applies ``--strict``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surpipe.errors import SurpipeError
from surpipe.features import LLMFeatures, open_group
from surpipe.safeload import file_sha256, load_torch_file, tensor_kind_problem
from surpipe.store.blockjob import DistEnv, run_block_job

FP16_MAX = 65504.0


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def _flat_vectors(p: Path, obj) -> dict:
    """The file's ``{prompt: 1-D tensor}``; a file whose structure is wrong is refused whole."""
    import torch  # heavy: keeps --help torch-free

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
    return flat


def load_prompt2vec(path: str | Path, store_dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read the authors' ``{prompt: tensor [H]}`` file safely: ``(vectors, skipped)``.

    ``vectors``: float32 numpy vectors of the file's width H (the width most vectors have).
    ``skipped``: ``{prompt: reason}`` for unusable vectors (empty, another width, NaN/Inf, beyond
    float16's range when stored as float16), counted by the caller; a file whose structure is wrong
    (not a dict, non-string keys, non-tensors, sparse/quantized/complex/integer tensors, matrices)
    is refused whole.
    """
    p = Path(path)
    flat = _flat_vectors(p, load_torch_file(p, "prompt2vec file"))
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


@dataclass
class Matching:
    """Which file vector each store row takes (``rows[i]``: index into ``file_keys``, -1 for none)."""

    file_keys: list[str]
    rows: np.ndarray
    by_norm: int  # rows matched after whitespace normalisation
    missing: np.ndarray  # rows with no vector
    unused: list[str]  # file prompts no row uses
    bad_rows: list[int]  # missing rows whose prompt IS in the file, with an unusable vector
    skip_reasons: Counter  # unusable vectors by reason

    def report(self, name: str, prompts: list[str], keys: list[str], vecs: dict, skipped: dict, H: int) -> dict:
        """The import's report: counts and a few examples of every kind of mismatch."""
        missing, unused = self.missing, self.unused
        return {
            "group": f"llm/{name}", "rows": len(prompts), "file_prompts": len(vecs), "hidden_size": H,
            "matched_rows": int(len(prompts) - len(missing)), "matched_after_whitespace_normalisation": self.by_norm,
            "unmatched_rows": int(len(missing)), "unused_file_prompts": len(unused),
            "unmatched_examples": [{"key": keys[i], "prompt": prompts[i]} for i in missing[:10]],
            "unused_examples": unused[:10],
            "unusable_file_vectors": len(skipped), "unusable_reasons": dict(self.skip_reasons),
            "unusable_examples": [{"prompt": k, "reason": r} for k, r in list(skipped.items())[:10]],
            "rows_with_unusable_vector": len(self.bad_rows),
        }


def match_rows(prompts: list[str], vecs: dict[str, np.ndarray], skipped: dict[str, str]) -> Matching:
    """Match each store row's simple prompt to a file vector: exactly, else whitespace-normalised
    when that is unique in the file."""
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
    skipped_norm = {_norm(k) for k in skipped}
    bad_rows = [int(i) for i in missing if prompts[i] in skipped or _norm(prompts[i]) in skipped_norm]
    skip_reasons = Counter(r.split(" (")[0] if r.startswith("values beyond") else
                           ("other width" if " values where " in r else r) for r in skipped.values())
    return Matching(file_keys, rows, by_norm, missing, [file_keys[j] for j in np.flatnonzero(~used)], bad_rows,
                    skip_reasons)


def write_group(cfg, store, src: Path, vecs: dict[str, np.ndarray], m: Matching, H: int) -> Any:
    """Write ``llm/<cfg.name>`` (``cfg``: the import-prompt2vec options): the matched vectors, zeros
    and ``matched = false`` elsewhere; returns the block job's result."""
    mat = np.stack([vecs[k] for k in m.file_keys])
    settings = LLMFeatures.settings(layers=[cfg.layer], pooling="mean", hidden_size=H, store_dtype=cfg.store_dtype,
                                    source=LLMFeatures.IMPORTED, file_sha256=file_sha256(src),
                                    matching="exact, then whitespace-normalised")
    path = f"llm/{cfg.name}"
    if not cfg.overwrite and store.has_group(path):
        try:
            old = open_group(store, path).settings
        except SurpipeError:  # half-created or damaged: run_block_job deals with it
            old = {}
        if old != settings and LLMFeatures.with_layers(old, LLMFeatures.settings_layers(old) or []) == settings:
            settings = old  # imported before settings said ``layers`` (``layer``): the same group
    provenance = {"file": str(src.resolve()), "model": cfg.model, "layer": cfg.layer, "hidden_size": H,
                  "pooling": "mean", "quantization": "unknown (authors' features)", "dtype": "float16 (file)"}

    def block(start: int, stop: int) -> dict[str, np.ndarray]:
        r = m.rows[start:stop]
        x = np.zeros((stop - start, H), dtype=np.float32)
        ok = r >= 0
        x[ok] = mat[r[ok]]
        return LLMFeatures.block({cfg.layer: x}, matched=ok)

    return run_block_job(store=store, kind="llm", name=cfg.name, settings=settings,
                         arrays=LLMFeatures.arrays(settings, cfg.codec), provenance=provenance,
                         overwrite=cfg.overwrite, env=DistEnv(), compute_block=block, unit="row",
                         desc=f"llm/{cfg.name}", progress=cfg.progress)
