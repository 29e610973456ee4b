"""Issue 13, item 4: small utilities with one home each (atomic writes, first line of an exception,
dtype names, JSON objects, messages, what lives beside a store)."""

from __future__ import annotations

import logging

import pytest


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    from surpipe.config import atomic_path, atomic_write_text

    p = tmp_path / "sub" / "f.bin"
    with atomic_path(p) as tmp:
        assert tmp.parent == p.parent and tmp != p
        tmp.write_bytes(b"one")
    assert p.read_bytes() == b"one"
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert p.read_bytes() == b"one"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.bin"]  # no temporary file left
    atomic_write_text(p, "two\n")
    assert p.read_text() == "two\n"


def test_first_line_default_and_empty():
    from surpipe.errors import first_line

    assert first_line(ValueError("  a\nb")) == "a"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(KeyError(), "") == ""


def test_one_dtype_resolver():
    import torch

    from surpipe import adapter, devices
    from surpipe.errors import SurpipeError

    assert adapter.parse_dtype is devices.torch_dtype
    assert devices.torch_dtype("fp64") is torch.float64 and devices.torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(SurpipeError, match="unknown dtype"):
        devices.torch_dtype("int8")
    from surpipe import llm
    from surpipe import sd

    assert not hasattr(llm, "resolve_dtype") and not hasattr(sd, "DTYPES")


def test_model_config_must_be_a_json_object(tmp_path):
    from surpipe.errors import SurpipeError
    from surpipe.hub import read_model_config

    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("[1, 2]")
    with pytest.raises(SurpipeError, match="must hold a JSON object"):
        read_model_config(str(tmp_path), "unet")
    (tmp_path / "unet" / "config.json").write_text("{")
    with pytest.raises(SurpipeError, match="is not valid JSON"):
        read_model_config(str(tmp_path), "unet")


def test_stage_messages_go_through_the_logger(capsys):
    from stages import import_official

    assert import_official.log is logging.getLogger("surpipe")
    import_official.log.info("hello")
    assert capsys.readouterr().err == "surpipe: hello\n"  # the handler follows sys.stderr at emit time


def test_adding_layers_computes_beside_the_store(tiny_models, sample_dir, tmp_path, monkeypatch):
    from stages.extract_llm import ExtractLLMConfig, run
    from surpipe.store import FeatureStore

    def cfg(layers):
        return ExtractLLMConfig(data=str(sample_dir), store=str(store), model=str(tiny_models / "llm"), layers=layers,
                                name="g", progress=False, check_images="none", store_dtype="float32",
                                block_rows=4)

    store = tmp_path / "s.zarr"
    run(cfg([1]))
    opened = []
    real = FeatureStore.create_or_open.__func__

    def spy(cls, path, *a, **k):
        opened.append(str(path))
        return real(cls, path, *a, **k)

    monkeypatch.setattr(FeatureStore, "create_or_open", classmethod(spy))
    rep = run(cfg([0, 1]))
    assert rep["layers_added"] == [0]
    side = [p for p in opened if "adding-layers" in p]
    assert side == [str(tmp_path / "s.zarr.adding-layers" / "g-L0.zarr")], opened
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "s.zarr.configs", "s.zarr.locks"]
    assert not any(p.name.startswith(".") for p in store.iterdir())
