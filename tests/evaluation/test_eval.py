"""``surpipe eval`` and the CLIP score: independent check of the score, preprocessing, tables, chart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from surpipe.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    from surpipe.adapter import SURAdapter

    torch.manual_seed(0)
    ad = SURAdapter(width=32, nhead=4, dim_feedforward=64, adapter_weight=0.5)
    torch.nn.init.normal_(ad.fc.weight, std=0.5)
    return ad.save_pretrained(tmp_path_factory.mktemp("ad") / "adapter")


def _images(n: int = 5):
    rs = np.random.RandomState(0)
    sizes = [(32, 32), (50, 40), (40, 70), (64, 64), (33, 97)]
    return [Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def test_clip_score_matches_an_independent_computation(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    from surpipe.evaluation.clip_score import CLIPScorer

    texts = ["a dog jumping over a fence", "three cats sitting on a sofa", "a green apple next to a red mug",
             "a red bird", "a robot watering flowers in a garden " * 12]  # the last one exceeds 77 tokens
    images = _images()
    scorer = CLIPScorer(str(tiny_clip), batch_size=2)
    got = np.array(scorer.score(images, texts))

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip)
    px = scorer.preprocess(images)
    assert px.shape == (5, 3, 32, 32)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=px)
        txt = model.get_text_features(**tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt"))
    img = img if isinstance(img, torch.Tensor) else img.pooler_output  # transformers 5 returns an output object
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    img, txt = img.double(), txt.double()
    cos = (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))
    want = (100 * cos.clamp(min=0)).numpy()
    assert np.all(want > 0)  # the tiny CLIP gives scores inside (0, 100), not all clamped
    # float32 CLIP features (scorer, batched) vs a float64 cosine of features from another batch: scores
    # are 100 x cosine, so 1e-3 is 1e-5 in cosine, ~100 float32 eps through the towers' reductions
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert len(set(np.round(got, 3))) == 5


def test_clip_iqa_matches_an_independent_computation_of_its_formula(tiny_clip):
    """CLIP-IQA: softmax over 100 x the cosines to 'Good photo.' and 'Bad photo.', the first share;
    recomputed here from transformers' CLIP features in float64 and numpy's exp."""
    from transformers import CLIPModel, CLIPTokenizer

    from surpipe.evaluation.clip_score import CLIPScorer

    images = _images()
    scorer = CLIPScorer(str(tiny_clip), batch_size=3)
    got, got100 = np.array(scorer.iqa(images, scale=1.0)), np.array(scorer.iqa(images))
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=scorer.preprocess(images))
        txt = model.get_text_features(**tok(["Good photo.", "Bad photo."], padding=True, return_tensors="pt"))
    img = (img if isinstance(img, torch.Tensor) else img.pooler_output).double().numpy()
    txt = (txt if isinstance(txt, torch.Tensor) else txt.pooler_output).double().numpy()
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    def share(scale):
        return np.exp(scale * cos[:, 0]) / (np.exp(scale * cos[:, 0]) + np.exp(scale * cos[:, 1]))

    # the tiny CLIP's cosines differ so much that CLIP's scale of 100 saturates the share; at scale 1
    # it does not, so the formula is compared where the comparison means something
    want = share(1.0)
    assert np.all((want > 0.01) & (want < 0.99)) and len(set(np.round(want, 4))) == 5
    # float32 features (batched) vs float64 from another batch: 1e-5 in cosine moves a share by < 1e-5
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got100, share(100.0), atol=1e-4)
    assert scorer.iqa([]) == []


def test_clip_score_clamps_negative_cosines_to_zero(tiny_clip, monkeypatch):
    from surpipe.evaluation.clip_score import CLIPScorer

    scorer = CLIPScorer(str(tiny_clip))
    monkeypatch.setattr(scorer, "image_embeddings", lambda ims: torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
    monkeypatch.setattr(scorer, "text_embeddings", lambda ts: torch.tensor([[-1.0, 0.0], [3.0, 4.0]]))
    assert scorer.score([None, None], ["a", "b"]) == pytest.approx([0.0, 100.0])


def test_preprocessing_is_the_standard_clip_one(tiny_clip):
    """Same pixels as transformers' own CLIP image processor (its PIL backend, as torchvision is absent)."""
    import transformers

    from surpipe.evaluation.clip_score import CLIP_MEAN, CLIP_STD, Preprocess, _read_preprocessor_config

    cfg, _ = _read_preprocessor_config(str(tiny_clip), None)
    pre = Preprocess.from_config(cfg, 32)
    assert (pre.shortest_edge, pre.crop_height, pre.crop_width, pre.resample) == (32, 32, 32, 3)
    assert pre.mean == CLIP_MEAN and pre.std == CLIP_STD
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    ref = cls.from_pretrained(tiny_clip)(images=_images(), return_tensors="pt")["pixel_values"]
    # the same PIL resample, then (x/255 - mean)/std in float32 on values up to ~2.2: 1e-5 is ~40 eps there
    np.testing.assert_allclose(pre(_images()).numpy(), ref.numpy(), atol=1e-5)
    # no preprocessor_config.json: CLIP defaults at the vision tower's size
    d = Preprocess.from_config(None, 224)
    assert (d.shortest_edge, d.crop_height, d.mean, d.resample) == (224, 224, CLIP_MEAN, 3)


def _hand_clip_pixels(im: Image.Image, edge: int, crop: int) -> np.ndarray:
    """CLIP preprocessing step by step (RGB, bicubic resize of the shortest side on 8-bit pixels,
    zero-padded center crop, /255, OpenAI mean/std): the hand-written code surpipe used before."""
    from surpipe.evaluation.clip_score import CLIP_MEAN, CLIP_STD

    im = im.convert("RGB")
    w, h = im.size
    short, long_ = min(w, h), max(w, h)
    size = (edge, int(edge * long_ / short)) if w <= h else (int(edge * long_ / short), edge)
    a = np.asarray(im.resize(size, resample=Image.Resampling.BICUBIC) if size != im.size else im, dtype=np.float32)
    h, w = a.shape[:2]
    if h < crop or w < crop:
        pad = np.zeros((max(h, crop), max(w, crop), 3), np.float32)
        t, l = (pad.shape[0] - h) // 2, (pad.shape[1] - w) // 2
        pad[t:t + h, l:l + w] = a
        a, h, w = pad, pad.shape[0], pad.shape[1]
    t, l = (h - crop) // 2, (w - crop) // 2
    a = (a[t:t + crop, l:l + crop] / 255.0 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return a.transpose(2, 0, 1)


@pytest.mark.parametrize("cfg", [None, {"size": 48, "crop_size": 40}])
def test_preprocessing_matches_the_step_by_step_clip_recipe(cfg):
    """Defaults (no preprocessor_config.json) and a config with crop < side: the same pixels as the
    documented CLIP steps, on portrait, landscape, grey and RGBA images (scores unchanged by the
    switch to transformers' processor)."""
    from surpipe.evaluation.clip_score import Preprocess

    pre = Preprocess.from_config(cfg, 32)
    edge, crop = (32, 32) if cfg is None else (48, 40)
    rs = np.random.RandomState(1)
    ims = _images() + [Image.fromarray(rs.randint(0, 256, (30, 90), dtype=np.uint8), "L"),
                       Image.fromarray(rs.randint(0, 256, (90, 31, 4), dtype=np.uint8), "RGBA")]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torchvision fallback notice: the PIL backend is chosen explicitly
        got = pre(ims).numpy()
    assert type(pre.processor).__name__ == "CLIPImageProcessorPil"
    assert got.shape == (len(ims), 3, crop, crop) and got.dtype == np.float32
    want = np.stack([_hand_clip_pixels(im, edge, crop) for im in ims])
    np.testing.assert_allclose(got, want, atol=1e-5)  # as above: float32 normalisation of identical pixels
    assert pre.to_dict()["shortest_edge"] == edge and pre.to_dict()["crop_size"] == [crop, crop]


@pytest.mark.parametrize("bad", [{"size": "huge"}, {"image_mean": [0.5]}, {"size": {"shortest_edge": -3}}])
def test_unusable_preprocessor_config_is_refused_when_the_scorer_opens(tiny_clip, tmp_path, bad):
    """A broken preprocessor_config.json fails with one message naming the file when the scorer is
    built (before eval renders anything), not as a traceback in the middle of scoring."""
    import shutil

    from surpipe.evaluation.clip_score import CLIPScorer
    from surpipe.errors import SurpipeError

    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip, clip)
    cfg = json.loads((clip / "preprocessor_config.json").read_text())
    (clip / "preprocessor_config.json").write_text(json.dumps({**cfg, **bad}))
    with pytest.raises(SurpipeError, match="preprocessor_config.json is not a usable CLIP image preprocessing"):
        CLIPScorer(str(clip))


def test_bundled_suite_has_the_four_categories():
    from surpipe.evaluation.suite import DEFAULT_SUITE, read_suite

    assert DEFAULT_SUITE == REPO / "data" / "eval_prompts" / "suite.jsonl"
    suite = read_suite(None)
    assert list(suite) == ["action", "color", "counting", "narrative"]
    for prompts in suite.values():
        assert 8 <= len(prompts) <= 12 and len(set(prompts)) == len(prompts)


def test_bad_suite_files_are_refused_with_every_bad_line(tmp_path):
    from surpipe.errors import SurpipeError
    from surpipe.evaluation.suite import read_suite

    bad = tmp_path / "suite.jsonl"
    bad.write_text('{"category": "color", "prompt": "a red bird"}\n\n{"category": "color"}\nnot json\n')
    with pytest.raises(SurpipeError) as e:
        read_suite(str(bad))
    assert e.value.problems == ['line 3: needs non-empty strings "category" and "prompt"',
                                "line 4: not valid JSON (Expecting value)"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"category": "c", "prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(SurpipeError, match="prompt suite .* is not UTF-8 text"):
        read_suite(str(latin))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SurpipeError, match="holds no prompts"):
        read_suite(str(tmp_path / "empty.jsonl"))


def test_parse_seeds():
    from surpipe.evaluation.suite import parse_seeds
    from surpipe.errors import SurpipeError

    assert parse_seeds("0") == [0]
    assert parse_seeds("3, 1,2") == [3, 1, 2]
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_seeds([4, 5, 4]) == [4, 5]
    for bad in ("x", "", "3-1", "-2"):
        with pytest.raises(SurpipeError):
            parse_seeds(bad)


def test_eval_end_to_end(tiny_models, tiny_clip, adapter_dir, tmp_path):
    from stages.cli import main

    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(tiny_models / "sd"), "--adapter", str(adapter_dir), "--clip-model",
               str(tiny_clip), "--out", str(out), "--steps", "2", "--size", "32", "--max-prompts-per-category", "2",
               "--seeds", "0,1", "--categories", "color", "--categories", "counting", "--batch-size", "8"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["categories"]) == ["color", "counting"]
    assert res["settings"]["seeds"] == [0, 1] and res["settings"]["size"] == [32, 32]
    assert "100 * max(cos" in res["definition"] and res["clip"]["preprocessing"]["shortest_edge"] == 32
    rows = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 * 2  # categories x prompts x seeds x arms
    for cat, stats in res["categories"].items():
        arm = {a: [r["clip_score"] for r in rows if r["category"] == cat and r["adapter"] == (a == "with")]
               for a in ("without", "with")}
        assert stats["n_images"] == 4
        assert stats["without"] == pytest.approx(np.mean(arm["without"]), abs=1e-3)
        assert stats["with"] == pytest.approx(np.mean(arm["with"]), abs=1e-3)
        assert stats["difference"] == pytest.approx(stats["with"] - stats["without"], abs=1e-3)
        assert all(0 < s <= 100 for s in arm["without"] + arm["with"])
    assert res["overall"]["n_images"] == 8
    # same prompt and seed in both arms; the adapter changes the image, hence the score
    by_key = {}
    for r in rows:
        by_key.setdefault((r["prompt"], r["seed"]), {})[r["adapter"]] = r
        assert (out / r["file"]).is_file()
    assert len(by_key) == 8 and any(v[True]["clip_score"] != v[False]["clip_score"] for v in by_key.values())
    md = (out / "results.md").read_text()
    assert "| color | 4 |" in md and "| counting | 4 |" in md and "**all**" in md and "difference" in md
    with Image.open(out / "clip_scores.png") as chart:
        assert chart.format == "PNG" and chart.width > 300
    assert (out / "grids" / "color.png").is_file() and (out / "config.json").is_file()
    # image quality (CLIP-IQA), per image in scores.jsonl and per category in results.json / .md
    iqa = res["clip_iqa"]
    assert "Good photo." in iqa["definition"] and all(0 <= r["clip_iqa"] <= 1 for r in rows)
    for cat, stats in iqa["categories"].items():
        w = [r["clip_iqa"] for r in rows if r["category"] == cat and r["adapter"]]
        assert stats["with"] == pytest.approx(np.mean(w), abs=1e-5)
    assert "## Image quality (CLIP-IQA" in md
    assert md.index("## In the paper's layout") < md.index("## CLIP score")  # the paper table first


def test_eval_adapter_weight_zero_gives_zero_difference(tiny_models, tiny_clip, adapter_dir, tmp_path):
    from stages.eval import EvalConfig, run

    res = run(EvalConfig(model=str(tiny_models / "sd"), adapter=str(adapter_dir), clip_model=str(tiny_clip),
                         out=str(tmp_path), steps=2, size=32, max_prompts_per_category=2, categories=["action"],
                         adapter_weight=0.0, save_images=False))
    assert res["categories"]["action"]["difference"] == 0.0 and res["categories"]["action"]["n_images"] == 2
    assert not (tmp_path / "images").exists() and (tmp_path / "clip_scores.png").is_file()


@pytest.mark.parametrize("case", ["category", "clip", "seeds"])
def test_eval_clear_errors(case, tiny_models, tiny_clip, adapter_dir, tmp_path, capsys):
    from stages.cli import main

    args = ["eval", "--model", str(tiny_models / "sd"), "--adapter", str(adapter_dir), "--clip-model", str(tiny_clip),
            "--out", str(tmp_path / "o"), "--steps", "1"]
    if case == "category":
        args += ["--categories", "poetry"]
        expect = "unknown categories poetry"
    elif case == "clip":
        args[args.index("--clip-model") + 1] = str(tmp_path / "missing-clip")
        expect = "CLIP model folder not found"
    else:
        args += ["--seeds", "a,b"]
        expect = "comma-separated"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def test_extra_iqa_metric_by_pyiqa_name(monkeypatch):
    """--extra-iqa NAME: pyiqa's metric on [1, 3, H, W] images in [0, 1]; a stand-in pyiqa (mean
    brightness) checks the wiring exactly; without pyiqa, a clear message."""
    import sys
    import types

    from surpipe.errors import SurpipeError
    from surpipe.evaluation.clip_eval import pyiqa_scores

    monkeypatch.setitem(sys.modules, "pyiqa", None)  # not installed
    with pytest.raises(SurpipeError, match="needs pyiqa"):
        pyiqa_scores("musiq", {"with": _images(1)}, "cpu")
    created = []

    def create_metric(name, device, as_loss):
        created.append(name)
        return lambda t: t.mean(dim=(1, 2, 3))

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    ims = _images(3)
    got = pyiqa_scores("musiq", {"without": ims[:2], "with": ims[1:]}, "cpu")
    want = [np.asarray(im.convert("RGB"), dtype=np.float64).mean() / 255.0 for im in ims]
    assert created == ["musiq"]
    np.testing.assert_allclose(got["without"], want[:2], rtol=1e-6)
    np.testing.assert_allclose(got["with"], want[1:], rtol=1e-6)
