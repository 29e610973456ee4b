"""Semantic accuracy by category: the questions of each prompt (surpipe.evaluation.questions) asked
of both arms' images by the judges (surpipe.evaluation.judges), and the share answered right.

Every question is asked of the image without and with the adapter (same prompt and seed), so the two
arms are paired. Counting questions go to the detector when there is one (judge ``detector``) and
to the VQA model (judge ``vqa``); every other question to the VQA model. Accuracy is per category,
judge and arm, with the paired difference; the 95% intervals come from a bootstrap over prompts
(prompts are the units drawn: a prompt's seeds and questions move together).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from surpipe.evaluation.questions import Question, correct

ARMS = ("without", "with")


def judge(items: Sequence[tuple], images: dict, questions: dict[str, list[Question]], vqa=None,
          detector=None) -> list[dict]:
    """One record per image, question and judge: ``items`` are (category, prompt index, prompt,
    seed) in the order of ``images[arm]``."""
    asks = [(k, q) for k, it in enumerate(items) for q in questions.get(it[2], [])]
    index = {id(q): i for qs in questions.values() for i, q in enumerate(qs)}  # a prompt may ask one text twice
    records = []
    for arm in ARMS:
        ims = images[arm]
        plan = []
        if vqa is not None:
            plan.append(("vqa", asks, lambda a: vqa.answer([ims[k] for k, _ in a], [q.question for _, q in a])))
        if detector is not None:
            counted = [(k, q) for k, q in asks if q.kind == "count" and q.object]
            plan.append(("detector", counted,
                         lambda a: [str(n) for n in detector.count([ims[k] for k, _ in a], [q.object for _, q in a])]))
        for name, subset, ask in plan:
            replies = ask(subset) if subset else []
            for (k, q), reply in zip(subset, replies):
                cat, _, prompt, seed = items[k]
                records.append({"category": cat, "prompt": prompt, "seed": seed, "arm": arm, "judge": name,
                                "q": index[id(q)], "question": q.question, "expected": q.answer, "kind": q.kind, "reply": reply,
                                "correct": bool(correct(q, reply))})
    return records


def _paired(records: list[dict]):
    """{prompt: (without [n], with [n])}: each question on each seed, both arms, aligned."""
    by = defaultdict(dict)
    for r in records:
        by[(r["prompt"], r["seed"], r.get("q"), r["question"])][r["arm"]] = float(r["correct"])
    out = defaultdict(lambda: ([], []))
    for (prompt, _, _, _), arms in by.items():
        if set(arms) == set(ARMS):
            out[prompt][0].append(arms["without"])
            out[prompt][1].append(arms["with"])
    return {p: (np.array(a), np.array(b)) for p, (a, b) in out.items()}


def summarize(records: list[dict], n_boot: int = 2000, seed: int = 0) -> Optional[dict]:
    """Accuracy of both arms, the difference (with - without) and bootstrap 95% intervals."""
    pairs = _paired(records)
    if not pairs:
        return None
    prompts = list(pairs)
    w0 = np.concatenate([pairs[p][0] for p in prompts])
    w1 = np.concatenate([pairs[p][1] for p in prompts])
    out = {"prompts": len(prompts), "questions": int(len(w0)), "without": float(w0.mean()), "with": float(w1.mean()),
           "difference": float(w1.mean() - w0.mean())}
    rng = np.random.default_rng(seed)
    sums = np.array([[pairs[p][0].sum(), pairs[p][1].sum(), len(pairs[p][0])] for p in prompts])
    draws = rng.integers(0, len(prompts), size=(n_boot, len(prompts)))
    tot = sums[draws].sum(axis=1)  # [n_boot, 3]
    acc0, acc1 = tot[:, 0] / tot[:, 2], tot[:, 1] / tot[:, 2]
    for name, v in (("without", acc0), ("with", acc1), ("difference", acc1 - acc0)):
        out[f"{name}_ci95"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
    return out


def table(records: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """{"rows": [{category, judge, ...summary}], "overall": {judge: summary}} (categories in order)."""
    rows = []
    cats = list(dict.fromkeys(r["category"] for r in records))
    judges = list(dict.fromkeys(r["judge"] for r in records))
    for cat in cats:
        for j in judges:
            s = summarize([r for r in records if r["category"] == cat and r["judge"] == j], n_boot, seed)
            if s is not None:
                rows.append({"category": cat, "judge": j, **s})
    overall = {j: s for j in judges if (s := summarize([r for r in records if r["judge"] == j], n_boot, seed))}
    return {"rows": rows, "overall": overall, "bootstrap": {"draws": n_boot, "seed": seed, "unit": "prompt"}}


def markdown(acc: dict) -> str:
    """The accuracy section of results.md."""
    def ci(v):
        return f"[{v[0]:.2f}, {v[1]:.2f}]"

    lines = ["## Semantic accuracy (questions answered right)", "",
             "| category | judge | prompts | questions | without adapter | with adapter | difference (with - without) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    rows = acc["rows"] + [{"category": "**all**", "judge": j, **s} for j, s in acc["overall"].items()]
    for r in rows:
        lines.append(f"| {r['category']} | {r['judge']} | {r['prompts']} | {r['questions']} | "
                     f"{r['without']:.3f} {ci(r['without_ci95'])} | {r['with']:.3f} {ci(r['with_ci95'])} | "
                     f"{r['difference']:+.3f} {ci(r['difference_ci95'])} |")
    b = acc["bootstrap"]
    lines += ["", f"Each question asked of both arms' images (same prompt and seed). 95% intervals: bootstrap over "
              f"prompts ({b['draws']} draws, seed {b['seed']})."]
    return "\n".join(lines) + "\n"
