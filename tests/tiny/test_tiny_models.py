"""`surpipe make-tiny-models`: the folders load with plain transformers/diffusers, tokenizers are the
real ones, builds are deterministic, and a non-empty OUT is refused."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", from open_clip / SD 1.x


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory) -> Path:
    from stages.cli import main

    out = tmp_path_factory.mktemp("cli") / "models"
    assert main(["make-tiny-models", str(out)]) == 0
    return out


def test_cli_writes_layouts_and_config(cli_models):
    out = cli_models
    for rel in ["llm/config.json", "llm/model.safetensors", "llm/tokenizer_config.json", "llm/surpipe_tiny.json",
                "sd/model_index.json", "sd/unet/diffusion_pytorch_model.safetensors",
                "sd/vae/diffusion_pytorch_model.safetensors", "sd/text_encoder/model.safetensors",
                "sd/tokenizer/vocab.json", "sd/tokenizer/merges.txt", "sd/scheduler/scheduler_config.json"]:
        assert (out / rel).is_file(), rel
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "partial folders left behind"
    cfg = json.loads((out / "tiny_models_config.json").read_text())
    assert cfg["seed"] == 0 and cfg["out"] == str(out)
    index = json.loads((out / "sd/model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert json.loads((out / "llm/surpipe_tiny.json").read_text())["tokenizer"] == "sentencepiece"


def test_llm_loads_with_plain_transformers(cli_models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cli_models / "llm")
    tok = AutoTokenizer.from_pretrained(cli_models / "llm")
    cfg = model.config
    assert cfg.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 4, 2)
    assert len(tok) == 32000 == cfg.vocab_size
    enc = tok("a photo of a cat")
    assert enc.input_ids[0] == tok.bos_token_id == 1
    assert tok.convert_ids_to_tokens(enc.input_ids)[1:] == ["▁a", "▁photo", "▁of", "▁a", "▁cat"]
    assert tok.pad_token == "<unk>" and tok.pad_token_id == 0 == cfg.pad_token_id
    batch = tok(["a photo of a cat", "a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    assert len(hs) == 5 and hs[-1].shape == (2, batch.input_ids.shape[1], 64)
    assert torch.isfinite(hs[-1]).all()


def test_sd_pipeline_loads_and_generates(cli_models):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(cli_models / "sd")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    img = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)


def test_clip_tokenizer_is_the_real_one(cli_models):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(cli_models / "sd/tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 49407
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_clip_ids_match_open_clip_tokenizer(cli_models):
    """Compared with open_clip's own SimpleTokenizer when its deps (ftfy, regex) are present."""
    from surpipe.tiny import clip_bpe_file

    if importlib.util.find_spec("ftfy") is None:
        pytest.skip("ftfy not installed: open_clip's tokenizer cannot be imported")
    from transformers import CLIPTokenizer

    path = clip_bpe_file().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_oc_tokenizer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = mod.SimpleTokenizer()
    ours = CLIPTokenizer.from_pretrained(cli_models / "sd/tokenizer")
    for text in ["a photo of a cat", "Hello, World!! it's 2024", "an astronaut riding a horse, 4k, artstation"]:
        want = [ref.sot_token_id] + ref.encode(text) + [ref.eot_token_id]
        assert ours(text).input_ids == want, text


def test_same_seed_is_byte_identical(cli_models, tiny_models):
    files = sorted(p.relative_to(cli_models) for p in cli_models.rglob("*") if p.is_file()
                   and p.name != "tiny_models_config.json")
    assert any(f.suffix == ".safetensors" for f in files)
    assert files == sorted(p.relative_to(tiny_models) for p in tiny_models.rglob("*") if p.is_file()
                           and p.name != "tiny_models_config.json")
    for f in files:
        assert (cli_models / f).read_bytes() == (tiny_models / f).read_bytes(), f


def test_refuses_non_empty_out(tmp_path, capsys):
    from stages.cli import main

    (tmp_path / "something.txt").write_text("x")
    assert main(["make-tiny-models", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something.txt"]


def test_missing_wheel_gives_install_hint(monkeypatch):
    from surpipe import tiny
    from surpipe.errors import SurpipeError

    real = importlib.util.find_spec
    monkeypatch.setattr(tiny.importlib.util, "find_spec",
                        lambda name, *a: None if name == "open_clip" else real(name, *a))
    with pytest.raises(SurpipeError, match="pip install --no-deps open_clip_torch mistral-common"):
        tiny.clip_bpe_file()


def test_sd2_like_variant_and_bpe_llm(tmp_path):
    """The builders are parameterisable: an SD-2-like variant and the no-wheel BPE LLM tokenizer."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surpipe.tiny import build_tiny_llm, build_tiny_sd

    build_tiny_sd(tmp_path / "sd2", text_width=64, text_act="gelu", prediction_type="v_prediction",
                  use_linear_projection=True, attention_head_dim=(4, 8), clip_pad_token="!")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd2")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.config.hidden_size == 64 == pipe.unet.config.cross_attention_dim
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    img = pipe("a cat", num_inference_steps=1, height=64, width=64,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)

    build_tiny_llm(tmp_path / "llm", tokenizer="bpe", num_hidden_layers=2)
    tok = AutoTokenizer.from_pretrained(tmp_path / "llm")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == tok.bos_token_id and tok.pad_token_id == 0
    assert len(tok) == model.config.vocab_size and model.config.num_hidden_layers == 2
    assert json.loads((tmp_path / "llm/surpipe_tiny.json").read_text())["tokenizer"] == "bpe"
