"""encode-latents: stored CLIP embeddings and VAE latent distributions against plain
transformers / diffusers computations, preprocessing against an independent PIL/numpy computation,
flip variants, resume after SIGKILL, refusal of mismatches, bad model folders, and that the UNet
is never needed.

float16 tolerance: the stage computes in float32 and stores float16 (round to nearest), so a
stored value differs from the float32 value v by at most |v| * 2**-11 (half an ulp; near zero half
the subnormal step, 2**-25). The references run in float32 with other batch compositions; CPU
convolution/matmul kernels then sum in another order, which moves v by an ABSOLUTE amount of about
1e-6 of the array's largest magnitude (measured on the tiny VAE: 1.25e-6 at max 1.27). Hence
``|stored - v| <= |v| * 2**-11 + 1e-5 * max|v|``: the exact rounding bound plus 10x the measured
float32 noise; a wrong crop, flip, pad token or layer would be off by orders of magnitude more.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import child_env
from helpers.images import SIZES, N, _write_surd, _zarr
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stages.cli import main as cli_main  # noqa: E402
from stages.encode_latents import EncodeLatentsConfig, run  # noqa: E402
from surpipe import sd
from surpipe.errors import SurpipeError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
R = 64  # the tiny SD's resolution (unet sample_size 32 x VAE downsampling 2)
# (width, height): landscape, square at R, portrait, and a size whose crop offset is x.5 (rounding)
BLOCK = 4


def assert_f16_close(stored, ref, what=""):
    stored = np.asarray(stored, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    assert stored.shape == ref.shape, (what, stored.shape, ref.shape)
    err = np.abs(stored - ref)
    bound = np.abs(ref) * 2.0**-11 + 1e-5 * float(np.abs(ref).max())
    assert (err <= bound).all(), f"{what}: max excess {(err - bound).max():.3g}"


@pytest.fixture(scope="module")
def surd(tmp_path_factory) -> Path:
    return _write_surd(tmp_path_factory.mktemp("surd") / "data")


@pytest.fixture(scope="module")
def sd_dir(tiny_models, tmp_path_factory) -> Path:
    """The tiny SD with its unet/ deleted: encode-latents must not need the UNet."""
    d = tmp_path_factory.mktemp("sdcopy") / "sd"
    shutil.copytree(tiny_models / "sd", d)
    shutil.rmtree(d / "unet")
    return d


def _cfg(surd, store, model, **kw) -> EncodeLatentsConfig:
    base = dict(data=str(surd), store=str(store), model=str(model), block_rows=BLOCK, batch_size=3,
                flip=True, workers=1, progress=False)
    base.update(kw)
    return EncodeLatentsConfig(**base)


@pytest.fixture(scope="module")
def encoded(surd, sd_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "s.zarr"
    report = run(_cfg(surd, store, sd_dir, resolution=None))  # default resolution from the model
    return store, report


def _prompts(surd):
    rows = [json.loads(line) for line in (surd / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows], [r["prompt"] for r in rows], [r["file_name"] for r in rows]


# --------------------------------------------------------------------------- CLIP


def test_clip_matches_transformers_and_pipeline(encoded, surd, sd_dir, tiny_models):
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    store, report = encoded
    g = _zarr(store)["clip/sd"]
    simple, complex_, _ = _prompts(surd)
    tok = CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder").eval()
    assert tok.model_max_length == 77
    for which, prompts in (("simple", simple), ("complex", complex_)):
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = enc(ids)[0].numpy()  # use_attention_mask is false for CLIP: no mask, as the pipeline
        assert g[which].shape == (N, 77, 32) and g[which].dtype == np.float16
        assert_f16_close(g[which][:], ref, which)
        lens = [len(x) for x in tok(prompts, truncation=False, verbose=False).input_ids]
        np.testing.assert_array_equal(g[f"{which}_len"][:], lens)
    # The full pipeline's own encode_prompt (the path the UNet is fed by) agrees too.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models / "sd", safety_checker=None)
    with torch.no_grad():
        pe = pipe.encode_prompt(complex_, "cpu", 1, False)[0].numpy()
    assert_f16_close(g["complex"][:], pe, "pipeline")
    # Report: how many prompts exceeded the window (every third complex prompt here).
    n_long = sum(1 for i in range(N) if i % 3 == 2)
    assert report["clip"]["complex_truncated"] == n_long and report["clip"]["simple_truncated"] == 0
    assert (g["complex_len"][:] > 77).sum() == n_long
    assert g.attrs["report"]["complex_truncated"] == n_long
    s = g.attrs["settings"]
    assert s["max_length"] == 77 and s["hidden_size"] == 32 and s["store_dtype"] == "float16"
    assert g.attrs["provenance"]["tokenizer_class"] == "CLIPTokenizer"


def test_sd2_like_width_is_read_from_config(surd, encoded, tmp_path):
    """A text encoder of another width (SD 2.x-like, pad token "!") gives [N, 77, 64]."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from surpipe.tiny import build_tiny_sd

    model = build_tiny_sd(tmp_path / "sd2", seed=1, text_width=64, text_act="gelu", clip_pad_token="!",
                          prediction_type="v_prediction", use_linear_projection=True)
    store, _ = encoded
    run(_cfg(surd, store, model, parts=["clip"], name="sd2"))
    g = _zarr(store)["clip/sd2"]
    assert g["simple"].shape == (N, 77, 64) and g.attrs["settings"]["hidden_size"] == 64
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    assert tok.pad_token == "!"
    enc = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    simple, _, _ = _prompts(surd)
    with torch.no_grad():
        ref = enc(tok(simple, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids)[0]
    assert_f16_close(g["simple"][:], ref.numpy(), "sd2 simple")
    assert "vae/sd2-64" not in _zarr(store)  # parts=clip only


# --------------------------------------------------------------------------- images + VAE


def _independent_crop(img: Image.Image, res: int) -> np.ndarray:
    """Resize shorter side + center crop, computed independently of surpipe.sd (torchvision's rules:
    long side truncated, offsets rounded half to even) and returned as float32 CHW in [-1, 1]."""
    w, h = img.size
    scale = res / min(w, h)
    nw, nh = (res, int(h * res / w)) if w <= h else (int(w * res / h), res)
    assert abs(nw - w * scale) < 1 and abs(nh - h * scale) < 1
    r = img.resize((nw, nh), Image.BILINEAR) if (nw, nh) != (w, h) else img
    left, top = (int(np.round((nw - res) / 2)), int(np.round((nh - res) / 2)))  # numpy rounds half to even
    a = np.asarray(r, dtype=np.float32)[top:top + res, left:left + res]
    return (a / 127.5 - 1.0).transpose(2, 0, 1)


def test_preprocessing_rules():
    # torchvision: Resize(64) of 128x100 -> 81x64 (81.92 truncated); CenterCrop offset round(8.5) = 8.
    assert sd.resized_size(128, 100, 64) == (81, 64)
    assert sd.center_crop_box(81, 64, 64) == (8, 0, 72, 64)
    assert sd.center_crop_box(83, 64, 64) == (10, 0, 74, 64)  # round(9.5) = 10
    assert sd.resized_size(70, 123, 64) == (64, 112)
    rng = np.random.default_rng(0)
    for w, h in SIZES + [(513, 700), (31, 40)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        x = sd.preprocess(img, 64).numpy()
        assert x.shape == (3, 64, 64) and x.dtype == np.float32
        # the same resample of the same 8-bit pixels, then x/127.5-1 in float32: at most a few eps of [-1, 1]
        np.testing.assert_allclose(x, _independent_crop(img, 64), rtol=0, atol=1e-6)


def test_latents_match_diffusers_vae_encode(encoded, surd, sd_dir):
    import torch
    from diffusers import AutoencoderKL

    store, report = encoded
    g = _zarr(store)["vae/sd-64"]
    _, _, files = _prompts(surd)
    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae").eval()
    imgs = [Image.open(surd / f).convert("RGB") for f in files]
    x = torch.from_numpy(np.stack([_independent_crop(im, R) for im in imgs]))
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        # flipped variants: encode the PIL-flipped crop
        crops = [sd.preprocess_pil(im, R).transpose(Image.FLIP_LEFT_RIGHT) for im in imgs]
        xf = torch.stack([torch.from_numpy(np.asarray(c, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for c in crops])
        dist_f = vae.encode(xf).latent_dist
    assert g["mean"].shape == (N, 4, 32, 32) and g["mean"].dtype == np.float16
    assert_f16_close(g["mean"][:], dist.mean.numpy(), "mean")
    assert_f16_close(g["std"][:], dist.std.numpy(), "std")
    assert_f16_close(g["flip_mean"][:], dist_f.mean.numpy(), "flip_mean")
    assert_f16_close(g["flip_std"][:], dist_f.std.numpy(), "flip_std")
    s = g.attrs["settings"]
    assert s["resolution"] == R and s["crop"] == "center" and s["flip"] is True
    assert s["scaling_factor"] == vae.config.scaling_factor and "shift_factor" not in s
    assert s["latent_channels"] == 4 and s["downsample_factor"] == 2
    cfg_file = store.with_name(store.name + ".configs") / "encode-latents-sd.json"
    saved = json.loads(cfg_file.read_text())
    assert saved["resolution"] == R and saved["vae_name"] == "sd-64" and saved["overwrite"] is False
    assert g.attrs["config"]["flip"] is True
    assert report["vae"]["rows_done_now"] == N


def test_rerun_nothing_to_do_via_config(encoded, capsys):
    store, _ = encoded
    before = {k: _zarr(store)[k][:] for k in ("clip/sd/complex", "vae/sd-64/mean")}
    rc = cli_main(["encode-latents", "--config", str(store.with_name(store.name + ".configs") / "encode-latents-sd.json"), "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "clip/sd: nothing to do" in err and "vae/sd-64: nothing to do" in err
    for k, v in before.items():
        np.testing.assert_array_equal(_zarr(store)[k][:], v)


# --------------------------------------------------------------------------- refusals


def test_refuse_other_model_resolution_and_dataset(encoded, surd, tiny_models, tmp_path):
    store, _ = encoded
    other = tmp_path / "other"
    from surpipe.tiny import build_tiny_sd

    build_tiny_sd(other, seed=7)  # same configs, other weights
    with pytest.raises(SurpipeError, match="other settings") as ei:
        run(_cfg(surd, store, other, parts=["clip"], name="sd"))
    assert "text_encoder_weights_sha256" in str(ei.value)
    with pytest.raises(SurpipeError, match="other settings") as ei:
        run(_cfg(surd, store, tiny_models / "sd", parts=["vae"], resolution=32, vae_name="sd-64"))
    assert "resolution" in str(ei.value)
    other_data = _write_surd(tmp_path / "otherdata", tag=" x")
    rc = cli_main(["encode-latents", "--data", str(other_data), "--store", str(store), "--model",
                   str(tiny_models / "sd"), "--no-progress"])
    assert rc == 1


def test_bad_model_folder_exit_1(surd, tiny_models, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models / "sd", bad)
    shutil.rmtree(bad / "vae")
    (bad / "text_encoder" / "model.safetensors").unlink()
    rc = cli_main(["encode-latents", "--data", str(surd), "--store", str(tmp_path / "s.zarr"), "--model", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and "vae/ is missing" in err and "text_encoder/ has no weights" in err
    assert "Traceback" not in err and not (tmp_path / "s.zarr").exists()  # refused before any work
    rc = cli_main(["encode-latents", "--data", str(surd), "--store", str(tmp_path / "s.zarr"),
                   "--model", str(tmp_path / "nowhere")])
    assert rc == 1 and "model folder not found" in capsys.readouterr().err
    # only the parts asked for are needed: clip works without vae/
    shutil.copy(tiny_models / "sd" / "text_encoder" / "model.safetensors", bad / "text_encoder")
    run(_cfg(surd, tmp_path / "s2.zarr", bad, parts=["clip"]))


def test_changed_image_names_the_key(encoded, surd, sd_dir, tmp_path):
    store, _ = encoded
    data2 = tmp_path / "data2"
    shutil.copytree(surd, data2)
    (data2 / "img005.png").write_bytes((data2 / "img005.png").read_bytes()[:60])  # truncated after the scan
    store2 = tmp_path / "s.zarr"
    shutil.copytree(store, store2)
    with pytest.raises(SurpipeError, match="img005") as ei:
        run(_cfg(data2, store2, sd_dir, parts=["vae"], vae_name="again", check_images="none"))
    assert "Traceback" not in str(ei.value)


# --------------------------------------------------------------------------- resume


_KILL_SCRIPT = r"""
import sys, time
import surpipe.store as st
orig = st.FeatureGroup.write_blocks
def write_blocks(self, blocks, values, fence=None):
    orig(self, blocks, values, fence)
    print(f"WROTE {self.path} {blocks[0]}", flush=True)
    if self.path.startswith("vae/"):
        time.sleep(60)
st.FeatureGroup.write_blocks = write_blocks
from stages.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill(encoded, surd, sd_dir, tmp_path):
    ref_store, _ = encoded
    store = tmp_path / "k.zarr"
    args = ["encode-latents", "--data", str(surd), "--store", str(store), "--model", str(sd_dir),
            "--block-rows", str(BLOCK), "--batch-size", "3", "--flip", "--workers", "1", "--no-progress"]
    env = child_env()
    p = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        for line in p.stdout:
            if line.startswith("WROTE vae/"):
                break
            assert time.time() < deadline
        else:
            pytest.fail("subprocess ended early: " + p.stderr.read()[-2000:])
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    done = _zarr(store)["vae/sd-64/done"][:]
    assert (done != 0).sum() == 1 and _zarr(store)["clip/sd/done"][:].all()
    report = run(_cfg(surd, store, sd_dir))
    assert report["clip"]["already_complete"] and report["vae"]["rows_done_now"] == N - BLOCK
    a, b = _zarr(store), _zarr(ref_store)
    for k in ("clip/sd/simple", "clip/sd/complex", "clip/sd/simple_len", "clip/sd/complex_len",
              "vae/sd-64/mean", "vae/sd-64/std", "vae/sd-64/flip_mean", "vae/sd-64/flip_std"):
        np.testing.assert_array_equal(a[k][:], b[k][:], err_msg=k)
    assert run(_cfg(surd, store, sd_dir))["vae"]["already_complete"]


def test_two_ranks_equal_single(encoded, surd, sd_dir, tmp_path):
    """Two data-parallel ranks (torchrun, gloo) write the same arrays as one process."""
    ref_store, _ = encoded
    store = tmp_path / "dp.zarr"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "stages", "encode-latents",
           "--data", str(surd), "--store", str(store), "--model", str(sd_dir), "--block-rows", str(BLOCK),
           "--batch-size", "3", "--flip", "--workers", "0", "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _zarr(store), _zarr(ref_store)
    assert a["vae/sd-64/done"][:].all() and a["clip/sd/done"][:].all()
    np.testing.assert_array_equal(a["clip/sd/complex_len"][:], b["clip/sd/complex_len"][:])
    # torchrun sets OMP_NUM_THREADS=1 per rank: CPU kernels sum in another order than the 2-thread
    # reference, which can flip a float16 rounding (1 ulp): equal within twice the rounding bound.
    for k in ("clip/sd/simple", "clip/sd/complex", "vae/sd-64/mean", "vae/sd-64/std", "vae/sd-64/flip_mean",
              "vae/sd-64/flip_std"):
        x, y = a[k][:].astype(np.float32), b[k][:].astype(np.float32)
        assert (np.abs(x - y) <= np.abs(y) * 2.0**-10 + 2e-5 * np.abs(y).max()).all(), k
