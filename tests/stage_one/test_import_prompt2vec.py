"""import-prompt2vec: the authors' {prompt: tensor} .pt as a row-aligned llm layer group."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import run_cli_err as _run
from helpers import sample_store


@pytest.fixture
def store(tmp_path):
    return sample_store(tmp_path / "s.zarr")


def _prompts(store):
    from surpipe.store import FeatureStore

    return [str(p) for p in FeatureStore(store).prompts("simple")]


def test_import_aligns_to_store_rows_and_reports_unmatched(tmp_path, store):
    import torch
    import zarr

    prompts = _prompts(store)
    H = 40
    g = torch.Generator().manual_seed(0)
    vec = {p: (torch.randn(H, generator=g) * 4).half() for p in dict.fromkeys(prompts)}
    missing = prompts[3]
    del vec[missing]  # a store row the file lacks
    spaced = prompts[7]
    vec["  " + spaced.replace(" ", "  ") + " "] = vec.pop(spaced)  # whitespace differs
    vec["a prompt that is not in the store"] = torch.zeros(H).half()
    f = tmp_path / "prompt2vec.pt"
    torch.save(vec, f)

    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 39, "--model", "llama-13b")
    assert rc == 0, err
    assert "1 store rows have no vector" in err and "1 file prompts match no store row" in err
    assert "not in the store" in err and "1 after whitespace normalisation" in err
    root = zarr.open_group(str(store), mode="r")
    grp = root["llm/prompt2vec"]
    x = grp["layer_39/pooled"][:]
    assert x.shape == (len(prompts), H) and x.dtype == np.float16
    matched = grp["matched"][:]
    for i, p in enumerate(prompts):
        if p == missing:
            assert not matched[i] and not x[i].any()
        else:
            key = p if p != spaced else "  " + spaced.replace(" ", "  ") + " "
            assert matched[i]
            np.testing.assert_array_equal(x[i], vec[key].numpy())
    s = grp.attrs["settings"]
    assert s["layers"] == [39] and "layer" not in s and s["hidden_size"] == H and len(s["file_sha256"]) == 64
    assert grp.attrs["provenance"]["model"] == "llama-13b" and grp.attrs["report"]["unmatched_rows"] == 1
    # train-side check: the group is complete and names the layer
    from surpipe.store import FeatureStore

    FeatureStore(store).group("llm/prompt2vec").require_complete()

    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 39)
    assert rc == 0 and "nothing to do" in err
    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 20)
    assert rc == 1 and "other settings" in err
    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 39, "--name", "strict", "--strict")
    assert rc == 1 and "--strict" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_import_refuses_bad_files(tmp_path, store):
    import pickle

    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    bad = {
        "notdict.pt": lambda p: torch.save([torch.zeros(3)], p),
        "badkey.pt": lambda p: torch.save({1: torch.zeros(3)}, p),
        "ragged.pt": lambda p: torch.save({"a": torch.zeros(3), "b": torch.zeros(4)}, p),
        "pickle.pt": lambda p: p.write_bytes(pickle.dumps({"x": Evil()})),
        "nomatch.pt": lambda p: torch.save({"zzz": torch.zeros(3)}, p),
    }
    msgs = {"notdict.pt": "{prompt: tensor} dict", "badkey.pt": "keys must be prompt strings",
            "ragged.pt": "vectors differ in size", "pickle.pt": "weights_only=True",
            "nomatch.pt": "no store row's simple prompt"}
    for name, make in bad.items():
        p = tmp_path / name
        make(p)
        rc, err = _run("import-prompt2vec", p, "--store", store, "--layer", 3)
        assert rc == 1, (name, err)
        assert msgs[name] in err, (name, err)
        assert "code ran" not in err and "Traceback" not in err
    rc, err = _run("import-prompt2vec", tmp_path / "absent.pt", "--store", store, "--layer", 3)
    assert rc == 1 and "not found" in err
    rc, err = _run("import-prompt2vec", tmp_path / "absent.pt", "--store", tmp_path / "nostore", "--layer", 3)
    assert rc == 1 and "feature store not found" in err
