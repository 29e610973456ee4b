"""Stage one, round two: unreachable hub ids fail fast with the fix named, layers added to an LLM
group without recomputing the stored ones, non-SD-1/2 pipelines refused, no empty store left by a
failed first command, the tiny CLIP model of make-tiny-models, and a dying image-loader worker
that ends encode-latents with a message instead of a hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import as_sdxl

REPO = Path(__file__).resolve().parents[2]
SURPIPE = [sys.executable, "-m", "stages"]


def _surpipe(args, env_extra=None, unset=(), timeout=120):
    env = dict(os.environ)
    for k in unset:
        env.pop(k, None)
    env.update(env_extra or {})
    t0 = time.perf_counter()
    p = subprocess.run(SURPIPE + [str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


def _startup_secs() -> float:
    """Seconds a subprocess takes to start and import what a stage imports, measured now: "fails fast"
    is judged on top of it, so a loaded machine (or one thread) does not fail the test, a retry loop does."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, diffusers"], check=True, timeout=300)
    return time.perf_counter() - t0


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more: connections are refused at once
    return port


def _small_surd(root: Path, n: int = 6) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (40 + i, 36), (20 * i, 100, 200 - 10 * i)).save(root / f"im{i}.png")
        lines.append(json.dumps({"file_name": f"im{i}.png", "text": f"a small red cube number {i}",
                                 "prompt": f"a small red cube number {i}, studio light, sharp focus"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def surd(tmp_path_factory) -> Path:
    return _small_surd(tmp_path_factory.mktemp("surd") / "data")


# --------------------------------------------------------------------------- 1. unreachable hub


HUB_CASES = [
    ("extract-llm", ["--layers", "1", "--model", "someone/no-such-llm"]),
    ("encode-latents", ["--model", "runwayml/stable-diffusion-v1-5"]),
]


@pytest.mark.parametrize("cmd, args", HUB_CASES, ids=[c for c, _ in HUB_CASES])
def test_unreachable_hub_fails_fast_naming_the_fix(cmd, args, surd, tmp_path):
    store = tmp_path / "s.zarr"
    rc, out, secs = _surpipe([cmd, "--data", surd, "--store", store, *args],
                             env_extra={"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
                                        "HF_HOME": str(tmp_path / "hf")},
                             unset=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    assert rc == 1, out
    base = _startup_secs()
    assert secs < 10 + 1.5 * base, f"took {secs:.1f} s (start-up alone {base:.1f} s)"
    assert "Traceback" not in out and "Retrying" not in out
    assert "cannot reach the Hugging Face hub" in out
    assert "local folder" in out and "HF_HUB_OFFLINE=1" in out and "hf download" in out
    assert not store.exists()


@pytest.mark.parametrize("cmd, args", HUB_CASES, ids=[c for c, _ in HUB_CASES])
def test_offline_without_cache_is_a_clear_message(cmd, args, surd, tmp_path):
    store = tmp_path / "s.zarr"
    rc, out, secs = _surpipe([cmd, "--data", surd, "--store", store, *args],
                             env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert rc == 1, out
    base = _startup_secs()
    assert secs < 10 + 1.5 * base, f"took {secs:.1f} s (start-up alone {base:.1f} s)"
    assert "Traceback" not in out
    assert "HF_HUB_OFFLINE is set" in out and "not in the local Hugging Face cache" in out
    assert "local folder" in out
    assert not store.exists()


def test_unreachable_hub_with_a_cached_copy_uses_it(tmp_path, monkeypatch, capsys):
    """A cached model is used without the hub (offline mode is switched on for the process)."""
    from surpipe import hub

    snap = tmp_path / "hf" / "hub" / "models--someone--cached" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(hub, "_checked", {})
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    assert hub.check_model_source("someone/cached") == "cache"
    assert os.environ["HF_HUB_OFFLINE"] == "1" and C.HF_HUB_OFFLINE is True
    assert "cannot be reached" in capsys.readouterr().err
    with pytest.raises(Exception, match="cannot reach the Hugging Face hub"):
        monkeypatch.delenv("HF_HUB_OFFLINE")
        hub.check_model_source("someone/not-cached")


def test_missing_local_folder_is_named(tmp_path):
    from surpipe.errors import SurpipeError
    from surpipe.hub import check_model_source

    with pytest.raises(SurpipeError, match="model folder not found"):
        check_model_source(str(tmp_path / "nope"))
    assert check_model_source(str(tmp_path)) == "local"


# --------------------------------------------------------------------------- 2. adding LLM layers


def _llm_cfg(data, store, model, **kw):
    from stages.extract_llm import ExtractLLMConfig

    kw.setdefault("progress", False)
    kw.setdefault("check_images", "none")
    kw.setdefault("store_dtype", "float32")
    kw.setdefault("block_rows", 4)
    return ExtractLLMConfig(data=str(data), store=str(store), model=str(model), **kw)


def _chunk_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("pooling", ["mean", "tokens"])
def test_adding_layers_computes_only_the_new_ones(tiny_models, surd, tmp_path, pooling, monkeypatch):
    import zarr

    from stages.extract_llm import run
    from surpipe import llm as L

    llm_dir = tiny_models / "llm"
    store = tmp_path / "s.zarr"
    run(_llm_cfg(surd, store, llm_dir, layers=[1, 3], name="g", pooling=pooling))
    before = {f"layer_{x}": _chunk_state(store / "llm" / "g" / f"layer_{x}") for x in (1, 3)}

    seen = []
    real_extract = L.extract

    def spy(llm, ids, layers, **kw):
        seen.append(list(layers))
        return real_extract(llm, ids, layers, **kw)

    monkeypatch.setattr(L, "extract", spy)
    rep = run(_llm_cfg(surd, store, llm_dir, layers=[1, 2, 3], name="g", pooling=pooling))
    assert seen and all(s == [2] for s in seen), seen  # only layer 2 was computed
    assert rep["layers_added"] == [2] and rep["layers"] == [1, 2, 3]
    for x in (1, 3):  # the stored layers' files are untouched (same bytes, same mtimes)
        assert _chunk_state(store / "llm" / "g" / f"layer_{x}") == before[f"layer_{x}"]
    assert not (store / ".adding-layers").exists() or not any((store / ".adding-layers").iterdir())

    # layer 2 equals a fresh extraction of layer 2 into another store
    monkeypatch.setattr(L, "extract", real_extract)
    fresh = tmp_path / "fresh.zarr"
    run(_llm_cfg(surd, fresh, llm_dir, layers=[2], name="g", pooling=pooling))
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(fresh), mode="r")
    names = ["pooled"] + (["tokens"] if pooling == "tokens" else [])
    for n in names:
        np.testing.assert_array_equal(a[f"llm/g/layer_2/{n}"][:], b[f"llm/g/layer_2/{n}"][:])

    g = a["llm/g"]
    assert g.attrs["settings"]["layers"] == [1, 2, 3]
    assert "layer_2/pooled" in g.attrs["arrays"]

    # verify finds the group consistent; a rerun has nothing to do
    from surpipe.store import FeatureStore

    st = FeatureStore(store)
    assert st.group("llm/g").is_complete()
    seen.clear()
    monkeypatch.setattr(L, "extract", spy)
    rep = run(_llm_cfg(surd, store, llm_dir, layers=[1, 2, 3], name="g", pooling=pooling))
    assert rep["already_complete"] and not seen
    rep = run(_llm_cfg(surd, store, llm_dir, layers=[2], name="g", pooling=pooling))
    assert rep["already_complete"] and not seen


def test_adding_layers_passes_verify_and_other_changes_are_refused(tiny_models, surd, tmp_path):
    from stages.extract_llm import run
    from surpipe.errors import SurpipeError

    llm_dir = tiny_models / "llm"
    store = tmp_path / "s.zarr"
    run(_llm_cfg(surd, store, llm_dir, layers=[1], name="g"))
    run(_llm_cfg(surd, store, llm_dir, layers=[0, 1], name="g"))
    rc, out, _ = _surpipe(["verify", store])
    assert rc == 0, out
    with pytest.raises(SurpipeError, match="other settings") as e:
        run(_llm_cfg(surd, store, llm_dir, layers=[0, 1, 2], name="g", pooling="last"))
    assert "pooling" in str(e.value)


# --------------------------------------------------------------------------- 3. other pipelines


@pytest.fixture(scope="module")
def sdxl_dir(tiny_models, tmp_path_factory) -> Path:
    return as_sdxl(tiny_models / "sd", tmp_path_factory.mktemp("sdxl") / "sdxl")


def test_sdxl_pipeline_is_refused_by_name(sdxl_dir, surd, tmp_path):
    # encode-latents takes SDXL (issue 14): a folder that says SDXL but lacks SDXL's parts is refused by name
    rc, out, _ = _surpipe(["encode-latents", "--data", surd, "--store", tmp_path / "s.zarr", "--model", sdxl_dir])
    assert rc == 1, out
    assert "StableDiffusionXLPipeline" in out and "text_encoder_2/ is missing" in out
    assert "Traceback" not in out
    assert not (tmp_path / "s.zarr").exists()  # refused before the store was made


def test_pipeline_check_function(sdxl_dir, tiny_models, tmp_path):
    from surpipe.errors import SurpipeError
    from surpipe.sd import check_pipeline_class

    check_pipeline_class(str(tiny_models / "sd"))  # SD 1.x/2.x passes
    with pytest.raises(SurpipeError, match="SDXL is not supported yet"):
        check_pipeline_class(str(sdxl_dir))
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "SomeNewPipeline"}))
    with pytest.raises(SurpipeError, match="SomeNewPipeline.*not supported"):
        check_pipeline_class(str(other))


# --------------------------------------------------------------------------- 4. no empty store


def _broken_weights(src: Path, dst: Path, weight_rel: str) -> Path:
    shutil.copytree(src, dst)
    (dst / weight_rel).write_bytes(b"not a safetensors file" * 10)
    return dst


def test_failed_first_extract_llm_leaves_no_store(tiny_models, surd, tmp_path):
    bad = _broken_weights(tiny_models / "llm", tmp_path / "llm", "model.safetensors")
    store = tmp_path / "s.zarr"
    rc, out, _ = _surpipe(["extract-llm", "--data", surd, "--store", store, "--model", bad, "--layers", "1",
                           "--no-progress"])
    assert rc == 1 and "cannot load the weights" in out and "Traceback" not in out, out
    assert not store.exists(), "a failed first command left a store behind"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.zarr")]


def test_failed_first_encode_leaves_no_store_but_an_existing_store_stays(tiny_models, surd, tmp_path):
    bad = _broken_weights(tiny_models / "sd", tmp_path / "sd", "text_encoder/model.safetensors")
    store = tmp_path / "s.zarr"
    args = ["encode-latents", "--data", surd, "--store", store, "--no-progress", "--parts", "clip"]
    rc, out, _ = _surpipe([*args, "--model", bad])
    assert rc == 1 and "cannot load the text encoder" in out and "Traceback" not in out, out
    assert not store.exists()
    # a store that existed before the command is never removed
    rc, out, _ = _surpipe(["extract-llm", "--data", surd, "--store", store, "--model", tiny_models / "llm",
                           "--layers", "1", "--no-progress"])
    assert rc == 0, out
    rc, out, _ = _surpipe([*args, "--model", bad])
    assert rc == 1 and store.is_dir() and (store / "llm").is_dir()


# --------------------------------------------------------------------------- 7. dying loader workers


def _die(self, i):
    os._exit(3)


def _stall(self, i):
    time.sleep(120)


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_loader_worker_failure_ends_the_run_with_a_message(how, tiny_models, surd, tmp_path, monkeypatch):
    from stages import encode_latents as E
    from surpipe.data import image_loader
    from surpipe.errors import SurpipeError

    monkeypatch.setattr(image_loader.ImageRows, "__getitem__", _die if how == "dies" else _stall)
    cfg = E.EncodeLatentsConfig(data=str(surd), store=str(tmp_path / "s.zarr"), model=str(tiny_models / "sd"),
                                parts=["vae"], workers=1, loader_timeout=3, progress=False, resolution=32)
    t0 = time.perf_counter()
    with pytest.raises(SurpipeError) as e:
        E.run(cfg)
    assert time.perf_counter() - t0 < 60
    msg = str(e.value)
    assert "--workers 0" in msg and "image loading stopped" in msg
    assert ("no batch arrived within --loader-timeout 3 s" if how == "stalls" else "a loader worker failed") in msg
    assert not (tmp_path / "s.zarr").exists()  # nothing was written: the new store is removed


# --------------------------------------------------------------------------- 5. tiny CLIP


def test_make_tiny_models_builds_the_clip_model_eval_needs(tmp_path, monkeypatch):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    import surpipe.tiny as T
    from stages.make_tiny_models import TinyModelsConfig, run
    from surpipe.evaluation.clip_score import CLIPScorer

    def fake(out, seed=0, **kw):  # llm/ and sd/ are covered by tests/test_tiny_models.py
        Path(out, "fake.json").write_text("{}")

    monkeypatch.setattr(T, "build_tiny_llm", fake)
    monkeypatch.setattr(T, "build_tiny_sd", fake)
    out = run(TinyModelsConfig(out=str(tmp_path / "m"), llm_tokenizer="bpe"))
    clip = out / "clip"
    for rel in ("config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt"):
        assert (clip / rel).is_file(), rel
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    model = CLIPModel.from_pretrained(clip).eval()
    # CLIPProcessor = this image processor + this tokenizer (CLIPProcessor itself cannot be built in
    # this environment: transformers probes mistral-common, installed without its dependencies)
    improc = AutoImageProcessor.from_pretrained(clip)
    tok = CLIPTokenizer.from_pretrained(clip)
    assert type(improc).__name__.startswith("CLIPImageProcessor")
    img = Image.new("RGB", (40, 30), (200, 30, 60))
    px = improc(images=[img], return_tensors="pt")["pixel_values"]
    t = tok(["a red square", "a blue dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        o = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=px)
    assert o.logits_per_image.shape == (1, 2) and torch.isfinite(o.logits_per_image).all()
    # eval's scorer reads it, and its score is the model's own image-text cosine x 100
    with torch.no_grad():
        e_i = model.get_image_features(pixel_values=px)
        t = tok(["a red square"], return_tensors="pt", padding=True)
        e_t = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    e_i = getattr(e_i, "pooler_output", e_i)
    e_t = getattr(e_t, "pooler_output", e_t)
    ref = max(0.0, 100 * torch.nn.functional.cosine_similarity(e_i, e_t).item())
    assert 0 < ref < 100
    assert json.loads((out / "tiny_models_config.json").read_text())["clip"] is True
    assert CLIPScorer(str(clip)).score([img], ["a red square"])[0] == pytest.approx(ref, rel=2e-3, abs=0.05)


# --------------------------------------------------------------------------- 6. field mapping


def test_field_mapping_reaches_the_store(tiny_models, tmp_path):
    from PIL import Image

    from stages.extract_llm import run
    from surpipe.store import FeatureStore

    root = tmp_path / "d"
    root.mkdir()
    lines = []
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "short": f"cat {i}", "long": f"a cat {i}, oil painting"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    store = tmp_path / "s.zarr"
    run(_llm_cfg(root, store, tiny_models / "llm", layers=[1], simple_field="short", complex_field="long"))
    st = FeatureStore(store)
    assert st.prompts("simple").tolist() == ["cat 0", "cat 1", "cat 2"]
    assert st.prompts("complex").tolist() == [f"a cat {i}, oil painting" for i in range(3)]
