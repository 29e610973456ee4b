"""The results in the paper's layout: semantic metrics (accuracy per category: action, color,
counting; CLIP score) and quality metrics (no-reference image quality; user preference), one row
per arm and one for the difference. ``surpipe eval`` writes it at the top of ``results.md``;
``surpipe study tally --eval-dir OUT`` fills its user-preference column in place."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from surpipe.config import atomic_write_text

BEGIN, END = "<!-- paper-table -->", "<!-- /paper-table -->"
CATEGORIES = ("action", "color", "counting")


def _acc(res: dict, cat: str) -> Optional[dict]:
    """The accuracy row of ``cat``: the detector's for counting when there is one, else the VQA's."""
    rows = [r for r in (res.get("accuracy") or {}).get("rows", []) if r["category"] == cat]
    pick = [r for r in rows if r["judge"] == "detector"] if cat == "counting" else []
    pick = pick or [r for r in rows if r["judge"] == "vqa"]
    return pick[0] if pick else None


def table(res: dict, preference: Optional[dict] = None) -> str:
    """The paper-style table of one eval's ``results.json`` (``preference``: a study tally)."""
    cols = [(f"{c} acc. (%)", _acc(res, c), 100.0, ".1f") for c in CATEGORIES]
    iqa = (res.get("clip_iqa") or {}).get("overall")
    cols += [("CLIP score", res.get("overall"), 1.0, ".2f"), ("CLIP-IQA", iqa, 1.0, ".3f")]
    pref = (preference or {}).get("categories", {}).get("all")

    def cell(c, arm):
        _, s, scale, fmt = c
        if s is None:
            return "n/a"
        if arm == "difference":
            return f"{scale * s['difference']:+{fmt}}"
        return format(scale * s[arm], fmt)

    head = ["| | " + " | ".join(c[0] for c in cols) + " | user preference |", "|---|" + "---:|" * (len(cols) + 1)]
    p_with = "n/a" if not pref or pref["preference"] is None else (
        f"{100 * pref['preference']:.1f}% [{100 * pref['ci95'][0]:.1f}, {100 * pref['ci95'][1]:.1f}]")
    p_without = "n/a" if not pref or pref["preference"] is None else f"{100 * (1 - pref['preference']):.1f}%"
    body = ["| Stable Diffusion | " + " | ".join(cell(c, "without") for c in cols) + f" | {p_without} |",
            "| + SUR-adapter | " + " | ".join(cell(c, "with") for c in cols) + f" | {p_with} |",
            "| difference | " + " | ".join(cell(c, "difference") for c in cols) + " | |"]
    judge = {c: (_acc(res, c) or {}).get("judge", "none") for c in CATEGORIES}
    note = ("Accuracy: questions answered right (judges: " + ", ".join(f"{c} {j}" for c, j in judge.items())
            + "); CLIP score and CLIP-IQA over all images; user preference: share of decided blind A/B answers "
            "(`surpipe study`), Wilson 95% interval. Intervals of every other number are in the sections below.")
    return "\n".join(["## In the paper's layout", "", *head, *body, "", note]) + "\n"


def section(res: dict, preference: Optional[dict] = None) -> str:
    return f"{BEGIN}\n{table(res, preference)}{END}\n"


def fill_preference(eval_dir: Path, preference: Optional[dict]) -> None:
    """(Re)write the paper table of an eval folder's ``results.md`` in place, before its first
    section; with ``preference`` (a study tally), also ``results.json["preference"]``."""
    rj = eval_dir / "results.json"
    res = json.loads(rj.read_text(encoding="utf-8"))
    if preference is not None:
        res["preference"] = preference
        atomic_write_text(rj, json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    md = eval_dir / "results.md"
    text = md.read_text(encoding="utf-8") if md.is_file() else ""
    new = section(res, res.get("preference"))
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: new, text)
    else:
        at = text.find("\n## ")
        text = new + "\n" + text if at < 0 else text[:at + 1] + new + "\n" + text[at + 1:]
    atomic_write_text(md, text)
