"""encode-latents on SDXL: the stored embeddings and pooled embeddings of both prompts against the stock
``StableDiffusionXLPipeline.encode_prompt``, token counts of both tokenizers against plain tokenizer
calls, the micro-conditioning against an independent PIL computation, ``--vae``, and verify.

Stored as float32 here, so the comparisons are exact up to float32 kernel noise (1e-5)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import run_cli  # noqa: E402
from helpers.images import _write_surd, _zarr  # noqa: E402  (non-square images, long complex prompts)

from stages.encode_latents import EncodeLatentsConfig, run  # noqa: E402

R = 64  # the tiny SDXL's default resolution (unet sample_size 32 x VAE downsampling 2)
BLOCK = 4


def _cfg(surd, store, model, **kw) -> EncodeLatentsConfig:
    base = dict(data=str(surd), store=str(store), model=str(model), block_rows=BLOCK, batch_size=3, flip=True,
                workers=0, progress=False, store_dtype="float32", text_batch_size=3)
    return EncodeLatentsConfig(**(base | kw))


@pytest.fixture(scope="module")
def surd(tmp_path_factory) -> Path:
    return _write_surd(tmp_path_factory.mktemp("surdxl") / "data", n=7)


@pytest.fixture(scope="module")
def encoded(surd, tiny_models, tmp_path_factory):
    store = tmp_path_factory.mktemp("xlstore") / "s.zarr"
    report = run(_cfg(surd, store, tiny_models / "sdxl"))
    return store, report


def _rows(surd):
    rows = [json.loads(line) for line in (surd / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"simple": [r["text"] for r in rows], "complex": [r["prompt"] for r in rows]}, [r["file_name"] for r in rows]


def test_embeddings_and_pooled_equal_encode_prompt(encoded, surd, tiny_models):
    import torch
    from diffusers import StableDiffusionXLPipeline

    store, report = encoded
    z = _zarr(store)
    g = z["clip/sdxl"]
    s = g.attrs["settings"]
    assert s["pipeline"] == "sdxl" and s["hidden_size"] == 64 and s["pooled_size"] == 32 and s["max_length"] == 77
    for k in ("text_encoder_config_hash", "text_encoder_config_hash_2", "text_encoder_weights_sha256",
              "text_encoder_weights_sha256_2", "tokenizer_hash", "tokenizer_hash_2"):
        assert isinstance(s[k], str) and len(s[k]) == 16, k
    assert s["text_encoder_weights_sha256"] != s["text_encoder_weights_sha256_2"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    prompts, _ = _rows(surd)
    for w in ("simple", "complex"):
        with torch.no_grad():
            emb, _, pooled, _ = pipe.encode_prompt(prompts[w], device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
        assert g[w].shape == (7, 77, 64) and g[f"{w}_pooled"].shape == (7, 32)
        # diffusers' own encode_prompt vs surpipe's, float32, other batch grouping: a few eps of values ~3
        np.testing.assert_allclose(g[w][:], emb.numpy(), rtol=0, atol=1e-5, err_msg=w)
        np.testing.assert_allclose(g[f"{w}_pooled"][:], pooled.numpy(), rtol=0, atol=1e-5, err_msg=w)
        # token counts before truncation, both tokenizers, as a plain tokenizer call gives them
        for arr, tok in ((f"{w}_len", pipe.tokenizer), (f"{w}_len_2", pipe.tokenizer_2)):
            assert g[arr].dtype == np.int32
            assert g[arr][:].tolist() == [len(tok(p).input_ids) for p in prompts[w]], arr
    assert (g["complex_len"][:] > 77).any()  # the long prompts were truncated and counted
    assert report["clip"]["complex_truncated"] == int((g["complex_len"][:] > 77).sum())


def _independent_micro(img: Image.Image, res: int):
    """What diffusers' train_text_to_image_sdxl.py records with --center_crop: (h, w) of the source,
    then (y1, x1) of CenterCrop(res) after Resize(res) (torchvision: long side truncated)."""
    w, h = img.size
    nw, nh = (res, int(res * h / w)) if w <= h else (int(res * w / h), res)
    return (h, w), (max(0, int(round((nh - res) / 2.0))), max(0, int(round((nw - res) / 2.0))))


def test_micro_conditioning_and_latents(encoded, surd, tiny_models):
    import torch
    from diffusers import AutoencoderKL

    from surpipe.sd import preprocess

    store, _ = encoded
    g = _zarr(store)["vae/sdxl-64"]
    s = g.attrs["settings"]
    assert s["micro_conditioning"] is True and s["scaling_factor"] == 0.13025 and s["resolution"] == R
    _, files = _rows(surd)
    imgs = [Image.open(surd / f) for f in files]
    want = [_independent_micro(im, R) for im in imgs]
    assert len({im.size for im in imgs}) > 3  # landscape, portrait, square, odd crops
    assert g["original_size"].dtype == np.int32 and g["crop_top_left"].dtype == np.int32
    assert g["original_size"][:].tolist() == [list(o) for o, _ in want]
    assert g["crop_top_left"][:].tolist() == [list(c) for _, c in want]
    assert any(c != (0, 0) for _, c in want) and any(c[0] for _, c in want) and any(c[1] for _, c in want)
    # latents: the SDXL VAE's encode of the same crops
    vae = AutoencoderKL.from_pretrained(tiny_models / "sdxl", subfolder="vae").eval()
    x = torch.stack([preprocess(im.convert("RGB"), R) for im in imgs[:3]])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    # the same VAE, float32, 3 rows vs the stage's blocks: conv reductions in other splits, a few eps
    np.testing.assert_allclose(g["mean"][:3], dist.mean.numpy(), rtol=0, atol=1e-5)
    assert "flip_mean" in g and "flip_crop_top_left" not in g  # a flipped row records the same offsets


def test_vae_option_replaces_the_vae_and_is_recorded(encoded, surd, tiny_models, tmp_path):
    from surpipe.errors import SurpipeError
    from surpipe.sd import vae_subfolder
    from surpipe.tiny import build_tiny_sdxl

    store, _ = encoded
    work = tmp_path / "s.zarr"
    shutil.copytree(store, work)
    other = build_tiny_sdxl(tmp_path / "other", seed=1)
    assert vae_subfolder(str(other / "vae")) is None and vae_subfolder(str(other)) == "vae"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurpipeError, match="neither an AutoencoderKL folder"):
        vae_subfolder(str(tmp_path / "empty"))
    rep = run(_cfg(surd, work, tiny_models / "sdxl", parts=["vae"], flip=False, vae=str(other / "vae")))
    path = rep["vae"]["group"]
    assert path == "vae/sdxl-vae-64"
    z = _zarr(work)
    s = z[path].attrs["settings"]
    assert s["vae"] == str((other / "vae").resolve())
    assert s["vae_encoder_weights_sha256"] != z["vae/sdxl-64"].attrs["settings"]["vae_encoder_weights_sha256"]
    assert not np.allclose(z[path]["mean"][:], z["vae/sdxl-64"]["mean"][:])
    assert z[path]["original_size"][:].tolist() == z["vae/sdxl-64"]["original_size"][:].tolist()


def test_verify_is_clean_and_reports_a_missing_pooled_array(encoded, tmp_path):
    import zarr

    store, _ = encoded
    rc, out, err = run_cli("verify", store)
    assert rc == 0 and "OK: no problems" in out, out + err
    work = tmp_path / "s.zarr"
    shutil.copytree(store, work)
    shutil.rmtree(work / "clip/sdxl/complex_pooled")
    rc, out, err = run_cli("verify", work)
    assert rc == 1 and "clip/sdxl/complex_pooled: array listed in the group's attribute arrays is missing" in err, \
        out + err
    # unlisted as well: the settings still say the group stores it
    g = zarr.open_group(str(work / "clip/sdxl"), mode="r+")
    g.attrs["arrays"] = [a for a in g.attrs["arrays"] if a != "complex_pooled"]
    rc, out, err = run_cli("verify", work)
    assert rc == 1 and "settings imply array complex_pooled but it is not stored" in err, out + err


def test_feature_classes_and_train_arrays(encoded):
    from surpipe.features import ClipFeatures, ClipXLFeatures, VaeFeatures, clip_features, group_features
    from surpipe.store import FeatureStore

    store, _ = encoded
    st = FeatureStore(store)
    clip, vae = st.group("clip/sdxl"), st.group("vae/sdxl-64")
    assert clip_features(clip.settings) is ClipXLFeatures and group_features("clip", clip.settings) is ClipXLFeatures
    assert clip_features({"max_length": 77}) is ClipFeatures and group_features("vae", vae.settings) is VaeFeatures
    assert ClipFeatures.check(clip) == [] and VaeFeatures.check(vae) == []  # dispatch by the group's settings
    assert ClipXLFeatures.train_arrays() == {"clip_simple": "simple", "clip_complex": "complex",
                                             "pooled_simple": "simple_pooled", "pooled_complex": "complex_pooled"}
    assert ClipXLFeatures.embedding_shape(clip) == (77, 64) and ClipXLFeatures.pooled_size(clip) == 32
    assert VaeFeatures.train_arrays(False, vae) == {"lat_mean": "mean", "lat_std": "std",
                                                    "original_size": "original_size", "crop_top_left": "crop_top_left"}
    assert VaeFeatures.train_arrays(False) == {"lat_mean": "mean", "lat_std": "std"}
    lens2 = ClipXLFeatures.token_lengths(clip, tokenizer=2)
    assert set(lens2) == {"simple", "complex"} and lens2["simple"].dtype == np.int32


def test_wrong_pooled_width_is_a_layout_problem(encoded, tmp_path):
    import zarr

    from surpipe.features import ClipFeatures

    store, _ = encoded
    work = tmp_path / "s.zarr"
    shutil.copytree(store, work)
    g = zarr.open_group(str(work / "clip/sdxl"), mode="r+")
    s = dict(g.attrs["settings"])
    s["pooled_size"] = 16
    g.attrs["settings"] = s
    assert "simple_pooled: row shape (32,), but the settings say (16,)" in ClipFeatures.check(g)
