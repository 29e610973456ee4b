"""The user-preference study (surpipe.evaluation.study, ``surpipe study make/tally``): the statistics
against hand values, the blind page's key against scripted answers, and the page itself in a real
headless Chromium (Debian's chromium + chromedriver, driven by Selenium): every pair answered with the
keyboard, the answers exported as a download, tallied, and the tally checked against the keys pressed."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from helpers import png_bytes, run_cli, run_cli_err
from surpipe.evaluation import study

CATS = {"color": ["a red cube", "a blue ball", "a green cup"], "counting": ["two dogs", "three cats"]}


def _eval_dir(root: Path, seeds=(0, 1)) -> Path:
    """An eval --out folder as `surpipe eval` writes it: scores.jsonl and both arms' images."""
    ev = root / "eval"
    rows = []
    for cat, prompts in CATS.items():
        for i, prompt in enumerate(prompts):
            for seed in seeds:
                for arm, color in (("without", (200, 30, 30)), ("with", (30, 30, 200))):
                    rel = f"images/{cat}/{i:03d}_s{seed}_{arm}.png"
                    (ev / rel).parent.mkdir(parents=True, exist_ok=True)
                    (ev / rel).write_bytes(png_bytes((16, 16), color))
                    rows.append({"category": cat, "prompt": prompt, "seed": seed, "adapter": arm == "with",
                                 "clip_score": 20.0, "file": rel})
    (ev / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ev


def test_wilson_interval_against_hand_values():
    lo, hi = study.wilson(8, 10)  # p = 0.8, z = 1.96: (0.4902, 0.9433)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    assert study.wilson(0, 5)[0] == 0.0 and study.wilson(5, 5)[1] == 1.0
    assert study.wilson(0, 0) == (None, None)


def test_fleiss_kappa_against_the_textbook_example():
    # Fleiss (1971) as tabulated in the literature: 10 items, 14 raters, 5 categories; kappa 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert study.fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)
    assert study.fleiss_kappa([[2, 0, 0], [0, 2, 0], [0, 0, 2]]) == pytest.approx(1.0)  # full agreement
    assert study.fleiss_kappa([[1, 0], [0, 1]]) is None  # one rater per item: undefined


def _answers(key: dict, rater: str, pick) -> dict:
    """An answer file as the page exports it; ``pick(pair key) -> "with" | "without" | "same"``."""
    out = []
    for p in key["pairs"]:
        want = pick(p)
        choice = "same" if want == "same" else (p["adapter"] if want == "with" else
                                                 ("right" if p["adapter"] == "left" else "left"))
        out.append({"pair": p["id"], "choice": choice, "ms": 500})
    return {"study": key["study"], "rater": rater, "finished": True, "answers": out}


def test_make_and_tally_count_exactly_what_was_answered(tmp_path):
    ev = _eval_dir(tmp_path)
    page = tmp_path / "study" / "page.html"
    key = study.make_study(ev, page, seed=5)
    text = page.read_text()
    assert len(key["pairs"]) == 10 and "data:image/png;base64," in text
    assert "adapter" not in text.split('<script id="data"')[1]  # the page never says which side is which
    sides = [p["adapter"] for p in key["pairs"]]
    assert 0 < sides.count("left") < 10  # randomised, recorded in the key
    assert study.make_study(ev, tmp_path / "again.html", seed=5)["pairs"] == key["pairs"]  # seeded
    a = _answers(key, "ann", lambda p: "with" if p["category"] == "color" else "without")
    b = _answers(key, "bob", lambda p: "with" if p["category"] == "color" or p["seed"] == 0 else "same")
    for name, doc in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(doc))
    r = study.tally(study.key_path(page), [tmp_path / "a.json", tmp_path / "b.json"])
    color, counting, both = r["categories"]["color"], r["categories"]["counting"], r["categories"]["all"]
    assert (color["with"], color["without"], color["same"]) == (12, 0, 0)
    assert (counting["with"], counting["without"], counting["same"]) == (2, 4, 2)
    assert both["preference"] == pytest.approx(14 / 18) and color["preference"] == 1.0
    assert tuple(both["ci95"]) == pytest.approx(study.wilson(14, 18))
    # agreement: on the 6 color pairs both chose the adapter; on counting, seed 0 without vs with,
    # seed 1 without vs same
    agr = r["agreement"]
    assert agr["pairs"] == 10 and agr["pairwise_agreement"] == pytest.approx(0.6)
    table = [[2, 0, 0]] * 6 + [[1, 1, 0]] * 2 + [[0, 1, 1]] * 2
    assert agr["fleiss_kappa"] == pytest.approx(study.fleiss_kappa(table))


def test_tally_refuses_foreign_or_broken_answers(tmp_path):
    ev = _eval_dir(tmp_path)
    key = study.make_study(ev, tmp_path / "p.html")
    other = dict(_answers(key, "x", lambda p: "with"), study="000000000000")
    (tmp_path / "other.json").write_text(json.dumps(other))
    rc, err = run_cli_err("study", "tally", tmp_path / "p.key.json", "--answers", tmp_path / "other.json")
    assert rc == 1 and "answers study '000000000000'" in err and "Traceback" not in err
    (tmp_path / "bad.json").write_text("{not json")
    rc, err = run_cli_err("study", "tally", tmp_path / "p.key.json", "--answers", tmp_path / "bad.json")
    assert rc == 1 and "not an answer file" in err
    rc, err = run_cli_err("study", "make", tmp_path, "--out", tmp_path / "x.html")
    assert rc == 1 and "no scores.jsonl" in err


def _chromium():
    required = os.environ.get("SURPIPE_REQUIRE_BROWSER") == "1"  # .ci/run sets it once chromium is installed
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if required:
            pytest.fail("SURPIPE_REQUIRE_BROWSER=1 but chromium/chromedriver are missing")
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    if required:
        from selenium import webdriver  # noqa: F401  (a missing selenium fails here, never skips)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    return webdriver, Service


def test_the_page_in_headless_chromium_answers_exports_and_tallies(tmp_path):
    webdriver, Service = _chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ev = _eval_dir(tmp_path)
    page = tmp_path / "study" / "page.html"
    rc, out, err = run_cli("study", "make", ev, "--out", page, "--seed", "3")
    assert rc == 0, err
    key = json.loads(study.key_path(page).read_text())
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(page.as_uri())
        driver.find_element(By.ID, "rater").send_keys("carol", Keys.ENTER)
        body = driver.find_element(By.TAG_NAME, "body")
        plan = {}  # pair id -> the arm carol prefers: the adapter on color, a tie on seed 1 of counting
        pressed = {"left": "1", "right": Keys.ARROW_RIGHT, "same": Keys.ARROW_DOWN}
        shown = []
        for n in range(len(key["pairs"])):
            assert driver.find_element(By.ID, "progress").text.startswith(f"{n} of {len(key['pairs'])} answered")
            prompt = driver.find_element(By.ID, "prompt").text
            p = key["pairs"][n]
            assert prompt == p["prompt"]  # the page shows the pairs in the key's order
            want = "with" if p["category"] == "color" else ("same" if p["seed"] == 1 else "without")
            side = "same" if want == "same" else (p["adapter"] if want == "with" else
                                                  ("right" if p["adapter"] == "left" else "left"))
            if n == 2:  # a wrong key, then back and answered again: only the last answer counts
                body.send_keys("3")
                body.send_keys(Keys.BACKSPACE)
            body.send_keys(pressed[side])
            plan[p["id"]], shown = want, shown + [prompt]
        assert "10 of 10 answered" in driver.find_element(By.ID, "progress").text
        body.send_keys("e")
        deadline = time.time() + 20
        files = []
        while time.time() < deadline and not files:
            files = [f for f in downloads.glob("*.json")]
            time.sleep(0.2)
        assert files, "the export produced no download"
    finally:
        driver.quit()
    exported = json.loads(files[0].read_text())
    assert exported["rater"] == "carol" and exported["finished"] and len(exported["answers"]) == 10
    rc, out, err = run_cli("study", "tally", study.key_path(page), "--answers", files[0], "--out", tmp_path / "t")
    assert rc == 0, err
    r = json.loads((tmp_path / "t" / "preference.json").read_text())
    for cat in CATS:
        votes = [v for pid, v in plan.items() if next(p for p in key["pairs"] if p["id"] == pid)["category"] == cat]
        s = r["categories"][cat]
        assert (s["with"], s["without"], s["same"]) == (votes.count("with"), votes.count("without"), votes.count("same"))
    assert "| color | 6 | 0 | 0 | 1.000 |" in out
