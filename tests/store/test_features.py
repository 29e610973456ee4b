"""surpipe.features: each feature kind's contract in one class. Its arrays are what the writers
write (tiny models on the bundled sample), its checks find edited and missing arrays, its typed
reads give what training uses, and every stored array name is spelled in one module only
(its kind's, surpipe/features/<kind>.py)."""

from __future__ import annotations

import io
import json
import re
import shutil
import tokenize
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli_err as _run
from helpers import sample_store

REPO = Path(__file__).resolve().parents[2]
LAYERS = [1, 3]


@pytest.fixture(scope="module")
def written(tiny_models, tmp_path_factory) -> Path:
    """A store of the sample written by the real stages: extract-llm (tokens pooling: every LLM
    array), encode-latents (clip and vae with flip), import-prompt2vec."""
    import torch

    from stages.encode_latents import EncodeLatentsConfig
    from stages.encode_latents import run as encode
    from stages.extract_llm import ExtractLLMConfig
    from stages.extract_llm import run as extract
    from surpipe.store import FeatureStore

    tmp = tmp_path_factory.mktemp("features")
    store = sample_store(tmp / "s.zarr", block_rows=16)
    data = str(REPO / "data" / "sample")
    extract(ExtractLLMConfig(data=data, store=str(store), model=str(tiny_models / "llm"), layers=LAYERS,
                             pooling="tokens", name="tiny", check_images="none", progress=False))
    encode(EncodeLatentsConfig(data=data, store=str(store), model=str(tiny_models / "sd"), resolution=16, flip=True,
                               name="sd", workers=0, check_images="none", progress=False))
    prompts = [str(p) for p in FeatureStore(store).prompts("simple")]
    g = torch.Generator().manual_seed(0)
    f = tmp / "p2v.pt"
    torch.save({p: torch.randn(24, generator=g).half() for p in dict.fromkeys(prompts[1:])}, f)
    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 39)
    assert rc == 0, err
    return store


def _copy(written, tmp_path) -> Path:
    dst = tmp_path / "s.zarr"
    shutil.copytree(written, dst)
    return dst


def _zgroup(store, path, mode="r"):
    import zarr

    return zarr.open_group(str(store), mode=mode)[path]


# --------------------------------------------------------------------------- arrays(settings) = what is written


@pytest.mark.parametrize("path", ["llm/tiny", "llm/prompt2vec", "clip/sd", "vae/sd-16"])
def test_arrays_of_the_settings_are_what_the_writer_wrote(written, path):
    from surpipe.features import feature_kind

    zg = _zgroup(written, path)
    attrs = dict(zg.attrs)
    kw = {}
    if path == "llm/tiny":  # the block-ragged per-token arrays: their capacity comes from the lengths
        kw["tokens_capacity"] = int(zg[f"layer_{LAYERS[0]}/tokens"].attrs["block_capacity"])
    specs = feature_kind(path.split("/")[0]).arrays(attrs["settings"], "zstd", **kw)
    assert list(specs) == attrs["arrays"]
    for name, spec in specs.items():
        a = zg[name]
        assert tuple(a.shape[1:]) == tuple(spec.row_shape), name
        assert a.dtype == np.dtype(spec.dtype), name
        assert a.attrs.get("block_capacity") == spec.block_capacity, name
    expected = {"llm/tiny": {"layer_1/pooled", "layer_3/pooled", "layer_1/tokens", "layer_3/tokens",
                             "token_counts", "token_offsets"},
                "llm/prompt2vec": {"layer_39/pooled", "matched"},
                "clip/sd": {"simple", "complex", "simple_len", "complex_len"},
                "vae/sd-16": {"mean", "std", "flip_mean", "flip_std"}}[path]
    assert set(specs) == expected


def test_prompt2vec_settings_say_layers_like_extract_llm(written):
    s = _zgroup(written, "llm/prompt2vec").attrs["settings"]
    t = _zgroup(written, "llm/tiny").attrs["settings"]
    assert s["layers"] == [39] and "layer" not in s and t["layers"] == LAYERS
    assert s["output"] == t["output"] and s["pooling"] == "mean" and s["source"] == "prompt2vec"


def test_written_groups_pass_their_checks(written):
    from surpipe.features import KINDS, feature_kind
    from surpipe.store import KINDS as STORE_KINDS
    from surpipe.store import FeatureStore

    assert set(KINDS) == set(STORE_KINDS)
    st = FeatureStore(written)
    for path in st.group_paths():
        assert feature_kind(path.split("/")[0]).check(st.group(path)) == [], path


# --------------------------------------------------------------------------- check(group)


def _edit_meta(store, array_path, **fields):
    p = Path(store) / array_path / "zarr.json"
    meta = json.loads(p.read_text())
    meta.update(fields)
    p.write_text(json.dumps(meta))


def test_check_finds_an_edited_dtype(written, tmp_path):
    from surpipe.features import ClipFeatures, LLMFeatures, VaeFeatures

    store = _copy(written, tmp_path)
    _edit_meta(store, "vae/sd-16/std", data_type="float32")
    _edit_meta(store, "clip/sd/simple_len", data_type="int64")
    _edit_meta(store, "llm/tiny/token_offsets", data_type="int32")
    assert VaeFeatures.check(_zgroup(store, "vae/sd-16")) == ["std: dtype float32, but the settings say float16"]
    assert ClipFeatures.check(_zgroup(store, "clip/sd")) == ["simple_len: dtype int64, but the settings say int32"]
    assert LLMFeatures.check(_zgroup(store, "llm/tiny")) == ["token_offsets: dtype int32, but the settings say int64"]


def _drop_array(store, group, name):
    zg = _zgroup(store, group, mode="r+")
    zg.attrs["arrays"] = [a for a in zg.attrs["arrays"] if a != name]
    shutil.rmtree(Path(store) / group / name)


@pytest.mark.parametrize("group, name, message", [
    ("vae/sd-16", "flip_std", "settings say flip but array flip_std is not stored"),
    ("vae/sd-16", "std", "settings imply array std but it is not stored"),
    ("clip/sd", "complex_len", "settings imply array complex_len but it is not stored"),
    ("llm/tiny", "layer_3/tokens", "settings imply array layer_3/tokens but it is not stored"),
    ("llm/prompt2vec", "matched", "settings imply array matched but it is not stored"),
])
def test_check_and_verify_find_a_missing_array(written, tmp_path, group, name, message):
    from surpipe.features import feature_kind

    store = _copy(written, tmp_path)
    _drop_array(store, group, name)
    assert feature_kind(group.split("/")[0]).check(_zgroup(store, group)) == [message]
    rc, err = _run("verify", store)
    assert rc == 1 and f"{group}: {message}" in err and "Traceback" not in err


def test_check_names_a_listed_array_that_is_gone(written, tmp_path):
    from surpipe.features import ClipFeatures

    store = _copy(written, tmp_path)
    shutil.rmtree(Path(store) / "clip/sd/complex")
    assert ClipFeatures.check(_zgroup(store, "clip/sd")) == ["complex: missing"]


# --------------------------------------------------------------------------- typed reads = what training uses


def test_typed_reads_give_the_models_numbers(written, tiny_models):
    from surpipe.features import ClipFeatures, LatentParams, LLMFeatures, VaeFeatures
    from surpipe.store import FeatureStore

    st = FeatureStore(written)
    llm_cfg = json.loads((tiny_models / "llm" / "config.json").read_text())
    te_cfg = json.loads((tiny_models / "sd" / "text_encoder" / "config.json").read_text())
    vae_cfg = json.loads((tiny_models / "sd" / "vae" / "config.json").read_text())
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)

    assert LLMFeatures.layers(st.group("llm/tiny")) == LAYERS
    assert LLMFeatures.width(st.group("llm/tiny"), 3) == llm_cfg["hidden_size"]
    assert LLMFeatures.width(st.group("llm/tiny"), 2) is None
    assert LLMFeatures.layers(st.group("llm/prompt2vec")) == [39]
    assert LLMFeatures.train_arrays(st.group("llm/prompt2vec"), 39) == {"llm": "layer_39/pooled",
                                                                         "llm_matched": "matched"}
    assert LLMFeatures.train_arrays(st.group("llm/tiny"), 1) == {"llm": "layer_1/pooled"}
    assert ClipFeatures.embedding_shape(st.group("clip/sd")) == (77, te_cfg["hidden_size"])
    lat = VaeFeatures.latent_params(st.group("vae/sd-16"))
    assert lat == LatentParams((vae_cfg["latent_channels"], 16 // down, 16 // down), vae_cfg["scaling_factor"],
                               0.0, True)
    assert VaeFeatures.train_arrays(True) == {"lat_mean": "mean", "lat_std": "std", "lat_flip_mean": "flip_mean",
                                              "lat_flip_std": "flip_std"}
    lens = ClipFeatures.token_lengths(st.group("clip/sd"))
    assert set(lens) == {"simple", "complex"} and lens["simple"].shape == (st.num_samples,)


def test_train_check_reads_the_groups_through_the_kinds(written, tiny_models, tmp_path):
    from surpipe.train.config import TrainConfig
    from surpipe.train.recipe import TrainRecipe

    vae_cfg = json.loads((tiny_models / "sd" / "vae" / "config.json").read_text())
    llm_cfg = json.loads((tiny_models / "llm" / "config.json").read_text())
    r = TrainRecipe(TrainConfig(store=str(written), model=str(tiny_models / "sd"), out=str(tmp_path / "run"),
                                llm_group="tiny", llm_layer=-1, nhead=4))
    r.check()
    assert r.groups.llm_layer == 3 and r.groups.use_flip
    assert r.llm_size == llm_cfg["hidden_size"] and r.scaling_factor == vae_cfg["scaling_factor"]
    assert r.shift_factor == 0.0 and r.latent_shape[0] == vae_cfg["latent_channels"] and r.seq_len == 77


def _as_old_prompt2vec(store):
    """Rewrite llm/prompt2vec's settings as imports before format 2's ``layers`` wrote them."""
    from surpipe.store import settings_hash

    zg = _zgroup(store, "llm/prompt2vec", mode="r+")
    s = dict(zg.attrs["settings"])
    s["layer"] = s.pop("layers")[0]
    zg.attrs.update({"settings": s, "settings_hash": settings_hash(s)})
    return zg, s


def test_old_prompt2vec_groups_with_layer_are_still_read(written, tmp_path):
    """Groups imported before settings said ``layers`` record ``layer``: they verify, train reads
    them and a repeated import finds them done instead of refusing other settings."""
    from surpipe.features import LLMFeatures
    from surpipe.store import FeatureStore

    store = _copy(written, tmp_path)
    zg, s = _as_old_prompt2vec(store)
    assert _run("verify", store)[0] == 0
    g = FeatureStore(store).group("llm/prompt2vec")
    assert LLMFeatures.settings_layers(g.settings) == [39] and LLMFeatures.check(g) == []
    zg.attrs["arrays"] = ["layer_39/pooled", "layer_2/pooled", "matched"]
    _zgroup(store, "llm/prompt2vec", mode="r+").create_array("layer_2/pooled", shape=(64, 24), dtype="float16")
    assert "arrays layer_2/... are stored but layer 2 is not in the settings" in LLMFeatures.check(zg)


def test_repeated_import_into_an_old_layer_group_is_done(written, tmp_path):
    store = _copy(written, tmp_path)
    zg, s = _as_old_prompt2vec(store)
    f = tmp_path / "same.pt"
    shutil.copy(next(Path(written).parent.glob("p2v.pt")), f)
    rc, err = _run("import-prompt2vec", f, "--store", store, "--layer", 39)
    assert rc == 0, err
    assert "nothing to do, already imported" in err
    assert _zgroup(store, "llm/prompt2vec").attrs["settings"] == s


# --------------------------------------------------------------------------- one module spells each name


STORED = ("flip_mean", "flip_std", "simple_len", "complex_len", "token_counts", "token_offsets", "matched")
PATTERNS = {
    **{n: re.compile(rf"[\"']{n}[\"']") for n in STORED},
    "layer_<L>/...": re.compile(r"[\"']layer_(\{|\d|<)"),
    ".../pooled": re.compile(r"/pooled[\"']"),
    ".../tokens": re.compile(r"/tokens[\"']"),
    # the generic names (mean, std, simple, complex) are also words of other meanings: what must
    # not appear outside the kinds' module is a group array read or lookup by a literal name
    "group.array(<literal>)": re.compile(r"\.array\(\s*[\"']"),
    "<literal> in ....array_names": re.compile(r"[\"'][\w/]+[\"']\s+(not\s+)?in\s+[\w.()\[\]]*array_names"),
}


def _code_without_comments(path: Path) -> str:
    """The source with comments blanked (a comment may name an array)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            (r, c0), (_, c1) = tok.start, tok.end
            lines[r - 1] = lines[r - 1][:c0] + " " * (c1 - c0) + lines[r - 1][c1:]
    return "".join(lines)


def test_each_stored_array_name_is_spelled_in_one_module():
    sources = {str(p.relative_to(REPO)): _code_without_comments(p)
               for d in ("surpipe", "stages") for p in sorted((REPO / d).rglob("*.py"))}
    where = {name: sorted(m for m, text in sources.items() if rx.search(text)) for name, rx in PATTERNS.items()}
    outside = {name: [m for m in ms if not m.startswith("surpipe/features/")] for name, ms in where.items()}
    assert outside == {name: [] for name in PATTERNS}, outside
    home = {"flip_mean": "vae", "flip_std": "vae", "simple_len": "clip", "complex_len": "clip", "token_counts": "llm",
            "token_offsets": "llm", "matched": "llm", "layer_<L>/...": "llm", ".../pooled": "llm", ".../tokens": "llm"}
    assert {name: where[name] for name in home} == {n: [f"surpipe/features/{k}.py"] for n, k in home.items()}
