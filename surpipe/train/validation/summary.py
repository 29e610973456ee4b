"""The held-out summary a run prints (and ``surpipe run`` repeats): what was learned, said against the
untrained adapter (the run's step-0 evaluation) and the controls, never as a gain that step 0, a
scaled copy of the input or a constant output already had. Torch-free."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def first_validation(metrics: Path) -> Optional[dict]:
    """The step-0 held-out row of ``metrics.jsonl`` (the untrained adapter), or None."""
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and row.get("step") == 0 and "val/prompt" in row:
            return row
    return None


def margin(p: float, n: int) -> float:
    """Two standard errors of a share ``p`` over ``n`` rows (at least one row's worth): how far R@1 must
    clear a control's before it counts as learned."""
    p = min(max(p, 1.0 / max(n, 1)), 1.0)
    return 2.0 * math.sqrt(p * (1.0 - p) / max(n, 1)) + 1.0 / max(n, 1)


def _fmt(v, f=".3f") -> str:
    return "n/a" if v is None else format(v, f)


def retrieval_verdict(m: dict, rows: int, untrained: Optional[dict]) -> str:
    """Whether the adapter's R@1 clears the raw embedding, the untrained adapter, shuffled inputs and
    chance by more than :func:`margin` of the best of them."""
    r1 = m.get("val/r1")
    if r1 is None:
        return ""
    controls = {"the raw embedding": m.get("val/r1_raw"), "shuffled inputs": m.get("val/r1_shuffled"),
                "chance": m.get("val/r1_chance"), "the untrained adapter": (untrained or {}).get("val/r1")}
    controls = {k: v for k, v in controls.items() if v is not None}
    best_name, best = max(controls.items(), key=lambda kv: kv[1])
    n = int(rows) if isinstance(rows, int) else 0
    if n and r1 - best > margin(best, n):
        return "input-dependent alignment learned (R@1 above every control by more than 2 standard errors)"
    return f"no input-dependent alignment learned beyond what {best_name} has"


def prompt_verdict(m: dict, untrained: Optional[dict]) -> str:
    """Whether the prompt term (lower is better, scale-dependent) beats what scale alone or a constant reach."""
    p = m.get("val/prompt")
    if p is None:
        return ""
    reach = {f"a scaled copy of the input ({m.get('val/scaled_factor', 0):g}·x)": m.get("val/prompt_scaled"),
             "the constant output": m.get("val/prompt_const")}
    beaten_by = [k for k, v in reach.items() if v is not None and v <= p]
    if beaten_by:
        return f"not learning: {' and '.join(beaten_by)} reach{'es' if len(beaten_by) == 1 else ''} as low"
    p0 = (untrained or {}).get("val/prompt")
    if p0 is not None and p >= p0:
        return "no lower than the untrained adapter"
    return "below the untrained adapter, every scaled copy of the input and the constant"


def summary(m: dict, rows, first: Optional[dict] = None) -> str:
    """The held-out summary of metrics ``m`` (surpipe.train.validation.metrics.evaluate's, with
    ``step``); ``first``: the step-0 row (the untrained adapter) when known."""
    u = first if (first or {}).get("step") == 0 and m.get("step") != 0 else None

    def was(key, f=".3f"):
        return f"untrained {_fmt(u.get(key), f)}, " if u and key in u else ""

    lines = [f"held-out ({rows} rows, step {m.get('step')}):"]
    if "val/r1" in m:
        lines.append(
            f"  retrieval of the own complex prompt: R@1 {_fmt(m['val/r1'])} ({was('val/r1')}raw embedding "
            f"{_fmt(m.get('val/r1_raw'))}, shuffled inputs {_fmt(m.get('val/r1_shuffled'))}, chance "
            f"{_fmt(m.get('val/r1_chance'))}); median rank {_fmt(m.get('val/median_rank'), '.1f')} (raw "
            f"{_fmt(m.get('val/median_rank_raw'), '.1f')}, chance {_fmt(m.get('val/median_rank_chance'), '.1f')}): "
            + retrieval_verdict(m, rows, u))
    if "val/cos_adapter" in m:
        const = m.get("val/cos_const")
        lines.append(
            f"  cosine to the complex prompt {_fmt(m['val/cos_adapter'], '.4f')} ({was('val/cos_adapter', '.4f')}raw "
            f"{_fmt(m.get('val/cos_baseline'), '.4f')}, shuffled inputs {_fmt(m.get('val/cos_shuffled'), '.4f')}"
            + (f", constant {_fmt(const, '.4f')}" if const is not None else "") + ")"
            + (": the constant output is closer" if const is not None and const >= m["val/cos_adapter"] else ""))
    if "val/prompt" in m:
        lines.append(
            f"  prompt term {_fmt(m['val/prompt'], '.4f')} ({was('val/prompt', '.4f')}raw "
            f"{_fmt(m.get('val/prompt_baseline'), '.4f')}, best scaled input {_fmt(m.get('val/prompt_scaled'), '.4f')}"
            + (f", constant {_fmt(m.get('val/prompt_const'), '.4f')}" if "val/prompt_const" in m else "")
            + (f"; as trained, on fc(a): {_fmt(m.get('val/prompt_fc'), '.4f')}" if "val/prompt_fc" in m else "")
            + "): " + prompt_verdict(m, u))
    extra = [f"{k[4:]} {m[k]:.5f}" for k in ("val/llm", "val/denoise") if k in m]
    if "val/llm_r1" in m:
        extra.append(f"llm target retrieval R@1 {_fmt(m['val/llm_r1'])} (chance {_fmt(m.get('val/r1_chance'))}), "
                     f"mean cosine between rows' llm targets {_fmt(m.get('val/llm_target_cos'))}")
    if extra:
        lines.append("  " + "; ".join(extra))
    return "\n".join(lines)
