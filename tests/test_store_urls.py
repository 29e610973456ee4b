"""A store given as a URL (s3://, gs://, file://) is refused with one clear message by every command
that takes --store, and nothing is written: no local folder named after the URL appears."""

from __future__ import annotations

import pytest

from helpers import REPO, run_cli_err

URL = "s3://bucket/prefix/surd.zarr"


@pytest.mark.parametrize("argv", [
    ["extract-llm", "--data", "DATA", "--store", URL, "--model", "LLM", "--layers", "1", "--no-progress"],
    ["encode-latents", "--data", "DATA", "--store", URL, "--model", "SD", "--no-progress"],
    ["train", "--store", URL, "--model", "SD", "--llm-layer", "1", "--out", "run", "--no-progress"],
    ["verify", URL],
    ["inspect", URL],
    ["eval", "--store", URL, "--adapter", "AD", "--no-clip-score"],
], ids=lambda a: a[0])
def test_url_stores_are_refused_and_nothing_is_written(argv, tiny_models, tmp_path, monkeypatch):
    from surpipe.adapter import SURAdapter

    SURAdapter(width=32, nhead=4, dim_feedforward=64).save_pretrained(tmp_path / "ad")
    subst = {"DATA": str(REPO / "data" / "sample"), "LLM": str(tiny_models / "llm"), "SD": str(tiny_models / "sd"),
             "AD": str(tmp_path / "ad")}
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli_err(*[subst.get(a, a) for a in argv])
    assert rc == 1, err
    assert "not supported yet" in err and "Traceback" not in err
    assert not (tmp_path / "s3:").exists() and not list(tmp_path.glob("s3*"))
