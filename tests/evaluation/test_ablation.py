"""Ablation tables (surpipe.evaluation.ablation): cells from hand-made results, and ``surpipe eval
--ablation`` end to end on tiny models with the no-adapter arm rendered once."""

import json

import pytest

from surpipe.evaluation import ablation


def _res(diff, sem, acc_diff):
    s = {"n_images": 4, "without": 20.0, "with": 20.0 + diff, "difference": diff, "difference_sem": sem}
    return {"categories": {"color": s}, "overall": s,
            "accuracy": {"rows": [{"category": "color", "judge": "vqa", "without": 0.5, "with": 0.5 + acc_diff,
                                   "difference": acc_diff, "difference_ci95": [acc_diff - 0.1, acc_diff + 0.2]}],
                         "overall": {"vqa": {"without": 0.5, "with": 0.5 + acc_diff, "difference": acc_diff,
                                             "difference_ci95": [acc_diff - 0.1, acc_diff + 0.2]}}}}


def test_cells_and_table_from_hand_made_results(tmp_path):
    rows = [{"run": "l10", **ablation.cells(_res(1.0, 0.5, 0.25))}, {"run": "l39", **ablation.cells(_res(-2.0, 0.0, 0.0))}]
    c = rows[0]["cells"]["CLIP score | color"]
    assert c["difference"] == 1.0 and c["ci95"] == pytest.approx([1.0 - 1.959964 * 0.5, 1.0 + 1.959964 * 0.5])
    assert rows[1]["cells"]["CLIP score | all"]["ci95"] == [-2.0, -2.0]
    assert rows[0]["cells"]["accuracy (vqa) | all"]["ci95"] == [0.15, 0.45]
    table = {"rows": rows, "metrics": ablation.metric_columns(rows)}
    md = ablation.markdown(table)
    assert "| l10 | +1.000 [+0.020, +1.980] |" in md and "| l39 | -2.000 [-2.000, -2.000] |" in md
    assert table["metrics"] == ["CLIP score | color", "CLIP score | all", "accuracy (vqa) | color",
                                "accuracy (vqa) | all"]
    ablation.chart(table, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_labels_are_unique_and_file_safe(tmp_path):
    taken = set()
    a, b = tmp_path / "runs" / "l10 run", tmp_path / "other" / "l10 run"
    assert ablation.label(str(a), taken) == "l10_run" and ablation.label(str(b), taken) == "l10_run-2"
    assert ablation.label(str(tmp_path / "r" / "adapter"), taken) == "r-adapter"


def test_eval_ablation_end_to_end_renders_the_no_adapter_arm_once(tiny_models, tmp_path, monkeypatch):
    import torch

    from stages.cli import main
    from surpipe.adapter import SURAdapter
    from surpipe.evaluation import generate

    ads = []
    for i, w in enumerate((0.5, 0.0)):
        torch.manual_seed(i)
        ads.append(SURAdapter(width=32, nhead=4, dim_feedforward=64, adapter_weight=w).save_pretrained(
            tmp_path / f"run{i}" / "adapter"))
    calls = []
    real = generate.render_arms
    monkeypatch.setattr(generate, "render_arms", lambda m, p, arms, **k: (calls.append(tuple(arms)),
                                                                         real(m, p, arms=arms, **k))[1])
    out = tmp_path / "abl"
    assert main(["eval", "--model", str(tiny_models / "sd"), "--adapter", str(ads[0]), "--ablation", str(ads[1]),
                 "--clip-model", str(tiny_models / "clip"), "--out", str(out), "--steps", "2", "--size", "32",
                 "--max-prompts-per-category", "1", "--categories", "color", "--categories", "counting"]) == 0
    assert calls == [("without", "with"), ("with",)]
    table = json.loads((out / "ablation.json").read_text())
    assert [r["run"] for r in table["rows"]] == ["run0-adapter", "run1-adapter"]
    for r in table["rows"]:
        res = json.loads((out / r["results"]).read_text())
        assert r["cells"]["CLIP score | all"]["difference"] == res["overall"]["difference"]
    # adapter_weight 0 gives the no-adapter image: no difference, exactly
    assert table["rows"][1]["cells"]["CLIP score | all"]["difference"] == 0.0
    assert "CLIP-IQA | all" in table["metrics"] and (out / "ablation.png").is_file()
    assert "| run0-adapter |" in (out / "ablation.md").read_text()


def test_a_missing_ablation_adapter_is_refused_before_any_image(tiny_models, tmp_path, monkeypatch, capsys):
    import torch

    from stages.cli import main
    from surpipe.adapter import SURAdapter
    from surpipe.evaluation import generate

    torch.manual_seed(0)
    ad = SURAdapter(width=32, nhead=4, dim_feedforward=64).save_pretrained(tmp_path / "run0" / "adapter")
    monkeypatch.setattr(generate, "render_arms", lambda *a, **k: pytest.fail("rendered before refusing"))
    assert main(["eval", "--model", str(tiny_models / "sd"), "--adapter", str(ad), "--ablation",
                 str(tmp_path / "nope"), "--clip-model", str(tiny_models / "clip"), "--out", str(tmp_path / "abl"),
                 "--steps", "2", "--size", "32"]) == 1
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
