"""A store given as a URL: ``s3://`` (and any installed fsspec protocol) is a remote store (the
commands themselves are tested against a real S3 server in test_store_s3.py); ``file://`` is the
local folder; an unknown protocol (often a mistyped local path) or a protocol whose fsspec backend is
missing is one clear message naming what to do, from every command that takes --store, and
nothing is written: no local folder named after the URL appears."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO, SyntheticDataset, run_cli_err

COMMANDS = [
    ["extract-llm", "--data", "DATA", "--store", "URL", "--model", "LLM", "--layers", "1", "--no-progress"],
    ["encode-latents", "--data", "DATA", "--store", "URL", "--model", "SD", "--no-progress"],
    ["train", "--store", "URL", "--model", "SD", "--llm-layer", "1", "--out", "run", "--no-progress"],
    ["verify", "URL"],
    ["inspect", "URL"],
    ["eval", "--store", "URL", "--adapter", "AD", "--no-clip-score"],
]


@pytest.mark.parametrize("url, expected", [
    ("s4://bucket/prefix/surd.zarr", "unknown storage protocol 's4'"),  # a typo: not an fsspec protocol
    ("gs://bucket/surd.zarr", "pip install gcsfs"),  # a known protocol whose backend is not installed
])
@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[0])
def test_unknown_or_uninstalled_protocols_are_one_clear_error_and_nothing_is_written(argv, url, expected, tiny_models,
                                                                                   tmp_path, monkeypatch):
    import importlib.util

    if url.startswith("gs://") and importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    from surpipe.adapter import SURAdapter

    SURAdapter(width=32, nhead=4, dim_feedforward=64).save_pretrained(tmp_path / "ad")
    subst = {"DATA": str(REPO / "data" / "sample"), "LLM": str(tiny_models / "llm"), "SD": str(tiny_models / "sd"),
             "AD": str(tmp_path / "ad"), "URL": url}
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli_err(*[subst.get(a, a) for a in argv])
    assert rc == 1, err
    assert expected in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("s4*")) and not list(tmp_path.glob("gs*"))


def test_url_stores_are_no_longer_refused():
    from surpipe.store.location import RemotePath, store_path

    p = store_path("s3://bucket/prefix/surd.zarr")
    assert isinstance(p, RemotePath) and str(p) == "s3://bucket/prefix/surd.zarr"
    assert str(p.with_name("surd.zarr.locks")) == "s3://bucket/prefix/surd.zarr.locks"


def test_file_urls_are_the_local_folder(tmp_path):
    from surpipe.store import FeatureStore

    ds = SyntheticDataset([(f"k{i}", f"s{i}", f"c{i}") for i in range(5)])
    st = FeatureStore.create_or_open(f"file://{tmp_path}/s.zarr", ds, block_rows=2)
    assert st.path == Path(tmp_path / "s.zarr") and (tmp_path / "s.zarr" / "zarr.json").is_file()
    assert FeatureStore(tmp_path / "s.zarr").num_samples == 5
