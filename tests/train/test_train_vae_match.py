"""A latent group must come from the model's VAE (issue 22, item 9): `train --vae-group` naming
latents of the SDXL VAE (scaling factor 0.13025) trained an SD 1.5 UNet (0.18215) with exit 0.
Now it is refused naming what differs and the override flag, --allow-other-vae, which trains and
resumes; the model's own VAE group trains as before."""

import numpy as np
import pytest

from stages.cli import main
from surpipe.store import ArraySpec, FeatureStore
from helpers.stores import LAT, _args, make_store


def _add_vae_group(store, name, settings, shape=LAT):
    """A second, complete VAE group ``vae/<name>`` with ``settings``, latents of ``shape``."""
    st = FeatureStore(store, mode="a")
    g = st.require_group("vae", name, settings, {"mean": ArraySpec(shape), "std": ArraySpec(shape)})
    rng = np.random.default_rng(1)
    for b in range(st.num_blocks):
        s, e = st.block_range(b)
        g.write_block(b, {"mean": rng.normal(size=(e - s, *shape)), "std": np.full((e - s, *shape), 0.01)})


@pytest.fixture
def two_vae_store(tmp_path):
    store = tmp_path / "s.zarr"
    make_store(store)  # vae/sd-16: the tiny SD VAE's scaling factor, 0.18215
    _add_vae_group(store, "sdxl-16", {"resolution": 16, "scaling_factor": 0.13025, "latent_channels": 4})
    _add_vae_group(store, "shifted-16", {"resolution": 16, "scaling_factor": 0.18215, "shift_factor": 0.1159})
    return store


def _train(store, sd, out, capsys, *extra):
    rc = main(_args(store, sd, out, "--max-steps", "1", "--no-loss-curve", *extra))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_latents_of_another_vae_are_refused_naming_the_difference_and_the_flag(two_vae_store, tiny_models,
                                                                                tmp_path, capsys):
    sd = tiny_models / "sd"
    rc, err = _train(two_vae_store, sd, tmp_path / "a", capsys, "--vae-group", "sdxl-16")
    assert rc == 1, err  # was: exit 0, an SD UNet trained on SDXL-VAE latents
    line = next(ln for ln in err.splitlines() if "vae/sdxl-16" in ln)
    assert "another VAE" in line and "scaling_factor 0.13025 there, 0.18215 in" in line, line
    assert "--allow-other-vae" in line and "latent_channels" not in line  # only what differs
    assert not (tmp_path / "a" / "checkpoints").exists()
    rc, err = _train(two_vae_store, sd, tmp_path / "b", capsys, "--vae-group", "shifted-16")
    assert rc == 1 and "shift_factor 0.1159 there, 0.0 in" in err, err
    # the model's own VAE group trains
    rc, err = _train(two_vae_store, sd, tmp_path / "c", capsys, "--vae-group", "sd-16")
    assert rc == 0, err


def test_allow_other_vae_trains_and_resumes_on_the_same_out(two_vae_store, tiny_models, tmp_path, capsys):
    """Following the advice on the same --out works, and so does resuming that run."""
    sd, out = tiny_models / "sd", tmp_path / "run"
    rc, err = _train(two_vae_store, sd, out, capsys, "--vae-group", "sdxl-16")
    assert rc == 1 and "--allow-other-vae" in err
    rc, err = _train(two_vae_store, sd, out, capsys, "--vae-group", "sdxl-16", "--allow-other-vae")
    assert rc == 0, err
    assert main(_args(two_vae_store, sd, out, "--max-steps", "2", "--no-loss-curve", "--vae-group", "sdxl-16",
                      "--allow-other-vae")) == 0


def test_a_vae_folder_that_cannot_be_read_is_not_compared(two_vae_store, tiny_models, tmp_path, capsys):
    """A model without a readable vae/ (a UNet-only folder) has nothing to compare with: trains."""
    from helpers.stores import unet_only_folder

    rc, err = _train(two_vae_store, unet_only_folder(tiny_models, tmp_path / "unet_only"),
                     tmp_path / "run", capsys, "--vae-group", "sdxl-16")
    assert rc == 0, err
