"""``surpipe generate``: stock pipeline + adapter, compare grid, generate.json, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
import dataclasses
import math

STEPS, SIZE = 2, 32


def _adapter(path: Path, width: int = 32, adapter_weight: float = 0.5) -> Path:
    from surpipe.adapter import SURAdapter

    torch.manual_seed(0)
    ad = SURAdapter(width=width, nhead=4, dim_feedforward=64, adapter_weight=adapter_weight)
    torch.nn.init.normal_(ad.fc.weight, std=0.5)  # non-zero fc: the adapter changes the embeddings
    ad.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run folder: RUN/adapter (save_pretrained layout), RUN/config.json, projection."""
    from safetensors.torch import save_file

    run = tmp_path_factory.mktemp("gen") / "run"
    _adapter(run / "adapter")
    (run / "config.json").write_text(json.dumps({"store": "x.zarr", "model": "sd", "out": str(run), "llm_layer": 1}))
    save_file({"weight": torch.zeros(32, 8)}, str(run / "llm_projection.safetensors"))
    return run


def _cli(args: list[str]) -> int:
    from stages.cli import main

    return main([str(a) for a in args])


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_compare_grid_without_equals_plain_pipeline_and_with_differs(tiny_models, run_dir, tmp_path):
    from surpipe.evaluation import render

    out = tmp_path / "gen"
    prompts = ["a dog jumping over a fence", "a green apple next to a red mug"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("# demo\n" + "\n".join(prompts) + "\n\n")
    rc = _cli(["generate", "--model", tiny_models / "sd", "--adapter", run_dir, "--prompts-file", pf, "--out", out,
               "--steps", STEPS, "--size", SIZE, "--seed", 7, "--compare", "--batch-size", 2])
    assert rc == 0
    rec = json.loads((out / "generate.json").read_text())
    assert rec["grid"] == "compare_grid.png" and (out / "compare_grid.png").is_file()
    grid = Image.open(out / "compare_grid.png")
    assert grid.width > 2 * 160 and grid.height > 2 * 160  # two columns, two captioned rows
    assert rec["seeds"] == [7, 8]
    pipe = render.load_pipeline(str(tiny_models / "sd"))
    for k, (prompt, seed) in enumerate(zip(prompts, rec["seeds"])):
        files = {r["adapter"]: r["file"] for r in rec["images"] if r["index"] == k}
        assert files[False].endswith(f"_s{seed}_without.png") and files[True].endswith(f"_s{seed}_with.png")
        assert files[False].startswith(f"{k:04d}_{prompt.split()[0]}-{prompt.split()[1]}-")
        plain = pipe(prompt=prompt, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        without, with_ = _png(out / files[False]), _png(out / files[True])
        # same seed, same stock pipeline: identical up to batched-vs-single float noise
        assert np.abs(without.astype(int) - np.asarray(plain).astype(int)).max() <= 1
        assert np.abs(without.astype(int) - with_.astype(int)).mean() > 1.0


def test_adapter_weight_zero_gives_identical_images(tiny_models, run_dir, tmp_path):
    from stages.generate import GenerateConfig, run

    rec = run(GenerateConfig(model=str(tiny_models / "sd"), adapter=str(run_dir / "adapter"), out=str(tmp_path),
                             prompt="three cats sitting on a sofa", steps=STEPS, size=SIZE, compare=True,
                             adapter_weight=0.0, images_per_prompt=2))
    assert rec["adapter_weight"] == 0.0 and rec["seeds"] == [0, 1]
    pairs = {}
    for r in rec["images"]:
        pairs.setdefault(r["index"], {})[r["adapter"]] = _png(tmp_path / r["file"])
    assert len(pairs) == 2
    for p in pairs.values():
        assert np.array_equal(p[False], p[True])
    assert not np.array_equal(pairs[0][False], pairs[1][False])  # different seeds, different images


def test_cond_and_uncond_pass_through_the_adapter_separately(tiny_models, run_dir, tmp_path, monkeypatch):
    from stages.generate import GenerateConfig, run
    from surpipe.evaluation import render
    from surpipe.adapter import SURAdapter

    seen = []
    original = SURAdapter.forward

    def spy(self, x, return_aux=False):
        seen.append(x.detach().clone())
        return original(self, x, return_aux)

    monkeypatch.setattr(SURAdapter, "forward", spy)
    run(GenerateConfig(model=str(tiny_models / "sd"), adapter=str(run_dir), out=str(tmp_path), prompt="a red cube",
                       negative_prompt="blurry", steps=STEPS, size=SIZE, batch_size=1))
    assert len(seen) == 2 and all(x.shape == (1, 77, 32) for x in seen)  # never one [uncond, cond] batch
    pipe = render.load_pipeline(str(tiny_models / "sd"))
    cond, uncond = pipe.encode_prompt(["a red cube"], "cpu", 1, True, negative_prompt=["blurry"])
    # the pipeline's own encoder on the same prompt and batch of 1: the same kernels (default float32 tolerance)
    assert torch.allclose(seen[0], cond) and torch.allclose(seen[1], uncond)
    assert not torch.allclose(cond, uncond)


def test_generate_json_records_every_setting(tiny_models, run_dir, tmp_path):
    from stages.generate import GenerateConfig
    from surpipe import config as cfgmod

    pf = tmp_path / "p.jsonl"
    pf.write_text(json.dumps({"prompt": "a boy kicking a football"}) + "\n" + json.dumps({"prompt": "two boats"}) + "\n")
    out = tmp_path / "out"
    assert _cli(["generate", "--model", tiny_models / "sd", "--adapter", run_dir, "--prompt", "a red bird",
                 "--prompts-file", pf, "--out", out, "--steps", STEPS, "--size", SIZE, "--seed", 3,
                 "--guidance", 5.0, "--scheduler", "ddim", "--dtype", "float32", "--device", "cpu",
                 "--negative-prompt", "ugly"]) == 0
    rec = json.loads((out / "generate.json").read_text())
    assert rec["model"] == str(tiny_models / "sd")
    assert Path(rec["adapter"]) == (run_dir / "adapter").resolve()
    assert rec["adapter_config"]["width"] == 32 and rec["adapter_config"]["adapter_weight"] == 0.5
    assert rec["prompts"] == ["a red bird", "a boy kicking a football", "two boats"]
    assert rec["seeds"] == [3, 4, 5] and rec["steps"] == STEPS and rec["guidance"] == 5.0
    assert rec["scheduler"] == "ddim" and rec["scheduler_class"] == "DDIMScheduler"
    assert rec["dtype"] == "float32" and rec["device"] == "cpu" and rec["size"] == [SIZE, SIZE]
    assert rec["negative_prompt"] == "ugly" and rec["compare"] is False and rec["grid"] is None
    assert {"torch", "diffusers", "transformers", "surpipe"} <= set(rec["versions"])
    names = [r["file"] for r in rec["images"]]
    assert names == ["0000_a-red-bird_s3.png", "0001_a-boy-kicking-a-football_s4.png", "0002_two-boats_s5.png"]
    assert all((out / n).is_file() for n in names)
    cfg = cfgmod.load(GenerateConfig, out / "config.json")  # repeatable with --config
    assert cfg.scheduler == "ddim" and cfg.seed == 3


def test_scheduler_choices_are_renders():
    import typing

    from stages.generate import SchedulerName
    from surpipe.evaluation.render import SCHEDULERS

    assert typing.get_args(SchedulerName) == SCHEDULERS


@pytest.mark.parametrize("case", ["width", "missing", "not_sd", "not_adapter", "no_prompt", "bad_jsonl"])
def test_clear_errors(case, tiny_models, run_dir, tmp_path, capsys):
    sd, adapter = tiny_models / "sd", run_dir
    extra = ["--prompt", "a cat"]
    expect = ""
    if case == "width":
        adapter = _adapter(tmp_path / "wide", width=64)
        expect = "64 wide"
    elif case == "missing":
        adapter = tmp_path / "nope"
        expect = "adapter folder not found"
    elif case == "not_sd":
        sd = tmp_path / "junk"
        sd.mkdir()
        (sd / "readme.txt").write_text("hi")
        expect = "not a diffusers Stable Diffusion folder"
    elif case == "not_adapter":
        adapter = tmp_path / "empty"
        adapter.mkdir()
        expect = "neither a training run folder"
    elif case == "no_prompt":
        extra = []
        expect = "--prompt"
    elif case == "bad_jsonl":
        pf = tmp_path / "p.jsonl"
        pf.write_text('{"text": "a cat"}\n')
        extra = ["--prompts-file", pf]
        expect = "line 1"
    rc = _cli(["generate", "--model", sd, "--adapter", adapter, "--out", tmp_path / "o", "--steps", 1, *extra])
    err = capsys.readouterr().err
    assert rc == 1
    assert "surpipe: error:" in err and expect in err and "Traceback" not in err
    assert not (tmp_path / "o" / "generate.json").exists()


@pytest.mark.parametrize("index, expect", [("[]", "must hold a JSON object"), ("{", "is not valid JSON"),
                                           ('{"unet": 1}', "model_index.json has no vae, text_encoder")])
def test_model_folder_with_a_bad_model_index_is_refused_by_name(tmp_path, index, expect):
    from surpipe.errors import SurpipeError
    from surpipe.evaluation.generate import check_sd_model

    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(index)
    with pytest.raises(SurpipeError, match=expect):
        check_sd_model(str(tmp_path / "sd"))


# ---- grids, the eval chart, the tiny-model note, output folders, non-finite adapters (was test_generate_more)
STEPS, SIZE = 2, 32


def _odd_adapter(path: Path, nan: bool = False, scale: float | None = None) -> Path:
    from surpipe.adapter import SURAdapter

    torch.manual_seed(0)
    ad = SURAdapter(width=32, nhead=4, dim_feedforward=64, adapter_weight=0.5)
    torch.nn.init.normal_(ad.fc.weight, std=0.5)
    with torch.no_grad():
        if nan:
            ad.fc.weight[3, 5] = float("nan")  # one bad weight is enough
        if scale is not None:
            ad.fc.weight.fill_(scale)  # finite weights whose output overflows
    return ad.save_pretrained(path)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return _odd_adapter(tmp_path_factory.mktemp("ad") / "adapter")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from surpipe.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0)




def _gen_args(tiny_models, adapter, out, *extra):
    return ["generate", "--model", tiny_models / "sd", "--adapter", adapter, "--out", out, "--steps", STEPS,
            "--size", SIZE, *extra]


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


# ------------------------------------------------------------------------------------------ grids


def _noise(side: int, n: int = 2, seed: int = 0):
    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("side,cell", [(32, None), (64, None), (32, 96), (48, 100)])
def test_grid_headers_and_captions_never_overlap_at_small_sizes(side, cell):
    """No header pixel crosses the gutter between columns, no text is drawn over an image, and
    every caption line fits the grid."""
    from surpipe.evaluation.render import caption_grid

    rows = [("a dog jumping over a fence in a sunny park with a supercalifragilisticexpialidocious name (seed 0)",
             _noise(side, seed=1)), ("three cats (seed 1)", _noise(side, seed=2))]
    g = caption_grid(rows, headers=["Stable Diffusion", "+ SUR-adapter"], cell=cell)
    a = np.asarray(g.convert("RGB")).astype(int)
    pad, c = 6, max(cell or side, 96)
    assert g.width == pad + 2 * (c + pad)
    # the images sit at the bottom of the header band: find the first row of image 1 by its pixels
    im0 = np.asarray(rows[0][1][0].convert("RGB").resize((c, c))).astype(int)
    tops = [y for y in range(a.shape[0] - c) if np.array_equal(a[y:y + c, pad:pad + c], im0)]
    assert len(tops) == 1
    head = a[:tops[0]]
    assert (head < 200).any(axis=2).sum() > 20  # the headers are drawn ...
    gutter = head[:, pad + c:pad + c + pad]
    assert (gutter == 255).all()  # ... and none crosses into the next column
    assert (head[:, g.width - pad:] == 255).all() and (head[:, :pad] == 255).all()
    for j in range(2):  # both images intact: no text drawn over them
        im = np.asarray(rows[0][1][j].convert("RGB").resize((c, c))).astype(int)
        x = pad + j * (c + pad)
        assert np.array_equal(a[tops[0]:tops[0] + c, x:x + c], im)
    # the first caption lies between the two image rows, inside the margins
    im1 = np.asarray(rows[1][1][0].convert("RGB").resize((c, c))).astype(int)
    tops2 = [y for y in range(tops[0] + c, a.shape[0] - c + 1) if np.array_equal(a[y:y + c, pad:pad + c], im1)]
    assert len(tops2) == 1
    caption = a[tops[0] + c:tops2[0]]
    assert (caption < 200).any(axis=2).sum() > 20
    assert (caption[:, :pad] == 255).all() and (caption[:, g.width - pad + 1:] == 255).all()


def test_wrap_px_fits_width_and_keeps_every_character():
    from surpipe.evaluation.render import _font, _text_w, wrap_px

    font = _font(12)
    text = "a dog jumping over a fence with averyveryveryverylongwordthatcannotfit in the park"
    lines = wrap_px(text, font, 80)
    assert len(lines) > 3 and all(_text_w(font, ln) <= 80 for ln in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    cut = wrap_px(text, font, 80, max_lines=2)
    assert len(cut) == 2 and cut[-1].endswith("...") and all(_text_w(font, ln) <= 80 for ln in cut)


def test_grid_note_is_drawn_in_red_above_the_headers():
    from surpipe.evaluation.render import caption_grid

    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    rows = [("a cat (seed 0)", [grey, grey])]
    plain = np.asarray(caption_grid(rows, ["A", "B"]).convert("RGB")).astype(int)
    noted = np.asarray(caption_grid(rows, ["A", "B"], note="random tiny test models (sd): noise").convert("RGB"))
    noted = noted.astype(int)
    grown = noted.shape[0] - plain.shape[0]
    assert grown > 5  # the band grew to hold the note
    red = (noted[..., 0] > 150) & (noted[..., 1] < 80) & (noted[..., 2] < 80)
    assert red[:grown].sum() > 10 and not red[grown:].any()  # red, and only in the note's lines
    assert np.array_equal(noted[grown:], plain)  # the rest of the grid unchanged


# ------------------------------------------------------------------------------ tiny-model note


def test_tiny_model_note_reads_the_marker(tiny_models, tiny_clip, tmp_path):
    from surpipe.evaluation.render import tiny_model_note
    from surpipe.tiny import TINY_MARKER

    assert (tiny_models / "sd" / TINY_MARKER).is_file() and (tiny_clip / TINY_MARKER).is_file()
    real = tmp_path / "real-sd"
    real.mkdir()
    (real / "model_index.json").write_text("{}")
    assert tiny_model_note(str(real), "openai/clip-vit-large-patch14", None) is None
    note = tiny_model_note(str(real), str(tiny_models / "sd"))
    assert "random tiny" in note and "sd" in note


def test_results_md_says_the_models_are_tiny(tmp_path):
    from surpipe.evaluation.suite import markdown as _markdown, stats as _stats

    table = {"color": _stats([20.0, 21.0], [21.0, 23.0])}
    md = _markdown(table, table["color"], {"model": "x"}, note="random tiny test models (sd, clip): noise")
    assert md.splitlines()[2] == "> **Note: random tiny test models (sd, clip): noise.**"
    assert "random tiny" not in _markdown(table, table["color"], {"model": "x"})


# ---------------------------------------------------------------------------------- eval statistics


def test_stats_standard_errors_match_a_hand_computation():
    from surpipe.evaluation.suite import stats as _stats

    s = _stats([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 5.0, 5.0])
    # without: mean 2.5, sample variance 5/3 -> sem sqrt(5/12); with: mean 3.5, variance 3 -> sem sqrt(3/4)
    # differences 1, 0, 2, 1: mean 1, variance 2/3 -> sem sqrt(1/6)
    assert s["n_images"] == 4 and s["without"] == 2.5 and s["with"] == 3.5 and s["difference"] == 1.0
    assert s["without_sem"] == pytest.approx(math.sqrt(5 / 12), abs=1e-4)
    assert s["with_sem"] == pytest.approx(math.sqrt(3 / 4), abs=1e-4)
    assert s["difference_sem"] == pytest.approx(math.sqrt(1 / 6), abs=1e-4)
    assert s["with_better"] == 0.75
    rs = np.random.RandomState(3)
    a, b = rs.normal(25, 2, 17), rs.normal(26, 2, 17)
    s = _stats(a.tolist(), b.tolist())
    assert s["with_sem"] == pytest.approx(np.std(b, ddof=1) / np.sqrt(17), abs=1e-4)
    assert s["difference_sem"] == pytest.approx(np.std(b - a, ddof=1) / np.sqrt(17), abs=1e-4)
    one = _stats([3.0], [4.0])
    assert one["without_sem"] is None and one["difference_sem"] is None


def test_chart_axis_zooms_on_small_differences_and_keeps_zero_for_large_ones(tmp_path):
    from surpipe.evaluation.suite import chart as _chart, chart_limits, stats as _stats

    rs = np.random.RandomState(0)
    w = rs.normal(26, 1.0, 30)
    small = _stats(w.tolist(), (w + 0.4 + rs.normal(0, 0.3, 30)).tolist())
    y0, y1, zero = chart_limits([small])
    assert not zero and y0 > 20  # not forced from 0 ...
    for arm in ("without", "with"):  # ... yet every error bar is inside the axis
        assert y0 < small[arm] - small[f"{arm}_sem"] and small[arm] + small[f"{arm}_sem"] < y1
    assert abs(small["difference"]) / (y1 - y0) > 0.05  # the difference is a visible share of the axis
    big = _stats([5.0, 6.0, 7.0], [20.0, 22.0, 21.0])
    assert chart_limits([big])[2] and chart_limits([big])[0] == 0.0
    info = _chart({"color": small}, small, tmp_path / "c.png", "t")
    assert info == {"ylim": [y0, y1], "starts_at_zero": False}
    with Image.open(tmp_path / "c.png") as im:
        assert im.format == "PNG" and im.width > 300


def test_eval_end_to_end_reports_tiny_models_and_arm_errors(tiny_models, tiny_clip, adapter_dir, tmp_path):
    out = tmp_path / "eval"
    assert _cli(["eval", "--model", tiny_models / "sd", "--adapter", adapter_dir, "--clip-model", tiny_clip,
                 "--out", out, "--steps", 1, "--size", SIZE, "--max-prompts-per-category", 2, "--seeds", "0,1",
                 "--categories", "color", "--batch-size", 8]) == 0
    res = json.loads((out / "results.json").read_text())
    assert "random tiny" in res["tiny_models"] and "sd" in res["tiny_models"] and "clip" in res["tiny_models"]
    md = (out / "results.md").read_text()
    assert "**Note: random tiny test models" in md
    rows = [json.loads(ln) for ln in (out / "scores.jsonl").read_text().splitlines()]
    for arm in ("without", "with"):
        xs = np.array([r["clip_score"] for r in rows if r["adapter"] == (arm == "with")])
        assert res["categories"]["color"][f"{arm}_sem"] == pytest.approx(np.std(xs, ddof=1) / 2, abs=1e-3)
        assert f"{res['categories']['color'][arm]:.2f} ± {res['categories']['color'][f'{arm}_sem']:.2f}" in md
    assert res["chart"]["file"] == "clip_scores.png" and len(res["chart"]["ylim"]) == 2


# -------------------------------------------------------------------------------- --out handling


def test_out_is_a_file_is_refused_clearly(tmp_path, capsys):
    f = tmp_path / "out.png"
    f.write_bytes(b"x")
    assert _cli(["generate", "--model", tmp_path / "nosd", "--adapter", tmp_path / "noad", "--out", f,
                 "--prompt", "a cat"]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and str(f) in err and "Traceback" not in err
    assert f.read_bytes() == b"x"


def test_non_empty_out_is_refused_listing_its_content(tiny_models, adapter_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    (out / "notes").mkdir()
    assert _cli(_gen_args(tiny_models, adapter_dir, out, "--prompt", "a cat")) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "holiday.jpg" in err and "notes/" in err and "--overwrite" in err
    assert "Traceback" not in err
    # --overwrite never deletes what generate did not write
    assert _cli(_gen_args(tiny_models, adapter_dir, out, "--prompt", "a cat", "--overwrite")) == 1
    err = capsys.readouterr().err
    assert "did not write" in err and "holiday.jpg" in err
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg", "notes"]


def test_rerun_never_mixes_old_and_new_images(tiny_models, adapter_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    assert _cli(_gen_args(tiny_models, adapter_dir, out, "--prompt", "a red bird", "--images-per-prompt", 3,
                          "--compare")) == 0
    first = _pngs(out)
    assert len(first) == 7  # 3 x (without, with) + the grid
    stamp = {n: (out / n).stat().st_mtime_ns for n in first}
    capsys.readouterr()
    # the same command again: nothing to do, nothing rewritten
    assert _cli(_gen_args(tiny_models, adapter_dir, out, "--prompt", "a red bird", "--images-per-prompt", 3,
                          "--compare")) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert {n: (out / n).stat().st_mtime_ns for n in _pngs(out)} == stamp
    # other settings into the same folder: refused, the old images untouched
    assert _cli(_gen_args(tiny_models, adapter_dir, out, "--prompt", "a blue car")) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and _pngs(out) == first
    # --overwrite: only the new run's images remain
    assert _cli(_gen_args(tiny_models, adapter_dir, out, "--prompt", "a blue car", "--overwrite")) == 0
    rec = json.loads((out / "generate.json").read_text())
    assert _pngs(out) == ["0000_a-blue-car_s0.png"] == [r["file"] for r in rec["images"]]
    assert sorted(p.name for p in out.iterdir()) == ["0000_a-blue-car_s0.png", "config.json", "generate.json"]


# ---------------------------------------------------------------------------- non-finite adapters


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_adapter_with_a_nan_weight_is_refused(command, tiny_models, tiny_clip, tmp_path, capsys):
    bad = _odd_adapter(tmp_path / "bad", nan=True)
    out = tmp_path / "o"
    if command == "generate":
        args = _gen_args(tiny_models, bad, out, "--prompt", "a cat")
    else:
        args = ["eval", "--model", tiny_models / "sd", "--adapter", bad, "--clip-model", tiny_clip, "--out", out,
                "--steps", 1, "--size", SIZE, "--max-prompts-per-category", 1, "--categories", "color"]
    assert _cli(args) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and str(bad / "model.safetensors") in err and "fc.weight" in err
    assert "Traceback" not in err
    assert not list(out.rglob("*.png")) if out.exists() else True


def test_adapter_whose_output_overflows_writes_no_image(tiny_models, tmp_path, capsys):
    from surpipe.evaluation import render
    from surpipe.adapter import SURAdapter

    bad = _odd_adapter(tmp_path / "huge", scale=3e38)  # finite weights, infinite output
    ad = SURAdapter.from_pretrained(bad)
    pipe = render.load_pipeline(str(tiny_models / "sd"))
    with torch.no_grad():
        assert not torch.isfinite(ad(pipe.encode_prompt(["a cat"], "cpu", 1, False)[0])).all()
    out = tmp_path / "o"
    assert _cli(_gen_args(tiny_models, bad, out, "--prompt", "a cat")) == 1
    err = capsys.readouterr().err
    assert "not finite" in err and "nothing was rendered" in err and "Traceback" not in err
    assert not out.exists() or not list(out.iterdir())


def test_non_finite_pixels_are_refused_not_saved(tiny_models, monkeypatch):
    from surpipe.evaluation import render
    from surpipe.errors import SurpipeError

    pipe = render.load_pipeline(str(tiny_models / "sd"))
    original = pipe.unet.forward

    def nan_unet(*args, **kwargs):
        out = original(*args, **kwargs)
        return (torch.full_like(out[0], float("nan")),) if isinstance(out, tuple) else out

    monkeypatch.setattr(pipe.unet, "forward", nan_unet)
    with pytest.raises(SurpipeError, match="non-finite pixels"):
        render.render(pipe, ["a cat", "a dog"], seeds=[0, 1], steps=STEPS, size=SIZE)


# --------------------------------------------------------------------------- once per prompt


def test_clip_and_adapter_run_once_per_prompt_not_once_per_image(tiny_models, adapter_dir, monkeypatch):
    from surpipe.evaluation import render
    from surpipe.adapter import SURAdapter

    pipe = render.load_pipeline(str(tiny_models / "sd"))
    ad = SURAdapter.from_pretrained(adapter_dir)
    prompts = ["a red bird"] * 3 + ["two boats"] * 3 + ["a red bird"]
    seeds = [0, 1, 2, 3, 4, 5, 6]
    refs = []
    for p, s in zip(prompts, seeds):  # reference: each image on its own, with its own encoding
        pe, ne = render.encode(pipe, [p], ad)
        refs.append(pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=STEPS, height=SIZE,
                         width=SIZE, generator=torch.Generator("cpu").manual_seed(s)).images[0])
    encoded, rows = [], []
    orig_encode, orig_fwd = pipe.encode_prompt, SURAdapter.forward
    monkeypatch.setattr(pipe, "encode_prompt", lambda ps, *a, **k: encoded.extend(ps or []) or orig_encode(ps, *a, **k))
    monkeypatch.setattr(SURAdapter, "forward", lambda self, x, return_aux=False: rows.append(x.shape[0])
                        or orig_fwd(self, x, return_aux))
    images = render.render(pipe, prompts, adapter=ad, seeds=seeds, steps=STEPS, size=SIZE, batch_size=2)
    # chunks [bird, bird] [bird, boats] [boats, boats] [bird]: a prompt's embeddings are kept until its
    # last image, so each distinct prompt goes through CLIP and the adapter exactly once
    assert encoded == ["a red bird", "two boats"]
    assert sum(rows) == 2 * 2  # cond + uncond rows of the two distinct prompts
    for got, ref in zip(images, refs):
        assert np.abs(np.asarray(got).astype(int) - np.asarray(ref).astype(int)).max() <= 1


# ------------------------------------------------------------------------------- option ranges


@pytest.mark.parametrize("cls_path", ["stages.generate:GenerateConfig", "stages.eval:EvalConfig"])
def test_every_option_has_help_group_and_is_range_checked(cls_path):
    import importlib

    from surpipe import config as cfgmod
    from surpipe.errors import SurpipeError

    mod, name = cls_path.split(":")
    cls = getattr(importlib.import_module(mod), name)
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help") and f.metadata.get("group") in cfgmod.GROUPS, f.name
        assert "\n" not in f.metadata["help"]
    base = {"model": "m", "adapter": "a", "out": "o"}
    bad = {"steps": 0, "guidance": float("nan"), "size": 4, "batch_size": 0, "adapter_weight": 1.5}
    with pytest.raises(SurpipeError) as e:
        cfgmod.from_dict(cls, {**base, **bad})
    assert len(e.value.problems) == len(bad)
    for key in bad:
        assert any(p.startswith(key + ":") for p in e.value.problems), key
    with pytest.raises(SurpipeError, match="finite"):
        cfgmod.from_dict(cls, {**base, "guidance": float("inf")})


def test_configs_built_in_python_are_range_checked_too(tmp_path):
    from stages.generate import GenerateConfig, run
    from surpipe.errors import SurpipeError

    with pytest.raises(SurpipeError) as e:
        run(GenerateConfig(model="m", adapter="a", out=str(tmp_path / "o"), prompt="x", guidance=float("inf"),
                           steps=0, size=36))
    text = str(e.value)
    assert "guidance" in text and "steps" in text and "multiple of 8" in text
    assert not (tmp_path / "o").exists()
