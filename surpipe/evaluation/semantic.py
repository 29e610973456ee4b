"""The semantic-accuracy part of ``surpipe eval``: questions for every prompt (the user's file first,
then templates for action/color/counting, then the question LM for the rest), cached in
``OUT/questions.jsonl``; the judges' answers for both arms in ``OUT/judgements.jsonl``; accuracy per
category, judge and arm with bootstrap intervals (surpipe.evaluation.accuracy)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from surpipe.config import atomic_write_text, opt
from surpipe.devices import resolve_device
from surpipe.evaluation import accuracy, questions as Q
from surpipe.evaluation.judges import DetectorJudge, VQAJudge
from surpipe.evaluation.question_lm import generate_questions
from surpipe.hub import check_model_source
from surpipe.logs import get_logger

log = get_logger()


_HELP = {
    "vqa_model": "Semantic accuracy: a VQA model (BLIP-VQA; folder or hub id, e.g. Salesforce/blip-vqa-base) answers "
                 "each prompt's questions about both arms' images (off when not given).",
    "detector_model": "Semantic accuracy: an open-vocabulary detector (OWLv2/OWL-ViT, e.g. "
                      "google/owlv2-base-patch16-ensemble) counts the objects of counting questions.",
    "questions": "Question file (JSONL: prompt, question, answer; optional kind, object); before the built-in "
                 "questions of action, color and counting prompts.",
    "question_model": "A local instruction-following LM (folder or hub id) that writes questions for prompts with "
                      "none from the file or the templates (narrative prompts).",
}


@dataclass(kw_only=True)
class JudgeOptions:
    """``surpipe eval``'s options for semantic accuracy (declared beside the code that reads them)."""

    vqa_model: Optional[str] = opt(None, group="model", help=_HELP["vqa_model"])
    detector_model: Optional[str] = opt(None, group="model", help=_HELP["detector_model"])
    detector_threshold: float = opt(0.3, help="Score above which a detected box counts.", group="inference",
                                    gt=0, lt=1)
    questions: Optional[str] = opt(None, group="data", help=_HELP["questions"])
    question_model: Optional[str] = opt(None, group="model", help=_HELP["question_model"])
    question_quant: Literal["none", "8bit", "4bit"] = opt("4bit", help="Quantization of --question-model.",
                                                          group="model")
    bootstrap: int = opt(2000, help="Bootstrap draws (over prompts) of the accuracy intervals.", group="output",
                         ge=100, le=1_000_000)


def wanted(cfg) -> bool:
    """Whether ``cfg`` (an EvalConfig) asks for semantic accuracy (a VQA model or a detector)."""
    return bool(cfg.vqa_model or cfg.detector_model)


def precheck(cfg) -> None:
    """What can be refused before any image is rendered: each judge and question model's source, and
    the question file's lines."""
    for value, option, what in ((cfg.vqa_model, "--vqa-model", "VQA model"),
                                (cfg.detector_model, "--detector-model", "detector"),
                                (cfg.question_model, "--question-model", "question LM")):
        if value:
            check_model_source(value, option=option, what=what)
    if cfg.questions:
        Q.read_question_file(cfg.questions)


def question_set(cfg, items, cache: Path) -> dict[str, list[Q.Question]]:
    """{prompt: questions} of the eval's prompts, from the cache when it holds them all."""
    from_file = Q.read_question_file(cfg.questions) if cfg.questions else {}

    def make(missing):
        out = {p: from_file.get(p) or Q.template_questions(c, p) for c, p in missing}
        rest = [(c, p) for c, p in missing if not out[p]]
        if rest and cfg.question_model:
            out.update(generate_questions(cfg.question_model, rest, quant=cfg.question_quant,
                                          device=resolve_device(cfg.device)))
        return out

    qs = Q.cached(cache, [(it[0], it[2]) for it in items], make)
    none = sorted({it[2] for it in items if not qs.get(it[2])})
    if none:
        log.info(f"semantic accuracy: {len(none)} prompt(s) have no question and are not judged "
                 f"(give --questions FILE or --question-model LM): {', '.join(none[:3])}" + (" ..." if len(none) > 3 else ""))
    return qs


def load_judges(cfg) -> tuple:
    """(VQA judge or None, detector or None) of ``cfg``: loaded before any image is rendered, so a
    wrong or mismatched model costs nothing."""
    device = resolve_device(cfg.device)
    vqa = VQAJudge(cfg.vqa_model, device=device) if cfg.vqa_model else None
    det = DetectorJudge(cfg.detector_model, device=device, threshold=cfg.detector_threshold) \
        if cfg.detector_model else None
    return vqa, det


def semantic_accuracy(cfg, items, images: dict, out: Path, judges: tuple) -> Optional[dict]:
    """Judge both arms' images with ``judges`` (:func:`load_judges`); returns the ``accuracy``
    section of results.json (None: nothing judged)."""
    qs = question_set(cfg, items, out / "questions.jsonl")
    vqa, det = judges
    records = accuracy.judge(items, images, qs, vqa=vqa, detector=det)
    atomic_write_text(out / "judgements.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if not records:
        return None
    table = accuracy.table(records, n_boot=cfg.bootstrap, seed=0)
    table["judges"] = {"vqa": cfg.vqa_model, "detector": cfg.detector_model,
                       "detector_threshold": cfg.detector_threshold if det else None}
    table["questions"] = {"file": cfg.questions, "model": cfg.question_model,
                          "count": sum(len(v) for v in qs.values())}
    return table
