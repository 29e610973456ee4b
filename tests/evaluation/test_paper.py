"""The paper-layout table (surpipe.evaluation.paper) from hand-made results, and the preference filled in place."""

import json

from surpipe.evaluation import paper


def _results():
    s = lambda w, x: {"without": w, "with": x, "difference": x - w}  # noqa: E731
    rows = [{"category": "action", "judge": "vqa", **s(0.5, 0.75)}, {"category": "color", "judge": "vqa", **s(0.25, 0.5)},
            {"category": "counting", "judge": "vqa", **s(0.1, 0.2)},
            {"category": "counting", "judge": "detector", **s(0.3, 0.6)}]
    return {"overall": s(20.0, 21.5), "clip_iqa": {"overall": s(0.5, 0.625)}, "accuracy": {"rows": rows}}


def test_table_rows_in_the_papers_layout():
    t = paper.table(_results())
    assert "| Stable Diffusion | 50.0 | 25.0 | 30.0 | 20.00 | 0.500 | n/a |" in t  # counting: the detector's
    assert "| + SUR-adapter | 75.0 | 50.0 | 60.0 | 21.50 | 0.625 | n/a |" in t
    assert "| difference | +25.0 | +25.0 | +30.0 | +1.50 | +0.125 | |" in t
    assert "counting detector" in t
    assert "| Stable Diffusion | n/a | n/a | n/a | 20.00 | n/a | n/a |" in paper.table({"overall": _results()["overall"]})


def test_preference_filled_in_place(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    (tmp_path / "results.md").write_text("# Title\n\n- model: m\n\n## CLIP score\n\n| table |\n")
    paper.fill_preference(tmp_path, None)
    md = (tmp_path / "results.md").read_text()
    assert md.index(paper.BEGIN) < md.index("## CLIP score") and md.startswith("# Title")
    pref = {"categories": {"all": {"preference": 0.75, "ci95": [0.5, 0.9]}}}
    paper.fill_preference(tmp_path, pref)
    md = (tmp_path / "results.md").read_text()
    assert md.count(paper.BEGIN) == 1 and "| + SUR-adapter | 75.0 | 50.0 | 60.0 | 21.50 | 0.625 | 75.0% [50.0, 90.0] |" in md
    assert "| 25.0% |" in md and json.loads((tmp_path / "results.json").read_text())["preference"] == pref
