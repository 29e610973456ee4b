"""The authors' real checkpoint structure in import-official, damaged or exotic tensors in both
imports, absurd adapter configs, and run folders given to SURAdapter.from_pretrained."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers.authors_reference import TEMPLATE_KEYS, TheirAdapter, imported_in_float64
from helpers import run_cli_err as _run
from helpers import sample_store
from surpipe import SURAdapter, SurpipeError
from surpipe.adapter import SURAdapterConfig

D, H, FF, L = 32, 4, 48, 77


def theirs_trained(seed=0, adapter_weight=0.1):
    """The authors' module with every used weight random (fc too), in eval mode."""
    torch.manual_seed(seed)
    m = TheirAdapter(D, H, FF, adapter_weight=adapter_weight)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("encoder_layer."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        m.attention.query_layer.weight.mul_(2.0)
        m.attention.key_layer.weight.mul_(2.0)
    return m.eval()


# ------------------------------------------------------------ the authors' real checkpoint structure
def test_real_48_key_checkpoint_imports_and_matches_their_forward(tmp_path):
    theirs = theirs_trained()
    sd = theirs.state_dict()
    assert len(sd) == 48 and all(k in sd for k in TEMPLATE_KEYS)
    f = tmp_path / "adapter_checkpoint1000.pt"
    torch.save(sd, f)
    out = tmp_path / "imp"
    rc, err = _run("import-official", f, out, "--adapter-weight", 0.1, "--nhead", H)
    assert rc == 0, err
    assert "left out 12 encoder_layer.* tensors" in err and "never uses" in err
    rep = json.loads((out / "import_config.json").read_text())["_surpipe"]
    assert rep["unused_keys"] == sorted(TEMPLATE_KEYS) and "template layer" in rep["unused_keys_reason"]

    ad = SURAdapter.from_pretrained(out)
    assert not ad.training and ad.config.token_mixing == "tokenwise"
    ad, theirs, x = imported_in_float64(ad, theirs, (3, L, D), seed=2)  # exact import; float64 forwards
    with torch.no_grad():
        got = ad.forward_with_aux(x)
        # tokenwise = their forward at their training batch size (1), dropout off in both
        for b in range(3):
            want = theirs(x[b:b + 1])
            for g_, w_ in zip(got, want):
                torch.testing.assert_close(g_[b:b + 1], w_, rtol=1e-6, atol=1e-7)
        # the same weights in sequence mode = their module with the encoder across the tokens
        seq = SURAdapter(dataclass_replace(ad.config, token_mixing="sequence")).double().eval()
        seq.load_state_dict(ad.state_dict())
        for g_, w_ in zip(seq.forward_with_aux(x), theirs.forward_sequence(x)):
            torch.testing.assert_close(g_, w_, rtol=1e-6, atol=1e-7)
        assert (seq(x) - got[0]).abs().max() > 1e-3  # the two modes really differ
    assert (got[0] - 0.9 * x).abs().max() > 1e-2  # the adapter branch is not negligible


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.mark.parametrize("case", ["unknown", "partial_template", "misshapen_template", "template_extra"])
def test_real_checkpoint_still_refuses_anything_else(tmp_path, case):
    sd = dict(theirs_trained().state_dict())
    if case == "unknown":
        sd["llm_resize.weight"] = torch.zeros(D, 5)
        expect = "unexpected key: llm_resize.weight"
    elif case == "partial_template":
        del sd["encoder_layer.linear1.bias"]
        expect = "missing key: encoder_layer.linear1.bias"
    elif case == "misshapen_template":
        sd["encoder_layer.linear1.weight"] = torch.zeros(FF + 1, D)
        expect = "shape mismatch for encoder_layer.linear1.weight"
    else:
        sd["encoder_layer.extra.weight"] = torch.zeros(3)
        expect = "unexpected key: encoder_layer.extra.weight"
    f = tmp_path / "bad.pt"
    torch.save(sd, f)
    rc, err = _run("import-official", f, tmp_path / "o", "--adapter-weight", 0.1, "--nhead", H)
    assert rc == 1 and expect in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ exotic tensors
def _quantize(t):
    import warnings

    with warnings.catch_warnings():  # torch deprecates creating quantized tensors; files may hold them
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(t.float(), 0.01, 0, torch.qint8)


EXOTIC = {
    "sparse": (lambda t: t.to_sparse(), "sparse"),
    "quantized": (lambda t: _quantize(t), "quantized"),
    "complex": (lambda t: torch.complex(t, torch.ones_like(t)), "complex"),
    "integer": (lambda t: (t * 100).long(), "int64"),
}


@pytest.mark.parametrize("kind", sorted(EXOTIC))
def test_import_official_refuses_exotic_tensors(tmp_path, kind):
    make, word = EXOTIC[kind]
    sd = dict(theirs_trained().state_dict())
    sd["fc.weight"] = make(sd["fc.weight"])
    f = tmp_path / f"{kind}.pt"
    torch.save(sd, f)
    rc, err = _run("import-official", f, tmp_path / "o", "--adapter-weight", 0.1, "--nhead", H)
    assert rc == 1, err
    assert "fc.weight" in err and word in err and "not plain dense floating-point" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_import_official_refuses_nonfinite_and_absurd_settings(tmp_path):
    sd = dict(theirs_trained().state_dict())
    sd["attention.key_layer.bias"] = sd["attention.key_layer.bias"].clone()
    sd["attention.key_layer.bias"][0] = math.nan
    f = tmp_path / "nan.pt"
    torch.save(sd, f)
    rc, err = _run("import-official", f, tmp_path / "o", "--adapter-weight", 0.1, "--nhead", H)
    assert rc == 1 and "NaN or Inf" in err and "attention.key_layer.bias" in err
    good = tmp_path / "good.pt"
    torch.save(theirs_trained().state_dict(), good)
    for args, word in ((["--nhead", 0], "nhead"), (["--nhead", 5], "divisible"),
                       (["--nhead", 10**9], "nhead")):
        rc, err = _run("import-official", good, tmp_path / "o", "--adapter-weight", 0.1, *args)
        assert rc == 1 and word in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ prompt2vec
@pytest.fixture
def store(tmp_path):
    return sample_store(tmp_path / "s.zarr")


def _prompts(store):
    from surpipe.store import FeatureStore

    return list(dict.fromkeys(str(p) for p in FeatureStore(store).prompts("simple")))


@pytest.mark.parametrize("kind", sorted(EXOTIC))
def test_prompt2vec_refuses_exotic_tensors(tmp_path, store, kind):
    make, word = EXOTIC[kind]
    vec = {p: torch.randn(16) for p in _prompts(store)}
    first = next(iter(vec))
    vec[first] = make(vec[first])
    f = tmp_path / "p.pt"
    torch.save(vec, f)
    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 3)
    assert rc == 1 and word in err and "dense floating-point" in err and "Traceback" not in err, err


def test_prompt2vec_counts_empty_misfit_and_nonfinite_vectors(tmp_path, store):
    import zarr

    prompts = _prompts(store)
    g = torch.Generator().manual_seed(0)
    vec = {p: torch.randn(16, generator=g).half() for p in prompts}
    bad = {prompts[0]: torch.zeros(0).half(), prompts[1]: torch.randn(12).half(),
           prompts[2]: torch.tensor([math.nan] + [0.0] * 15).half(),
           prompts[3]: torch.tensor([math.inf] + [0.0] * 15).half()}
    vec.update(bad)
    vec["unused empty"] = torch.zeros(0)
    f = tmp_path / "p.pt"
    torch.save(vec, f)
    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 3, "--name", "strict", "--strict")
    assert rc == 1 and "5 vectors" in err and "unusable" in err and "--strict" in err
    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 3, "--no-progress")
    assert rc == 0, err
    assert "5 file vectors are unusable" in err and "2 empty vector" in err and "2 NaN or Inf" in err
    from surpipe.store import FeatureStore

    rows = [str(p) for p in FeatureStore(store).prompts("simple")]
    n_bad_rows = sum(r in bad for r in rows)
    assert "1 other width" in err and f"{n_bad_rows} store rows use them" in err
    assert "have no vector in the file" not in err  # their prompts are in the file: not "absent"
    grp = zarr.open_group(str(store), mode="r")["llm/prompt2vec"]
    x, matched = grp["layer_3/pooled"][:], grp["matched"][:]
    assert x.shape[1] == 16 and np.isfinite(x).all()
    for i, p in enumerate(rows):
        if p in bad:
            assert not matched[i] and not x[i].any()
        else:
            assert matched[i]
            np.testing.assert_array_equal(x[i], vec[p].numpy())
    rep = grp.attrs["report"]
    assert rep["unusable_file_vectors"] == 5 and rep["rows_with_unusable_vector"] == sum(r in bad for r in rows)


def test_prompt2vec_refuses_all_empty_and_fp16_overflow_counted(tmp_path, store):
    prompts = _prompts(store)
    f = tmp_path / "empty.pt"
    torch.save({p: torch.zeros(0) for p in prompts}, f)
    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 3)
    assert rc == 1 and "every vector is empty" in err
    # float32 values beyond float16's range: skipped when storing float16, kept as float32
    vec = {p: torch.randn(8) for p in prompts}
    vec[prompts[0]] = torch.full((8,), 1e6)
    torch.save(vec, f)
    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 3, "--no-progress")
    assert rc == 0 and "beyond float16" in err
    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 3, "--name", "f32",
                   "--store-dtype", "float32", "--no-progress")
    assert rc == 0 and "unusable" not in err


# ------------------------------------------------------------ absurd adapter configs
ABSURD = [
    ({"width": 10**9}, "width"), ({"nhead": 0}, "nhead"), ({"num_layers": 10**6}, "num_layers"),
    ({"dim_feedforward": -5}, "dim_feedforward"), ({"width": 30, "nhead": 4}, "divisible"),
    ({"width": True}, "width"), ({"width": 16384, "dim_feedforward": 262144, "num_layers": 64}, "parameters"),
    ({"dropout": 1.5}, "dropout"), ({"adapter_weight": -0.1}, "adapter_weight"),
    ({"adapter_weight": math.nan}, "adapter_weight"), ({"nhead": 2.5}, "nhead"),
]


@pytest.mark.parametrize("change,word", ABSURD)
def test_absurd_adapter_config_refused_before_allocating(tmp_path, monkeypatch, change, word):
    import surpipe.adapter as A

    SURAdapter(width=D, nhead=H, dim_feedforward=FF).save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "ad" / "config.json").write_text(json.dumps(cfg))

    def no_alloc(*a, **k):
        raise AssertionError("a layer was allocated for an invalid config")

    monkeypatch.setattr(A.nn, "TransformerEncoderLayer", no_alloc)
    monkeypatch.setattr(A.nn, "Linear", no_alloc)
    with pytest.raises(SurpipeError, match=word) as ei:
        SURAdapter.from_pretrained(tmp_path / "ad")
    assert "config.json" in str(ei.value)


def test_config_problems_bounds():
    assert SURAdapterConfig().problems() == []
    assert SURAdapterConfig(width=1024, nhead=16, dim_feedforward=4096, num_layers=4).problems() == []
    assert SURAdapterConfig().parameter_count() == sum(
        v.numel() for v in SURAdapter(SURAdapterConfig()).state_dict().values())
    p = SURAdapterConfig(width=-1, nhead=0, num_layers=10**6, dropout=math.inf).problems()
    assert len(p) == 4


# ------------------------------------------------------------ run folders
def test_from_pretrained_accepts_a_run_folder(tmp_path):
    from surpipe.adapter import resolve_adapter_dir

    run = tmp_path / "run"
    m = SURAdapter(width=D, nhead=H, dim_feedforward=FF, adapter_weight=0.3)
    m.save_pretrained(run / "adapter")
    (run / "checkpoints").mkdir()
    loaded = SURAdapter.from_pretrained(run)
    assert loaded.config == m.config and not loaded.training
    assert resolve_adapter_dir(run) == run / "adapter"
    assert resolve_adapter_dir(run / "adapter") == run / "adapter"

    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(SurpipeError, match="without a finished adapter"):
        SURAdapter.from_pretrained(unfinished)
    (tmp_path / "a.pt").write_bytes(b"x")
    with pytest.raises(SurpipeError, match="import-official"):
        SURAdapter.from_pretrained(tmp_path / "a.pt")
    with pytest.raises(SurpipeError, match="adapter folder not found"):
        SURAdapter.from_pretrained(tmp_path / "nope")
