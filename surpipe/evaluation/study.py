"""A blind A/B user-preference study of an eval's images (``surpipe study make`` / ``tally``).

``make_study`` pairs the two arms of each (prompt, seed) of an eval folder (``scores.jsonl`` with
saved images), shuffles the pairs, puts each arm on a random side, and writes one self-contained HTML
page (images inlined as data URIs; no server, no network) plus a *key* file beside it that says which
side holds the adapter's image. The key stays out of the page, so a rater cannot look it up.

A rater answers with the keyboard (1/left arrow: left, 2/right arrow: right, 3/down arrow: same,
backspace: back) and exports the answers as JSON (``E`` or the button). ``tally`` reads the key and
any number of answer files: per category and overall, the share of decided pairs where the adapter's
image was preferred, with a Wilson 95% interval, and the agreement between raters (Fleiss' kappa
over the pairs every rater answered, and the raw share of agreeing rater pairs).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from surpipe.config import atomic_write_text
from surpipe.errors import SurpipeError

KEY_SUFFIX = ".key.json"  # the answer key beside the page: study.html -> study.key.json
CHOICES = ("left", "right", "same")
Z95 = 1.959963984540054


def key_path(page: Path) -> Path:
    """Where the answer key of study page ``page`` lives."""
    return page.with_name(page.stem + KEY_SUFFIX)


def read_pairs(eval_dir: Path) -> list[dict]:
    """The (prompt, seed) pairs of an eval folder with both arms' image files, in the eval's order."""
    rows_file = eval_dir / "scores.jsonl"
    if not rows_file.is_file():
        raise SurpipeError(f"{eval_dir} holds no scores.jsonl: give the --out folder of a `surpipe eval` run")
    arms: dict = {}
    for n, line in enumerate(rows_file.read_text(encoding="utf-8").splitlines(), 1):
        try:
            r = json.loads(line)
            k = (str(r["category"]), str(r["prompt"]), int(r["seed"]))
            arm = "with" if r["adapter"] else "without"
        except (ValueError, KeyError, TypeError):
            raise SurpipeError(f"{rows_file} line {n} is not an eval record") from None
        if "file" not in r:
            raise SurpipeError(f"{rows_file} names no image files: rerun `surpipe eval` with --save-images")
        arms.setdefault(k, {})[arm] = eval_dir / r["file"]
    pairs = []
    for (cat, prompt, seed), files in arms.items():
        if set(files) != {"with", "without"}:
            raise SurpipeError(f"{rows_file}: {prompt!r} (seed {seed}) lacks the {'with' if 'with' not in files else 'without'}"
                               "-adapter image")
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise SurpipeError(f"image files of {eval_dir} are missing: {', '.join(missing[:3])}")
        pairs.append({"category": cat, "prompt": prompt, "seed": seed, "files": files})
    if not pairs:
        raise SurpipeError(f"{rows_file} holds no images")
    return pairs


def _data_uri(path: Path) -> str:
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(
        path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def make_study(eval_dir: Path, page: Path, seed: int = 0, title: str = "Which image fits the prompt better?") -> dict:
    """Write the study page ``page`` and its key; returns the key (what :func:`tally` needs)."""
    pairs = read_pairs(Path(eval_dir))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    items, key = [], []
    for i, p in enumerate(pairs):
        adapter_left = rng.random() < 0.5
        left, right = (p["files"]["with"], p["files"]["without"]) if adapter_left else \
            (p["files"]["without"], p["files"]["with"])
        pid = f"p{i:04d}"
        items.append({"id": pid, "prompt": p["prompt"], "left": _data_uri(left), "right": _data_uri(right)})
        key.append({"id": pid, "category": p["category"], "prompt": p["prompt"], "seed": p["seed"],
                    "adapter": "left" if adapter_left else "right"})
    study_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    key_doc = {"study": study_id, "eval": str(eval_dir), "seed": seed, "pairs": key}
    page = Path(page)
    page.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(page, _page_template().replace("__TITLE__", html.escape(title)).replace(
        "__DATA__", json.dumps({"study": study_id, "pairs": items}).replace("</", "<\\/")))
    atomic_write_text(key_path(page), json.dumps(key_doc, indent=2, ensure_ascii=False) + "\n")
    return key_doc


def wilson(successes: int, n: int, z: float = Z95) -> tuple[Optional[float], Optional[float]]:
    """The Wilson score interval of a share ``successes / n`` (None, None for n = 0)."""
    if n <= 0:
        return None, None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> Optional[float]:
    """Fleiss' kappa of ``table[item][category]`` = raters choosing that category (same rater count per
    item, at least 2); None when it is undefined (fewer than 2 raters or 1 item, or no spread)."""
    rows = [list(r) for r in table if sum(r) > 0]
    if not rows:
        return None
    n = sum(rows[0])
    if n < 2 or any(sum(r) != n for r in rows):
        return None
    N = len(rows)
    p_j = [sum(r[j] for r in rows) / (N * n) for j in range(len(rows[0]))]
    P_i = [(sum(c * c for c in r) - n) / (n * (n - 1)) for r in rows]
    P_bar, P_e = sum(P_i) / N, sum(p * p for p in p_j)
    return None if P_e >= 1.0 else (P_bar - P_e) / (1 - P_e)


def _read_answers(files: Iterable[Path], study: str, known: set) -> list[dict]:
    out = []
    for f in files:
        try:
            doc = json.loads(Path(f).read_text(encoding="utf-8"))
            answers = {str(a["pair"]): str(a["choice"]) for a in doc["answers"]}
            rater = str(doc.get("rater") or Path(f).stem)
        except (OSError, ValueError, KeyError, TypeError):
            raise SurpipeError(f"{f} is not an answer file exported by a study page") from None
        if doc.get("study") != study:
            raise SurpipeError(f"{f} answers study {doc.get('study')!r}, not {study!r}: give the key of its page")
        bad = sorted({c for c in answers.values() if c not in CHOICES} | {p for p in answers if p not in known})
        if bad:
            raise SurpipeError(f"{f} holds unknown pairs or choices: {', '.join(bad[:5])}")
        out.append({"rater": rater, "answers": answers, "file": str(f)})
    raters = [a["rater"] for a in out]
    dup = sorted(r for r, c in Counter(raters).items() if c > 1)
    if dup:
        raise SurpipeError(f"rater names answer twice: {', '.join(dup)} (one answer file per rater)")
    return out


def _preference(votes: list[str]) -> dict:
    w, l, s = votes.count("with"), votes.count("without"), votes.count("same")
    lo, hi = wilson(w, w + l)
    return {"with": w, "without": l, "same": s, "decided": w + l,
            "preference": (w / (w + l)) if w + l else None, "ci95": [lo, hi]}


def tally(key_file: Path, answer_files: Sequence[Path]) -> dict:
    """Preference for the adapter per category and overall (each answer one vote; ``same`` is kept
    apart and not in the rate), Wilson intervals, and agreement between raters."""
    try:
        key = json.loads(Path(key_file).read_text(encoding="utf-8"))
        pairs = {p["id"]: p for p in key["pairs"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise SurpipeError(f"{key_file} is not a study key (the .key.json beside a study page)") from None
    if not answer_files:
        raise SurpipeError("give at least one answer file")
    raters = _read_answers(answer_files, key["study"], set(pairs))
    votes: dict = defaultdict(list)
    per_pair: dict = defaultdict(dict)
    for r in raters:
        for pid, choice in r["answers"].items():
            arm = "same" if choice == "same" else ("with" if choice == pairs[pid]["adapter"] else "without")
            votes[pairs[pid]["category"]].append(arm)
            per_pair[pid][r["rater"]] = arm
    cats = {c: _preference(v) for c, v in votes.items()}
    cats["all"] = _preference([a for v in votes.values() for a in v])
    names = [r["rater"] for r in raters]
    common = [pid for pid, by in per_pair.items() if len(by) == len(names)]
    agree = None
    if len(names) >= 2 and common:
        table = [[list(per_pair[pid].values()).count(a) for a in ("with", "without", "same")] for pid in common]
        pairs_agree = [sum(c * (c - 1) for c in row) / (len(names) * (len(names) - 1)) for row in table]
        agree = {"raters": len(names), "pairs": len(common), "fleiss_kappa": fleiss_kappa(table),
                 "pairwise_agreement": sum(pairs_agree) / len(pairs_agree)}
    return {"study": key["study"], "raters": names, "answered": {r["rater"]: len(r["answers"]) for r in raters},
            "pairs": len(pairs), "categories": cats, "agreement": agree}


def markdown(result: dict) -> str:
    """The tally as a Markdown table (one row per category, then all) and the agreement line."""
    lines = [f"## User preference (study {result['study']}: {len(result['raters'])} rater(s), {result['pairs']} pairs)",
             "", "Share of decided answers preferring the image made with the adapter (ties apart), Wilson 95% "
             "interval.", "", "| category | with | without | same | preference for the adapter | 95% interval |",
             "|---|---:|---:|---:|---:|---|"]
    for cat, s in result["categories"].items():
        pref = "" if s["preference"] is None else f"{s['preference']:.3f}"
        ci = "" if s["ci95"][0] is None else f"{s['ci95'][0]:.3f} - {s['ci95'][1]:.3f}"
        lines.append(f"| {cat} | {s['with']} | {s['without']} | {s['same']} | {pref} | {ci} |")
    a = result["agreement"]
    if a:
        k = "n/a" if a["fleiss_kappa"] is None else f"{a['fleiss_kappa']:.3f}"
        lines += ["", f"Agreement over the {a['pairs']} pairs all {a['raters']} raters answered: Fleiss' kappa {k}, "
                  f"agreeing rater pairs {a['pairwise_agreement']:.3f}."]
    else:
        lines += ["", "Agreement between raters: needs two or more answer files on the same pairs."]
    return "\n".join(lines) + "\n"


def _page_template() -> str:
    return Path(__file__).with_name("study_page.html").read_text(encoding="utf-8")
