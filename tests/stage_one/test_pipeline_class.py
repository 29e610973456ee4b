"""Each command takes the pipeline families it handles and refuses the others by name, never
silently mis-encoding or mis-training them: encode-latents takes SD 1.x/2.x and SDXL; train,
generate and eval still refuse SDXL (issue 14 adds them next)."""

import json

import pytest

from helpers import as_sdxl as _as_sdxl
from helpers import run_cli
from stages.cli import main
from helpers.stores import _args, make_store


def test_check_pipeline_class_families(tiny_models, tmp_path):
    from surpipe.errors import SurpipeError
    from surpipe.sd import check_pipeline_class

    sd, sdxl = str(tiny_models / "sd"), str(tiny_models / "sdxl")
    assert check_pipeline_class(sd) == "sd" and check_pipeline_class(sd, accept=("sd", "sdxl")) == "sd"
    assert check_pipeline_class(sdxl, accept=("sd", "sdxl")) == "sdxl"
    with pytest.raises(SurpipeError, match="StableDiffusionXLPipeline.*SDXL is not supported yet"):
        check_pipeline_class(sdxl)  # the default: SD only (train, generate, eval)
    with pytest.raises(SurpipeError, match="Stable Diffusion 1.x / 2.x is not supported by this command"):
        check_pipeline_class(sd, accept=("sdxl",))
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(SurpipeError, match="Stable Diffusion 3 is not supported yet"):
        check_pipeline_class(str(other), accept=("sd", "sdxl"))


def test_encode_latents_takes_a_real_sdxl_folder_and_refuses_a_fake_one_clearly(tiny_models, tmp_path):
    from helpers.images import _write_surd

    surd = _write_surd(tmp_path / "data", n=2)
    rc, out, err = run_cli("encode-latents", "--data", surd, "--store", tmp_path / "s.zarr", "--model",
                           tiny_models / "sdxl", "--parts", "clip", "--no-progress")
    assert rc == 0, err
    fake = _as_sdxl(tiny_models / "sd", tmp_path / "fake")  # says SDXL, has SD's parts only
    rc, out, err = run_cli("encode-latents", "--data", surd, "--store", tmp_path / "f.zarr", "--model", fake)
    assert rc == 1 and "Traceback" not in err
    assert "StableDiffusionXLPipeline" in err
    assert "tokenizer_2/ is missing" in err and "text_encoder_2/ is missing" in err
    assert not (tmp_path / "f.zarr").exists()


def test_train_and_generate_refuse_an_sdxl_folder_by_name(tmp_path, tiny_models, capsys):
    # a folder that names StableDiffusionXLPipeline is refused by name, never trained or rendered as SD:
    # "not supported yet" while the command takes SD only, a missing SDXL part once it takes SDXL too
    sdxl = _as_sdxl(tiny_models / "sd", tmp_path / "sdxl")
    make_store(tmp_path / "s.zarr")
    assert main(_args(tmp_path / "s.zarr", sdxl, tmp_path / "run", "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert "StableDiffusionXLPipeline" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    adapter = tmp_path / "ad"
    from surpipe.adapter import SURAdapter, SURAdapterConfig

    SURAdapter(SURAdapterConfig(width=32, nhead=4, dim_feedforward=64)).save_pretrained(adapter)
    assert main(["generate", "--model", str(sdxl), "--adapter", str(adapter), "--prompt", "a cat",
                 "--out", str(tmp_path / "g"), "--steps", "1", "--size", "32"]) == 1
    err = capsys.readouterr().err
    assert "StableDiffusionXLPipeline" in err and "Traceback" not in err
