"""Questions with expected answers that check whether an image shows its prompt (TIFA/DSG style).

Three sources, all giving :class:`Question` records:

- ``template_questions``: read off the prompt for the paper's categories (the default: no model,
  deterministic). Counting: "How many dogs are there?" -> the number (``kind="count"``, with the
  object for the detector); color: "What color is the car?" -> the color; action: "Is the dog
  jumping?" -> yes. A prompt the templates cannot read gets none, and is counted.
- ``read_question_file``: the user's JSONL (``prompt``, ``question``, ``answer``; optional
  ``kind`` and ``object``), for narrative prompts and any prompt of one's own.
- ``generate_questions``: a local instruction-following LM (:mod:`surpipe.evaluation.question_lm`).

Whatever the source, the questions used are written to ``OUT/questions.jsonl`` and read back from
there on the next run (:func:`cached`), so every arm and every adapter of an ablation is judged on
the same questions.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

from surpipe.config import atomic_write_text
from surpipe.errors import SurpipeError

KINDS = ("count", "color", "yesno", "fact")
NUMBERS = {"zero": 0, "no": 0, "one": 1, "a": 1, "an": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5,
           "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey",
          "golden", "gold", "silver", "beige", "turquoise", "violet")
_ARTICLES = {"a", "an", "the"}
_COUNT_WORDS = {k for k in NUMBERS if k not in ("a", "an", "no", "single")}


@dataclass(frozen=True)
class Question:
    """One question about the image of ``prompt`` and the answer a faithful image gives."""

    prompt: str
    question: str
    answer: str
    kind: str  # count | color | yesno | fact
    object: Optional[str] = None  # what a detector counts (kind "count")
    source: str = "template"


def _noun_after(words: list[str], i: int) -> Optional[str]:
    """The noun phrase head after position ``i``: the next word that is not a color or number."""
    for w in words[i + 1:i + 4]:
        if w not in COLORS and w not in NUMBERS and w.isalpha():
            return w
    return None


def template_questions(category: str, prompt: str) -> list[Question]:
    """Questions read off ``prompt`` for ``category`` (action, color, counting); [] otherwise."""
    words = re.findall(r"[a-z]+|\d+", prompt.lower())
    out: list[Question] = []
    if category == "counting":
        for i, w in enumerate(words):
            n = int(w) if w.isdigit() else NUMBERS.get(w) if w in _COUNT_WORDS else None
            noun = _noun_after(words, i) if n is not None else None
            if noun:
                out.append(Question(prompt, f"How many {noun} are there?", str(n), "count", noun))
                break  # the first counted object: the one the prompt is about
    elif category == "color":
        for i, w in enumerate(words):
            noun = _noun_after(words, i) if w in COLORS else None
            if noun:
                out.append(Question(prompt, f"What color is the {noun}?", w, "color", noun))
    elif category == "action":
        for i, w in enumerate(words):
            if w.endswith("ing") and len(w) > 4 and i > 0 and words[i - 1].isalpha() and words[i - 1] not in _ARTICLES:
                subject = words[i - 1]
                out.append(Question(prompt, f"Is the {subject} {w}?", "yes", "yesno", subject))
                break
    return out


def read_question_file(path: str | Path) -> dict[str, list[Question]]:
    """{prompt: questions} from a JSONL file; every bad line is reported at once."""
    p = Path(path)
    if not p.is_file():
        raise SurpipeError(f"question file not found: {p}")
    out: dict[str, list[Question]] = {}
    problems = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            o = json.loads(line)
            q = Question(str(o["prompt"]), str(o["question"]), str(o["answer"]),
                         str(o.get("kind") or infer_kind(str(o["answer"]))), o.get("object"), "file")
        except (ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"line {n}: not a JSON object with prompt, question and answer")
            continue
        if q.kind not in KINDS:
            problems.append(f"line {n}: kind {q.kind!r} (valid: {', '.join(KINDS)})")
            continue
        out.setdefault(q.prompt, []).append(q)
    if problems:
        raise SurpipeError(f"question file {p} has bad lines:", problems[:20])
    return out


def infer_kind(answer: str) -> str:
    """The kind a bare expected answer implies: yes/no, a number, a color, else a fact."""
    a = normalize(answer)
    if a in ("yes", "no"):
        return "yesno"
    if a.isdigit():
        return "count"
    return "color" if a in COLORS else "fact"


def normalize(text: str) -> str:
    """Lower case, no punctuation or articles, number words as digits ("Two." -> "2")."""
    words = [w for w in re.findall(r"[a-z0-9]+", str(text).lower()) if w not in _ARTICLES]
    words = [str(NUMBERS[w]) if w in _COUNT_WORDS or w == "zero" else w for w in words]
    return " ".join(words)


def correct(q: Question, given: str) -> bool:
    """Whether ``given`` answers ``q``: yes/no, count and color by their first matching word, facts
    by the normalised answer appearing in the normalised reply."""
    want, got = normalize(q.answer), normalize(given).split()
    if not got:
        return False
    if q.kind == "yesno":
        return got[0] == want
    if q.kind == "count":
        nums = [w for w in got if w.isdigit()]
        return bool(nums) and nums[0] == want
    if q.kind == "color":
        colors = [{"grey": "gray", "gold": "golden"}.get(w, w) for w in got if w in COLORS]
        return bool(colors) and colors[0] == {"grey": "gray", "gold": "golden"}.get(want, want)
    return f" {want} " in f" {' '.join(got)} "


def write_cache(path: Path, questions: dict[str, list[Question]]) -> None:
    """One line per question; a prompt without any gets a line ``{"prompt": ..., "none": true}``."""
    lines = [json.dumps(asdict(q), ensure_ascii=False) for qs in questions.values() for q in qs]
    lines += [json.dumps({"prompt": p, "none": True}, ensure_ascii=False) for p, qs in questions.items() if not qs]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_cache(path: Path) -> dict[str, list[Question]]:
    out: dict[str, list[Question]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            o = json.loads(line)
            out.setdefault(o["prompt"], [])
            if not o.get("none"):
                out[o["prompt"]].append(Question(**o))
        except (ValueError, KeyError, TypeError):
            raise SurpipeError(f"question cache {path} line {n} is damaged: delete the file to make the "
                               "questions again") from None
    return out


def cached(path: Path, prompts: Iterable[tuple[str, str]], make) -> dict[str, list[Question]]:
    """The questions of ``prompts`` ((category, prompt) pairs) from the cache file ``path`` when it
    holds every prompt, else from ``make(missing pairs) -> {prompt: questions}``, then cached."""
    prompts = list(dict.fromkeys(prompts))
    have = read_cache(path) if path.is_file() else {}
    missing = [(c, p) for c, p in prompts if p not in have]
    if missing:
        made = make(missing)
        for _, p in missing:
            have[p] = list(made.get(p, []))
        write_cache(path, {p: have[p] for _, p in prompts})
    return {p: have.get(p, []) for _, p in prompts}
