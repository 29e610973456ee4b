"""Resume safety of `surpipe train` (issue 12 points 2, 9, 11; issue 11 points 11, 17).

A run folder records what it was trained on (store, dataset, groups and their settings, layer);
a resume on anything else is refused naming what changed, while the same store or model given
another way (relative path, symlink, trailing slash, a moved copy) resumes. Damaged run folders
and a full disk give one clear message each, never a traceback. Several CLIP/VAE groups are
resolved against --model.
"""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch

from stages.cli import main
from surpipe.store import ArraySpec, FeatureStore
from helpers.stores import LAT, _args, make_store, unet_only_folder

CKPT1, CKPT2 = "step-00000001", "step-00000002"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    """A store and a run folder trained 2 steps on it, with checkpoints at steps 1 and 2."""
    root = tmp_path_factory.mktemp("trained")
    store, out = root / "s.zarr", root / "run"
    make_store(store)
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2", "--checkpoint-every", "1",
                      "--no-loss-curve")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [CKPT1, CKPT2]
    return store, out


@pytest.fixture()
def run_copy(trained, tmp_path):
    """A private copy of the trained store and run folder: (store, out). The run folder recorded
    the original store's path; the copy holds the same data, so it resumes (a moved store)."""
    store, out = trained
    s, o = tmp_path / "s.zarr", tmp_path / "run"
    shutil.copytree(store, s)
    shutil.copytree(out, o)
    return s, o


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _rewrite_group(store_path, kind, name, settings, arrays, seed=1):
    """Replace a group as `--overwrite` would (new settings, every block written again)."""
    st = FeatureStore(store_path, mode="a")
    g = st.require_group(kind, name, settings, arrays, overwrite=True)
    rng = np.random.default_rng(seed)
    for b in range(st.num_blocks):
        s, e = st.block_range(b)
        g.write_block(b, {k: rng.normal(size=(e - s, *spec.row_shape)) for k, spec in arrays.items()})
    return g


LLM_ARRAYS = {f"layer_{L}/pooled": ArraySpec((16,)) for L in (1, 3)}
CLIP_ARRAYS = {"simple": ArraySpec((77, 32)), "complex": ArraySpec((77, 32)),
               "simple_len": ArraySpec((), "int32"), "complex_len": ArraySpec((), "int32")}
VAE_ARRAYS = {k: ArraySpec(LAT) for k in ("mean", "std", "flip_mean", "flip_std")}


# --------------------------------------------------------------------------- the same store


def test_moved_store_copy_resumes(run_copy, tiny_models, capsys):
    store, out = run_copy
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2")) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_same_store_by_relative_path_symlink_and_trailing_slash(trained, tmp_path, tiny_models, monkeypatch,
                                                                 capsys):
    store, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (tmp_path / "link.zarr").symlink_to(store)
    monkeypatch.chdir(tmp_path)
    rel_store = os.path.relpath(store, tmp_path)
    rel_model = os.path.relpath(tiny_models / "sd", tmp_path)
    for s, m, o in ((rel_store, rel_model, "run"), ("link.zarr", str(tiny_models / "sd") + "/", str(run) + "/"),
                    (str(store) + "/", "./" + rel_model, "./run")):
        assert main(_args(s, m, o, "--max-steps", "2")) == 0, _err(capsys)
        assert "nothing to do" in capsys.readouterr().out


# --------------------------------------------------------------------------- a changed store


def test_resume_on_another_dataset_is_refused(run_copy, tiny_models, capsys):
    store, out = run_copy
    shutil.rmtree(store)
    make_store(store, n=20)  # same groups and settings, another dataset
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 1
    err = _err(capsys)
    assert "the store's dataset changed" in err and "24 rows" in err and "20 rows" in err
    assert not (out / "checkpoints" / "step-00000003").exists()


@pytest.mark.parametrize("kind,name,settings,arrays,expect", [
    ("llm", "tiny", {"layers": [1, 3], "pooling": "last"}, LLM_ARRAYS, "pooling: None then, 'last' now"),
    ("clip", "sd", {"m": 2}, CLIP_ARRAYS, "m: 1 then, 2 now"),
    ("vae", "sd-16", {"resolution": 16, "scaling_factor": 0.13025}, VAE_ARRAYS,
     "scaling_factor: 0.18215 then, 0.13025 now"),
])
def test_resume_on_a_group_rewritten_with_other_settings_is_refused(run_copy, tiny_models, capsys, kind, name,
                                                                    settings, arrays, expect):
    store, out = run_copy
    _rewrite_group(store, kind, name, settings, arrays)
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 1
    err = _err(capsys)
    assert f"{kind}/{name} was rewritten with other settings" in err and expect in err


def test_resume_when_the_auto_picked_group_changed_is_refused(run_copy, tiny_models, capsys):
    """The first run auto-picked clip/sd (the only one); a group encoded later with --model's own
    text encoder is what the pick finds now: a different group, refused."""
    from surpipe import sd

    store, out = run_copy
    te = sd.load_text_encoder(str(tiny_models / "sd"))
    _rewrite_group(store, "clip", "tiny-sd", _clip_settings(tiny_models / "sd", te.info), CLIP_ARRAYS)
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 1
    err = _err(capsys)
    assert "clip group: clip/sd then, clip/tiny-sd now (picked automatically)" in err
    # choosing the first run's group explicitly resumes
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2", "--clip-group", "sd")) == 0


def test_run_folder_without_identity_record_still_compares_the_fingerprint(run_copy, tiny_models, capsys):
    store, out = run_copy
    cfg = json.loads((out / "config.json").read_text())
    del cfg["_surpipe"]["run"]  # as written before the identity record existed
    cfg["_surpipe"]["store_fingerprint"] = "0" * 64
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 1
    assert "the store's dataset changed: fingerprint 000000000000 then" in _err(capsys)


# --------------------------------------------------------------------------- --llm-layer -1


def test_llm_layer_minus_one_is_the_last_stored_layer(run_copy, tiny_models, capsys):
    store, out = run_copy
    from surpipe.train.config import TrainConfig
    from surpipe.train.recipe import TrainRecipe

    for layer, want in ((-1, 3), (-2, 1)):
        r = TrainRecipe(TrainConfig(store=str(store), model=str(tiny_models / "sd"), out=str(out.parent / "x"),
                                    llm_layer=layer, nhead=4))
        r.check()
        assert r.groups.llm_layer == want and r.llm_size == 16
    assert main(_args(store, tiny_models / "sd", out.parent / "y", "--llm-layer", "-3")) == 1
    err = _err(capsys)
    assert "has no layer -3 (stored layers: [1, 3])" in err and "-1 is the last" in err
    # the run was trained on layer 3: -1 resumes it while 3 is the last stored layer ...
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2", "--llm-layer", "-1")) == 0
    capsys.readouterr()
    # ... and is refused once layer 5 was added (adding layers alone does not stop --llm-layer 3)
    arrays = {f"layer_{L}/pooled": ArraySpec((16,)) for L in (1, 3, 5)}
    _rewrite_group(store, "llm", "tiny", {"layers": [1, 3, 5]}, arrays)
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3", "--llm-layer", "-1")) == 1
    assert "llm layer: 3 then, 5 now (--llm-layer -1 means the last stored layer" in _err(capsys)
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2", "--llm-layer", "3")) == 0


# --------------------------------------------------------------------------- damaged run folders


def test_out_is_a_regular_file(tmp_path, store_small, tiny_models, capsys):
    f = tmp_path / "out.txt"
    f.write_text("not a folder")
    for out in (f, f / "run"):
        assert main(_args(store_small, tiny_models / "sd", out, "--max-steps", "1")) == 1
        err = _err(capsys)
        assert f"{f} is a file, not a folder; choose another --out" in err
    assert f.read_text() == "not a folder"


@pytest.fixture()
def store_small(tmp_path):
    make_store(tmp_path / "small.zarr")
    return tmp_path / "small.zarr"


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"store": "x"', '{"store": "x"}', '"text"'])
def test_config_json_damaged(run_copy, tiny_models, capsys, content):
    store, out = run_copy
    (out / "config.json").write_text(content)
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 1
    err = _err(capsys)
    assert f"{out / 'config.json'} is damaged" in err and "choose another --out" in err


def test_checkpoints_folder_is_a_file(run_copy, tiny_models, capsys):
    store, out = run_copy
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("x")
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 1
    assert f"{out / 'checkpoints'} is not a folder" in _err(capsys)


def _damage_state_truncated(ck):
    (ck / "state.json").write_text((ck / "state.json").read_text()[:20])


def _damage_state_types(ck):
    s = json.loads((ck / "state.json").read_text())
    s["step"] = "two"
    (ck / "state.json").write_text(json.dumps(s))


def _damage_state_position(ck):
    s = json.loads((ck / "state.json").read_text())
    s["position"] = {"epoch": 0, "block_idx": "x", "row_idx": 1}
    (ck / "state.json").write_text(json.dumps(s))


def _damage_optimizer_tensor(ck):
    torch.save(torch.zeros(3), ck / "optimizer.pt")  # a valid weights_only file, not an optimizer state


def _damage_optimizer_shapes(ck):
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    first = next(iter(opt["optimizer"]["state"]))
    opt["optimizer"]["state"][first]["exp_avg"] = torch.zeros(7, 3)
    torch.save(opt, ck / "optimizer.pt")


def _damage_optimizer_groups(ck):
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {}}, ck / "optimizer.pt")


def _damage_rng_key(ck):
    from safetensors.torch import load_file, save_file

    rng = load_file(str(ck / "rng.safetensors"))
    del rng["generator"]
    save_file(rng, str(ck / "rng.safetensors"))


def _damage_adapter_width(ck):
    p = ck / "adapter" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["width"] = 10**9
    p.write_text(json.dumps(cfg))


def _damage_adapter_weights(ck):
    (ck / "adapter" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")


@pytest.mark.parametrize("damage,expect", [
    (_damage_state_truncated, "state.json is missing, unreadable or truncated"),
    (lambda ck: (ck / "state.json").unlink(), "state.json is missing"),
    (_damage_state_types, "state.json has step 'two'"),
    (_damage_state_position, "state.json has an invalid data position"),
    (_damage_optimizer_tensor, "optimizer.pt does not hold an optimizer state"),
    (_damage_optimizer_shapes, "optimizer.pt: state 'exp_avg' has shape [7, 3]"),
    (_damage_optimizer_groups, "optimizer.pt does not match this run's optimizer"),
    (_damage_rng_key, "rng.safetensors lacks generator"),
    (_damage_adapter_width, "adapter/config.json has width 1000000000"),
    (_damage_adapter_weights, "adapter/model.safetensors is unreadable"),
])
def test_damaged_latest_checkpoint_names_the_previous_one(run_copy, tiny_models, capsys, damage, expect):
    store, out = run_copy
    ck = out / "checkpoints" / CKPT2
    damage(ck)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 1
    err = _err(capsys)
    assert f"checkpoint {ck} cannot be loaded, it is damaged" in err and expect in err, err
    assert f"delete {ck} to resume from the previous checkpoint {CKPT1}" in err
    # nothing was fallen back to or written
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before


def test_damaged_only_checkpoint_says_start_over(run_copy, tiny_models, capsys):
    store, out = run_copy
    shutil.rmtree(out / "checkpoints" / CKPT2)
    _damage_rng_key(out / "checkpoints" / CKPT1)
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 1
    assert "it is the only checkpoint: delete" in _err(capsys)


def test_absurd_adapter_width_is_refused_before_allocating(run_copy, tiny_models, capsys, monkeypatch):
    """The checkpoint's adapter is never built from its config.json: the width is compared first."""
    import surpipe.adapter as A

    store, out = run_copy
    _damage_adapter_width(out / "checkpoints" / CKPT2)
    monkeypatch.setattr(A.SURAdapter, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the checkpoint adapter was built")))
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "3")) == 1
    assert "adapter/config.json has width 1000000000 where this run's adapter has 32" in _err(capsys)


def test_full_disk_at_a_checkpoint(tmp_path, store_small, tiny_models, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 2
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    args = _args(store_small, tiny_models / "sd", out, "--max-steps", "3", "--checkpoint-every", "1")
    assert main(args) == 1
    err = _err(capsys)
    assert "no space left on device while writing the checkpoint step-00000002" in err
    assert f"the previous checkpoint {CKPT1} (step 1) is intact" in err and "rerun the same command" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [CKPT1]  # no half checkpoint, no tmp
    monkeypatch.setattr(torch, "save", real_save)
    assert main(args) == 0  # space is back: resumes from step 1
    assert "resuming" in capsys.readouterr().out
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# --------------------------------------------------------------------------- .tmp-step-* folders


def test_stale_tmp_step_folders_are_cleaned_at_the_next_start(run_copy, tiny_models, capsys):
    from surpipe.store.locks import exclusive_lock

    store, out = run_copy
    ck = out / "checkpoints"
    stale = [ck / ".tmp-step-00000003-4242", ck / ".tmp-step-00000002-17"]
    for t in stale:
        (t / "adapter").mkdir(parents=True)
        (t / "optimizer.pt").write_bytes(b"half")
    keep = [ck / ".tmp-other", out / ".tmp-step-00000009-1", ck / "notes.txt"]
    keep[0].mkdir()
    keep[1].mkdir()
    keep[2].write_text("mine")
    with exclusive_lock(out / ".lock", "held by this test"):  # another job runs: nothing is touched
        assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2")) == 1
    assert all(t.exists() for t in stale)
    capsys.readouterr()
    assert main(_args(store, tiny_models / "sd", out, "--max-steps", "2")) == 0
    assert not any(t.exists() for t in stale)
    assert all(k.exists() for k in keep)
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step-")) == [CKPT1, CKPT2]


# --------------------------------------------------------------------------- several CLIP / VAE groups


def _clip_settings(model, info, **over):
    """The settings encode-latents records for a CLIP group (stages/encode_latents.py)."""
    s = {"model": str(model.resolve()), "revision": None, "variant": None,
         "text_encoder_config_hash": info["text_encoder_config_hash"], "tokenizer_hash": info["tokenizer_hash"],
         "text_encoder_weights_sha256": info["text_encoder_weights_sha256"], "max_length": 77, "hidden_size": 32,
         "use_attention_mask": False, "output": "last_hidden_state", "dtype": "float32", "store_dtype": "float16"}
    return s | over


@pytest.fixture(scope="module")
def two_models(tiny_models, tmp_path_factory):
    """The tiny SD model and a copy whose text encoder has other weights (same config)."""
    from safetensors.torch import load_file, save_file

    from surpipe import sd

    other = tmp_path_factory.mktemp("other") / "sd-b"
    shutil.copytree(tiny_models / "sd", other)
    w = other / "text_encoder" / "model.safetensors"
    t = load_file(str(w))
    k = sorted(t)[0]
    t[k] = t[k] + 0.5
    save_file(t, str(w), metadata={"format": "pt"})
    infos = {m: sd.load_text_encoder(str(m)).info for m in (tiny_models / "sd", other)}
    assert infos[tiny_models / "sd"]["text_encoder_config_hash"] == infos[other]["text_encoder_config_hash"]
    assert infos[tiny_models / "sd"]["text_encoder_weights_sha256"] != infos[other]["text_encoder_weights_sha256"]
    return tiny_models / "sd", other, infos


def _two_clip_store(path, two_models):
    sd_a, sd_b, infos = two_models
    st = make_store(path)
    _rewrite_group(path, "clip", "sd", _clip_settings(sd_a, infos[sd_a]), CLIP_ARRAYS)
    _rewrite_group(path, "clip", "sd-b", _clip_settings(sd_b, infos[sd_b]), CLIP_ARRAYS)
    return st


def _check(store, model, out, **kw):
    from surpipe.train.config import TrainConfig
    from surpipe.train.recipe import TrainRecipe

    r = TrainRecipe(TrainConfig(store=str(store), model=str(model), out=str(out), llm_layer=3, nhead=4, **kw))
    r.check()
    return r.groups


def test_several_clip_groups_pick_the_one_of_model(tmp_path, two_models, monkeypatch):
    sd_a, sd_b, _ = two_models
    _two_clip_store(tmp_path / "s.zarr", two_models)
    assert _check(tmp_path / "s.zarr", sd_a, tmp_path / "r").clip_group == "clip/sd"
    assert _check(tmp_path / "s.zarr", sd_b, tmp_path / "r").clip_group == "clip/sd-b"
    # matched by the text encoder's hashes, not by path: a copy of sd-b elsewhere picks sd-b too
    copy = tmp_path / "elsewhere"
    shutil.copytree(sd_b, copy)
    assert _check(tmp_path / "s.zarr", copy, tmp_path / "r").clip_group == "clip/sd-b"
    # an explicit choice wins
    assert _check(tmp_path / "s.zarr", sd_a, tmp_path / "r", clip_group="sd-b").clip_group == "clip/sd-b"


def test_several_clip_groups_train_end_to_end(tmp_path, two_models, capsys):
    sd_a, _, _ = two_models
    _two_clip_store(tmp_path / "s.zarr", two_models)
    out = tmp_path / "run"
    assert main(_args(tmp_path / "s.zarr", sd_a, out, "--max-steps", "1")) == 0, _err(capsys)
    rec = json.loads((out / "config.json").read_text())["_surpipe"]["run"]
    assert rec["groups"]["clip"]["path"] == "clip/sd" and rec["groups"]["clip"]["picked"] == "auto"


def test_several_clip_groups_ambiguous_or_unmatched_are_refused(tmp_path, two_models, tiny_models, capsys):
    from surpipe import SurpipeError  # noqa: F401  (the CLI turns it into exit 1)

    sd_a, sd_b, infos = two_models
    _two_clip_store(tmp_path / "s.zarr", two_models)
    # a UNet-only folder has no text encoder to compare, and its path is neither group's model
    unet_only = unet_only_folder(tiny_models, tmp_path / "unet-only")
    assert main(_args(tmp_path / "s.zarr", unet_only, tmp_path / "r1", "--max-steps", "1")) == 1
    err = _err(capsys)
    assert "store has several clip groups and none of them matches model" in err
    assert f"clip/sd (model {sd_a.resolve()}" in err and f"clip/sd-b (model {sd_b.resolve()}" in err
    assert "choose one with --clip-group NAME" in err
    # the same text encoder encoded twice (another stored dtype): ambiguous, both listed
    _rewrite_group(tmp_path / "s.zarr", "clip", "sd-f32", _clip_settings(sd_a, infos[sd_a], store_dtype="float32"),
                   {**CLIP_ARRAYS, "simple": ArraySpec((77, 32), "float32"), "complex": ArraySpec((77, 32), "float32")})
    assert main(_args(tmp_path / "s.zarr", sd_a, tmp_path / "r2", "--max-steps", "1")) == 1
    err = _err(capsys)
    assert "2 of them match the text encoder of" in err
    assert "clip/sd (model" in err and "clip/sd-f32 (model" in err and "store_dtype float32" in err
    assert "clip/sd-b (" not in err


def test_clip_groups_of_another_width_are_not_candidates(tmp_path, tiny_models, two_models):
    """An SD 2.x group (wider embeddings) beside the SD 1.x one: the UNet's width decides."""
    unet_only = unet_only_folder(tiny_models, tmp_path / "unet-only")
    make_store(tmp_path / "s.zarr")
    wide = {**CLIP_ARRAYS, "simple": ArraySpec((77, 48)), "complex": ArraySpec((77, 48))}
    _rewrite_group(tmp_path / "s.zarr", "clip", "sd2", {"model": "stabilityai/stable-diffusion-2-1"}, wide)
    assert _check(tmp_path / "s.zarr", unet_only, tmp_path / "r").clip_group == "clip/sd"


def test_single_clip_group_with_unet_only_folder_is_kept(tmp_path, store_small, tiny_models):
    unet_only = unet_only_folder(tiny_models, tmp_path / "unet-only")
    assert _check(store_small, unet_only, tmp_path / "r").clip_group == "clip/sd"


def test_several_vae_groups(tmp_path, tiny_models, two_models, capsys):
    sd_a, sd_b, _ = two_models
    make_store(tmp_path / "s.zarr")
    vs = {"resolution": 16, "scaling_factor": 0.18215}
    _rewrite_group(tmp_path / "s.zarr", "vae", "sd-16", vs | {"model": str(sd_a.resolve())}, VAE_ARRAYS)
    _rewrite_group(tmp_path / "s.zarr", "vae", "sd-b-16", vs | {"model": str(sd_b.resolve())}, VAE_ARRAYS)
    assert _check(tmp_path / "s.zarr", sd_a, tmp_path / "r").vae_group == "vae/sd-16"
    assert _check(tmp_path / "s.zarr", sd_b, tmp_path / "r").vae_group == "vae/sd-b-16"
    # a relative --model resolves to the recorded absolute path
    rel = os.path.relpath(sd_b, os.getcwd())
    assert _check(tmp_path / "s.zarr", rel, tmp_path / "r").vae_group == "vae/sd-b-16"
    # two resolutions of the same model: ambiguous, listed with their resolutions
    _rewrite_group(tmp_path / "s.zarr", "vae", "sd-8", {"resolution": 8, "scaling_factor": 0.18215,
                                                       "model": str(sd_a.resolve())}, VAE_ARRAYS)
    assert main(_args(tmp_path / "s.zarr", sd_a, tmp_path / "r1", "--max-steps", "1")) == 1
    err = _err(capsys)
    assert "several vae groups and 2 of them were encoded from model" in err
    assert "vae/sd-16 (model" in err and "resolution 8" in err and "--vae-group NAME" in err
