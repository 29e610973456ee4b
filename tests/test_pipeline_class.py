"""SDXL and other pipelines are refused by name in every command that takes an SD model, not
silently mis-encoded or mis-trained (SDXL support is its own issue)."""

from helpers import as_sdxl as _as_sdxl
from stages.cli import main
from tests.test_train import _args, make_store


def test_train_and_generate_refuse_an_sdxl_folder_by_name(tmp_path, tiny_models, capsys):
    sdxl = _as_sdxl(tiny_models / "sd", tmp_path / "sdxl")
    make_store(tmp_path / "s.zarr")
    assert main(_args(tmp_path / "s.zarr", sdxl, tmp_path / "run", "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert "StableDiffusionXLPipeline" in err and "SDXL is not supported yet" in err
    assert not (tmp_path / "run").exists()
    adapter = tmp_path / "ad"
    from surpipe.adapter import SURAdapter, SURAdapterConfig

    SURAdapter(SURAdapterConfig(width=32, nhead=4, dim_feedforward=64)).save_pretrained(adapter)
    assert main(["generate", "--model", str(sdxl), "--adapter", str(adapter), "--prompt", "a cat",
                 "--out", str(tmp_path / "g"), "--steps", "1", "--size", "32"]) == 1
    err = capsys.readouterr().err
    assert "SDXL is not supported yet" in err and "Traceback" not in err
