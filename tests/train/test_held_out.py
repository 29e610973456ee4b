"""Held-out numbers end to end on the bundled sample (random tiny models: nothing meaningful can be
learned there, so nothing may be reported as learned): the summary prints retrieval beside its
controls and no gain that step 0, a scaled input or a constant already had; --keep-best keeps the
best adapter chosen on the selection part; ``surpipe eval --store`` reproduces the training run's
last held-out numbers for the finished adapter, per category, and reports a --keep-best run on the
report part only."""

import json
import math

import numpy as np
import pytest

from helpers import REPO, run_cli, run_cli_err

STEPS = 40


@pytest.fixture(scope="module")
def sample_run(tiny_models, tmp_path_factory):
    """The bundled sample's store (both stage-one commands) and one short training run on it with a
    quarter of the rows held out, prompt and LLM weights 1 and --keep-best."""
    root = tmp_path_factory.mktemp("held_out")
    store, run = root / "s.zarr", root / "run"
    data = REPO / "data" / "sample"
    assert run_cli_err("extract-llm", "--data", data, "--store", store, "--model", tiny_models / "llm",
                       "--layers", "3", "--quant", "none", "--no-progress", "--block-rows", "16")[0] == 0
    assert run_cli_err("encode-latents", "--data", data, "--store", store, "--model", tiny_models / "sd",
                       "--workers", "0", "--no-progress")[0] == 0
    rc, out, err = run_cli(
        "train", "--store", store, "--model", tiny_models / "sd", "--llm-layer", "3", "--out", run,
        "--max-steps", STEPS, "--batch-size", "4", "--grad-accum", "1", "--learning-rate", "1e-3", "--nhead", "4",
        "--dim-feedforward", "128", "--workers", "0", "--device", "cpu", "--no-progress", "--no-loss-curve",
        "--val-fraction", "0.25", "--validation-every", "20", "--no-validation-images",
        "--prompt-weight", "1", "--llm-weight", "1")
    assert rc == 0, err
    return store, run, out


@pytest.fixture(scope="module")
def best_run(sample_run, tiny_models):
    """A shorter run on the same store with --keep-best."""
    store, run, _ = sample_run
    best = run.parent / "best_run"
    rc, out, err = run_cli(
        "train", "--store", store, "--model", tiny_models / "sd", "--llm-layer", "3", "--out", best,
        "--max-steps", 10, "--batch-size", "4", "--grad-accum", "1", "--learning-rate", "1e-3", "--nhead", "4",
        "--dim-feedforward", "128", "--workers", "0", "--device", "cpu", "--no-progress", "--no-loss-curve",
        "--val-fraction", "0.25", "--validation-every", "5", "--no-validation-images", "--keep-best",
        "--prompt-weight", "1", "--llm-weight", "1")
    assert rc == 0, err
    return store, best, out


def _val_rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"val/' in l]


def test_summary_reports_retrieval_beside_controls_and_no_gain(sample_run):
    store, run, printed = sample_run
    val = _val_rows(run)
    assert [r["step"] for r in val] == [0, 20, STEPS]  # the untrained adapter first
    assert not (run / "validation").exists()  # --no-validation-images: losses only
    first, last = val[0], val[-1]
    base = first["val/prompt_baseline"]
    # fixed noise, no adapter: the raw embedding's numbers never move, nor do chance's
    for k in ("val/prompt_baseline", "val/cos_baseline", "val/r1_raw", "val/median_rank_raw", "val/r1_chance",
              "val/prompt_scaled", "val/prompt_const", "val/cos_const"):
        assert all(r[k] == first[k] for r in val), k
    print("held-out:", json.dumps(val, indent=1))
    n = json.loads((run / "config.json").read_text())["_surpipe"]["run"]["split"]["count"]
    assert 8 <= n <= 24  # about a quarter of the 64 rows
    assert last["val/r1_chance"] == pytest.approx(1 / n) and last["val/median_rank_chance"] == (n + 1) / 2
    assert f"held-out ({n} rows, step {STEPS})" in printed
    for words in ("R@1", "raw embedding", "shuffled inputs", "chance", "median rank", "best scaled input",
                  "constant", f"untrained {first['val/r1']:.3f}", f"untrained {first['val/prompt']:.4f}"):
        assert words in printed, words
    assert "gain" not in printed and "learned)" not in printed
    # what the verdicts say follows from the numbers printed beside them
    from surpipe.train.validation.summary import margin

    best = max(last["val/r1_raw"], last["val/r1_shuffled"], last["val/r1_chance"], first["val/r1"])
    learned = last["val/r1"] - best > margin(best, n)
    assert ("input-dependent alignment learned (" in printed) == learned
    assert ("no input-dependent alignment learned" in printed) == (not learned)
    scaled_reaches = last["val/prompt_scaled"] <= last["val/prompt"]
    assert ("a scaled copy of the input" in printed) == scaled_reaches
    assert base > 0


def test_keep_best_keeps_the_lowest_score_of_the_selection_part(best_run, tmp_path):
    from surpipe.adapter import SURAdapter

    store, run, printed = best_run
    trained = [r for r in _val_rows(run) if r["step"] > 0]  # step 0 (untrained) is never "best"
    best = min(trained, key=lambda r: r["val/select_score"])
    note = json.loads((run / "best" / "best.json").read_text())
    assert note["step"] == best["step"] and math.isclose(note["score"], best["val/select_score"], rel_tol=1e-12)
    split = json.loads((run / "config.json").read_text())["_surpipe"]["run"]["split"]
    assert split["selection"]["count"] + split["report"]["count"] == split["count"]
    assert split["selection"]["count"] > 0 and split["report"]["count"] > 0
    # eval --store reports on the report part only, and says so
    rc, out, err = run_cli("eval", "--store", store, "--adapter", run / "best", "--no-clip-score", "--device", "cpu")
    assert rc == 0, err
    assert "report part of the run's held-out rows" in out and f": {split['report']['count']} rows of" in out
    assert (run / "best" / "llm_projection.safetensors").is_file()
    SURAdapter.from_pretrained(run / "best")  # a loadable adapter folder
    assert "best held-out adapter" in printed
    if best["step"] == 10:  # then it holds the final adapter's weights
        from safetensors.torch import load_file

        a, b = load_file(run / "best" / "model.safetensors"), load_file(run / "adapter" / "model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_eval_store_reproduces_the_runs_held_out_numbers_per_category(sample_run, tmp_path):
    from surpipe.store import FeatureStore

    store, run, _ = sample_run
    rc, out, err = run_cli("eval", "--store", store, "--adapter", run, "--no-clip-score", "--out", tmp_path / "ev",
                           "--device", "cpu")
    assert rc == 0, err
    held = json.loads((tmp_path / "ev" / "held_out.json").read_text())
    last = _val_rows(run)[-1]
    n = json.loads((run / "config.json").read_text())["_surpipe"]["run"]["split"]["count"]
    assert held["scope"] == "the run's held-out rows" and held["rows"] == n
    for k, v in last.items():
        if k.startswith("val/"):
            # eval recomputes what training logged, float32, other process and batch grouping: sums of
            # per-row terms in another order, ~eps x log(rows); 1e-5 leaves a wide margin
            assert math.isclose(held["categories"]["all"][k], v, rel_tol=1e-5, abs_tol=1e-6), k
    first = _val_rows(run)[0]  # the untrained adapter (RUN/untrained) reproduces the step-0 row
    for k in ("val/prompt", "val/cos_adapter", "val/r1", "val/median_rank"):
        untrained = k.replace("_adapter", "") + "_untrained"
        assert math.isclose(held["categories"]["all"][untrained], first[k], rel_tol=1e-5, abs_tol=1e-6), k
    cats = FeatureStore(store).categories()
    if cats is not None:  # per category: the rows add up, each mean inside the overall range
        per = {c: s for c, s in held["categories"].items() if c != "all"}
        assert set(per) <= {"action", "color", "counting", "narrative"} and sum(s["rows"] for s in per.values()) == n
    assert f"| all | {n} |" in out and "Held-out alignment" in (tmp_path / "ev" / "held_out.md").read_text()
    assert json.loads((tmp_path / "ev" / "config.json").read_text())["store"] == str(store)


def test_eval_store_refusals(sample_run, tiny_models, tmp_path):
    store, run, _ = sample_run
    rc, err = run_cli_err("eval", "--adapter", run, "--no-clip-score")
    assert rc == 1 and "nothing to do" in err and "Traceback" not in err
    rc, err = run_cli_err("eval", "--adapter", run, "--store", store)  # CLIP score on, no --out
    assert rc == 1 and "--out" in err
    # a plain adapter folder (no run beside it) on the store: every row, and --model is needed
    import shutil

    plain = shutil.copytree(run / "adapter", tmp_path / "plain")
    rc, err = run_cli_err("eval", "--adapter", plain, "--store", store, "--no-clip-score")
    assert rc == 1 and "give --model" in err
    rc, out, err = run_cli("eval", "--adapter", plain, "--store", store, "--no-clip-score", "--model",
                           tiny_models / "sd", "--device", "cpu")
    assert rc == 0, err
    assert "every row of the store" in out and "| all | 64 |" in out


def test_keep_best_needs_a_split(tiny_models, train_store, tmp_path):
    rc, err = run_cli_err("train", "--store", train_store, "--model", tiny_models / "sd", "--llm-layer", "3",
                          "--out", tmp_path / "r", "--nhead", "4", "--keep-best", "--no-progress")
    assert rc == 1 and "--keep-best" in err and "--val-rows" in err
    assert not (tmp_path / "r").exists()


def test_eval_store_from_a_checkpoint_uses_its_run_and_projection(sample_run, tmp_path):
    store, run, _ = sample_run
    ckpt = run / "checkpoints" / f"step-{STEPS:08d}"
    assert ckpt.is_dir()
    rc, out, err = run_cli("eval", "--store", store, "--adapter", ckpt, "--no-clip-score", "--out", tmp_path / "ev",
                           "--device", "cpu")
    assert rc == 0, err
    held = json.loads((tmp_path / "ev" / "held_out.json").read_text())
    assert held["scope"] == "the run's held-out rows" and held["projection"].startswith("projection.safetensors")
    last = _val_rows(run)[-1]
    assert math.isclose(held["categories"]["all"]["val/llm"], last["val/llm"], rel_tol=1e-5)  # as above


def test_eval_store_refuses_a_run_with_a_damaged_config(sample_run, tmp_path):
    import shutil

    store, run, _ = sample_run
    copy = tmp_path / "run"
    shutil.copytree(run / "adapter", copy / "adapter")
    (copy / "metrics.jsonl").write_text("")
    (copy / "config.json").write_text("{not json")
    rc, err = run_cli_err("eval", "--store", store, "--adapter", copy, "--no-clip-score", "--model", "x")
    assert rc == 1 and "unreadable" in err and "Traceback" not in err


def test_eval_store_after_growth_leaves_the_training_rows_out(tiny_models, tmp_path):
    """A run trained on 48 rows; the store then grows to 64: the held-out report covers the run's
    held-out rows and the 16 new ones, never a training row."""
    import shutil

    from surpipe.store import FeatureStore

    src = REPO / "data" / "sample"
    lines = (src / "metadata.jsonl").read_text().splitlines()
    small = tmp_path / "small"
    (small / "images").mkdir(parents=True)
    for line in lines[:48]:
        shutil.copy(src / json.loads(line)["file_name"], small / json.loads(line)["file_name"])
    (small / "metadata.jsonl").write_text("\n".join(lines[:48]) + "\n")
    store, run = tmp_path / "s.zarr", tmp_path / "run"

    def stage_one(data):
        for cmd in (["extract-llm", "--model", tiny_models / "llm", "--layers", "3", "--quant", "none",
                     "--block-rows", "16"],
                    ["encode-latents", "--model", tiny_models / "sd", "--workers", "0"]):
            rc, err = run_cli_err(cmd[0], "--data", data, "--store", store, "--no-progress", *cmd[1:])
            assert rc == 0, err

    stage_one(small)
    rc, _, err = run_cli("train", "--store", store, "--model", tiny_models / "sd", "--llm-layer", "3", "--out", run,
                         "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--nhead", "4",
                         "--dim-feedforward", "64", "--workers", "0", "--device", "cpu", "--no-progress",
                         "--no-loss-curve", "--val-fraction", "0.25")
    assert rc == 0, err
    held_keys = set()
    keys48 = FeatureStore(store).keys()
    from surpipe.train.validation.split import held_out_rows

    held_keys = {str(k) for k in keys48[held_out_rows(keys48, fraction=0.25, seed=0)]}
    stage_one(src)  # grows the store to 64 rows
    fs = FeatureStore(store)
    assert fs.num_samples == 64
    rc, out, err = run_cli("eval", "--store", store, "--adapter", run, "--no-clip-score", "--device", "cpu",
                           "--out", tmp_path / "ev")
    assert rc == 0, err
    held = json.loads((tmp_path / "ev" / "held_out.json").read_text())
    assert held["rows"] == len(held_keys) + 16
    assert "training rows of this store left out" in held["scope"]
