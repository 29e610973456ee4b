"""Semantic accuracy (surpipe.evaluation.questions, accuracy): questions read off the prompts, answers
checked, and the scoring, pairing and bootstrap intervals against hand-made answers from stub judges."""

import json

import numpy as np
import pytest
from PIL import Image

from surpipe.errors import SurpipeError
from surpipe.evaluation import accuracy as A
from surpipe.evaluation import questions as Q


@pytest.mark.parametrize("category, prompt, want", [
    ("counting", "three cats sitting on a sofa", [("How many cats are there?", "3", "count", "cats")]),
    ("counting", "one red balloon in the sky", [("How many balloon are there?", "1", "count", "balloon")]),
    ("counting", "6 candles", [("How many candles are there?", "6", "count", "candles")]),
    ("color", "a green apple next to a red mug", [("What color is the apple?", "green", "color", "apple"),
                                                  ("What color is the mug?", "red", "color", "mug")]),
    ("action", "a dog jumping over a fence", [("Is the dog jumping?", "yes", "yesno", "dog")]),
    ("action", "a chef cutting vegetables on a wooden board", [("Is the chef cutting?", "yes", "yesno", "chef")]),
    ("narrative", "a quiet morning in an old village", []),
    ("counting", "a cat", []),  # no number: nothing to count
])
def test_template_questions(category, prompt, want):
    got = [(q.question, q.answer, q.kind, q.object) for q in Q.template_questions(category, prompt)]
    assert got == want


@pytest.mark.parametrize("kind, answer, reply, ok", [
    ("count", "3", "three", True), ("count", "3", "There are 3.", True), ("count", "3", "2", False),
    ("count", "3", "", False), ("yesno", "yes", "Yes, it is", True), ("yesno", "yes", "no", False),
    ("color", "gray", "grey", True), ("color", "red", "a red one", True), ("color", "red", "blue and red", False),
    ("fact", "a lighthouse", "the lighthouse on a cliff", True), ("fact", "lighthouse", "house", False),
])
def test_answers_are_checked_by_kind(kind, answer, reply, ok):
    assert Q.correct(Q.Question("p", "q?", answer, kind), reply) is ok


def test_question_file_and_cache(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"prompt": "a storm at sea", "question": "Is there a ship?", "answer": "yes"}) + "\n"
                 + json.dumps({"prompt": "a storm at sea", "question": "How many ships?", "answer": "one"}) + "\n")
    qs = Q.read_question_file(f)
    assert [(q.kind, q.source) for q in qs["a storm at sea"]] == [("yesno", "file"), ("count", "file")]
    f.write_text('{"prompt": "x"}\nnot json\n' + json.dumps({"prompt": "x", "question": "?", "answer": "a",
                                                              "kind": "poem"}) + "\n")
    with pytest.raises(SurpipeError) as e:
        Q.read_question_file(f)
    assert "line 1" in str(e.value) and "line 2" in str(e.value) and "kind 'poem'" in str(e.value)
    calls = []

    def make(missing):
        calls.append(list(missing))
        return {p: Q.template_questions(c, p) for c, p in missing}

    cache = tmp_path / "questions.jsonl"
    pairs = [("counting", "two dogs"), ("color", "a red car")]
    first = Q.cached(cache, pairs, make)
    again = Q.cached(cache, pairs, make)  # every prompt cached: nothing made again
    assert first == again and len(calls) == 1 and first["two dogs"][0].answer == "2"


def _img(tag):
    im = Image.new("RGB", (4, 4))
    im.info["tag"] = tag
    return im


class StubVQA:
    """Answers from a table keyed by (image tag, question)."""

    def __init__(self, table):
        self.table, self.calls = table, 0

    def answer(self, images, questions):
        self.calls += 1
        return [self.table.get((im.info["tag"], q), "no idea") for im, q in zip(images, questions)]


class StubDetector:
    def __init__(self, counts):
        self.counts = counts

    def count(self, images, objects):
        return [self.counts.get(im.info["tag"], 0) for im in images]


def test_the_same_question_twice_in_a_prompt_counts_twice():
    prompt = "a red car next to a blue car"
    qs = {prompt: Q.template_questions("color", prompt)}
    assert [(q.question, q.answer) for q in qs[prompt]] == [("What color is the car?", "red"),
                                                          ("What color is the car?", "blue")]
    items = [("color", 0, prompt, 0)]
    images = {arm: [_img(arm)] for arm in A.ARMS}
    vqa = StubVQA({("with", "What color is the car?"): "red", ("without", "What color is the car?"): "green"})
    t = A.table(A.judge(items, images, qs, vqa=vqa), n_boot=100)
    row = t["rows"][0]
    assert row["questions"] == 2 and row["with"] == 0.5 and row["without"] == 0.0


def test_scoring_pairs_arms_and_matches_hand_counts():
    prompts = {"counting": ["two dogs", "three cats"], "color": ["a red car"]}
    items = [(c, i, p, s) for c, ps in prompts.items() for i, p in enumerate(ps) for s in (0, 1)]
    images = {arm: [_img(f"{arm}:{p}:{s}") for _, _, p, s in items] for arm in A.ARMS}
    qs = {p: Q.template_questions(c, p) for c, ps in prompts.items() for p in ps}
    # with the adapter: right everywhere but "three cats" seed 1; without: right only on the car, seed 0
    table = {}
    for _, _, p, s in items:
        for q in qs[p]:
            table[(f"with:{p}:{s}", q.question)] = q.answer if (p, s) != ("three cats", 1) else "7"
            table[(f"without:{p}:{s}", q.question)] = q.answer if (p, s) == ("a red car", 0) else "green"
    counts = {f"with:two dogs:{s}": 2 for s in (0, 1)} | {"without:three cats:0": 3}
    recs = A.judge(items, images, qs, vqa=StubVQA(table), detector=StubDetector(counts))
    assert len(recs) == 2 * (6 + 4)  # arms x (vqa: 6 images, one question each; detector: 4 counting images)
    t = A.table(recs, n_boot=500, seed=1)
    rows = {(r["category"], r["judge"]): r for r in t["rows"]}
    c_vqa, c_det, col = rows[("counting", "vqa")], rows[("counting", "detector")], rows[("color", "vqa")]
    assert (c_vqa["with"], c_vqa["without"], c_vqa["difference"]) == (0.75, 0.0, 0.75)
    assert (c_det["with"], c_det["without"], c_det["difference"]) == (0.5, 0.25, 0.25)
    assert (col["with"], col["without"], col["prompts"], col["questions"]) == (1.0, 0.5, 1, 2)
    assert t["overall"]["vqa"]["with"] == pytest.approx(5 / 6) and t["overall"]["vqa"]["without"] == pytest.approx(1 / 6)
    # one prompt: every bootstrap draw is that prompt, the interval is the point
    assert col["with_ci95"] == [1.0, 1.0] and col["difference_ci95"] == [0.5, 0.5]
    # the bootstrap against a plain loop over the same draws
    rng = np.random.default_rng(1)
    per = {"two dogs": ([0, 0], [1, 1]), "three cats": ([0, 0], [1, 0])}
    names = list(per)
    draws = rng.integers(0, 2, size=(500, 2))
    diffs = []
    for d in draws:
        w0 = sum(sum(per[names[i]][0]) for i in d) / (2 * len(d))
        w1 = sum(sum(per[names[i]][1]) for i in d) / (2 * len(d))
        diffs.append(w1 - w0)
    assert c_vqa["difference_ci95"] == pytest.approx([np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)])
    md = A.markdown(t)
    assert "| counting | detector | 2 | 4 | 0.250" in md and "| **all** | vqa |" in md


def test_question_lm_lines_are_parsed_and_malformed_ones_dropped():
    from surpipe.evaluation.question_lm import parse

    text = ("Q: Is there a ship? A: yes\nQ: How many waves? A: three.\nrandom words\nQ: no question mark A: x\n"
            "Q: What color is the sky? A: gray\n")
    qs, dropped = parse("a storm", text, limit=2)
    assert [(q.question, q.answer, q.kind) for q in qs] == [("Is there a ship?", "yes", "yesno"),
                                                           ("How many waves?", "three", "count")]
    assert dropped == 3 and all(q.source == "lm" for q in qs)


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    from surpipe.tiny.judges import build_tiny_blip_vqa, build_tiny_owlv2

    root = tmp_path_factory.mktemp("judges")
    return build_tiny_blip_vqa(root / "vqa"), build_tiny_owlv2(root / "owl")


def test_eval_judges_end_to_end_on_tiny_models(tiny_models, judges, tmp_path, monkeypatch):
    """Every judge on tiny random models: the tiny LLM writes questions for the narrative prompt, a
    question file covers another, templates the rest; BLIP-VQA and OWLv2 answer; results, judgements
    and the question cache are written; a rerun judges on the cached questions without the LM."""
    import torch

    from stages.cli import main
    from surpipe.adapter import SURAdapter
    from surpipe.evaluation import semantic

    torch.manual_seed(0)
    adapter = SURAdapter(width=32, nhead=4, dim_feedforward=64, adapter_weight=0.5).save_pretrained(tmp_path / "ad")
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps({"category": c, "prompt": p}) + "\n" for c, p in [
        ("counting", "two dogs in a field"), ("color", "a red car"), ("action", "a dog jumping over a fence"),
        ("narrative", "an old lighthouse keeper at dusk"), ("narrative", "a storm over the harbour")]))
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"prompt": "a storm over the harbour", "question": "Is there a boat?",
                                 "answer": "yes"}) + "\n")
    vqa, owl = judges
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_models / "sd"), "--adapter", str(adapter), "--clip-model",
            str(tiny_models / "clip"), "--out", str(out), "--steps", "2", "--size", "32", "--prompts", str(suite),
            "--seeds", "0,1", "--vqa-model", str(vqa), "--detector-model", str(owl), "--detector-threshold", "0.05",
            "--questions", str(qfile), "--question-model", str(tiny_models / "llm"), "--question-quant", "none",
            "--bootstrap", "200", "--no-iqa"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    acc = res["accuracy"]
    cached = [json.loads(l) for l in (out / "questions.jsonl").read_text().splitlines()]
    sources = {q["prompt"]: q.get("source") for q in cached}
    assert sources["a storm over the harbour"] == "file" and sources["two dogs in a field"] == "template"
    recs = [json.loads(l) for l in (out / "judgements.jsonl").read_text().splitlines()]
    n_q = {p: sum(1 for q in cached if q["prompt"] == p and not q.get("none")) for p in sources}
    assert set(sources) == {json.loads(l)["prompt"] for l in suite.read_text().splitlines()}  # all cached
    vqa_recs = [r for r in recs if r["judge"] == "vqa"]
    assert len(vqa_recs) == 2 * 2 * sum(n_q.values())  # arms x seeds x questions
    assert len([r for r in recs if r["judge"] == "detector"]) == 2 * 2 * 1  # the one counting question
    rows = {(r["category"], r["judge"]): r for r in acc["rows"]}
    assert ("counting", "detector") in rows and ("counting", "vqa") in rows and ("color", "vqa") in rows
    for (cat, j), r in rows.items():
        mine = [x for x in recs if x["category"] == cat and x["judge"] == j]
        assert r["with"] == pytest.approx(np.mean([x["correct"] for x in mine if x["arm"] == "with"]))
        assert r["without_ci95"][0] <= r["without"] <= r["without_ci95"][1]
    assert "## Semantic accuracy" in (out / "results.md").read_text()
    # the rerun reads the cached questions: the question LM is never loaded again
    monkeypatch.setattr(semantic, "generate_questions", lambda *a, **k: pytest.fail("questions regenerated"))
    before = (out / "questions.jsonl").read_text()
    assert main(args) == 0
    assert (out / "questions.jsonl").read_text() == before


def test_bad_judge_or_question_file_is_refused_before_any_image(tiny_models, tmp_path, monkeypatch, capsys):
    import torch

    from stages.cli import main
    from surpipe.adapter import SURAdapter
    from surpipe.evaluation import generate

    torch.manual_seed(0)
    adapter = SURAdapter(width=32, nhead=4, dim_feedforward=64).save_pretrained(tmp_path / "ad")
    monkeypatch.setattr(generate, "render_arms", lambda *a, **k: pytest.fail("rendered before refusing"))
    base = ["eval", "--model", str(tiny_models / "sd"), "--adapter", str(adapter), "--clip-model",
            str(tiny_models / "clip"), "--out", str(tmp_path / "ev"), "--steps", "2", "--size", "32"]
    assert main(base + ["--vqa-model", str(tmp_path / "no-such-vqa")]) == 1
    assert "--vqa-model" in capsys.readouterr().err
    bad = tmp_path / "q.jsonl"
    bad.write_text("not json\n")
    assert main(base + ["--vqa-model", str(tiny_models / "clip"), "--questions", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "question file" in err and "line 1" in err and "Traceback" not in err
    assert main(base + ["--vqa-model", str(tiny_models / "clip")]) == 1  # a model, but not a VQA one
    err = capsys.readouterr().err
    assert "is a 'clip' model, not a VQA model (BLIP-VQA); valid model types: blip" in err and "Traceback" not in err
