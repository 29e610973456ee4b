"""Stores and command lines the training tests share: a small store with every group train reads."""

from __future__ import annotations

import json
import shutil

import numpy as np

from helpers import SyntheticDataset
from surpipe.store import ArraySpec, FeatureStore

LAT = (4, 8, 8)  # tiny VAE latents of 16 px crops: small and fast


def _DS(n):
    """``n`` rows of red-cube prompts as a dataset a FeatureStore accepts."""
    return SyntheticDataset([(f"r{i:03d}", f"a red cube number {i}", f"red cube {i}, masterpiece, 8k")
                             for i in range(n)])


def clip_vae_groups(st, width=32, flip=False):
    """The ``clip/sd`` and ``vae/sd-16`` groups every training store has (SD-like, 16 px latents)."""
    clip = st.require_group("clip", "sd", {"m": 1}, {"simple": ArraySpec((77, width)), "complex": ArraySpec((77, width)),
                                                      "simple_len": ArraySpec((), "int32"),
                                                      "complex_len": ArraySpec((), "int32")})
    vae_arrays = {"mean": ArraySpec(LAT), "std": ArraySpec(LAT)}
    if flip:
        vae_arrays |= {"flip_mean": ArraySpec(LAT), "flip_std": ArraySpec(LAT)}
    return clip, st.require_group("vae", "sd-16", {"resolution": 16, "scaling_factor": 0.18215}, vae_arrays)


def make_store(path, n=24, width=32, llm_size=16, layers=(1, 3), block_rows=8, flip=True, seed=0,
               complete=True):
    """A store with every group train reads, filled with structured (not pure-noise) features."""
    rng = np.random.default_rng(seed)
    st = FeatureStore.create_or_open(path, _DS(n), block_rows=block_rows)
    llm = st.require_group("llm", "tiny", {"layers": list(layers)},
                           {f"layer_{L}/pooled": ArraySpec((llm_size,)) for L in layers})
    clip, vae = clip_vae_groups(st, width, flip)
    base = rng.normal(size=(77, width))
    for b in range(st.num_blocks):
        if not complete and b == st.num_blocks - 1:
            break
        s, e = st.block_range(b)
        m = e - s
        llm.write_block(b, {f"layer_{L}/pooled": rng.normal(size=(m, llm_size)) * 2 for L in layers})
        simple = base + 0.3 * rng.normal(size=(m, 77, width))
        clip.write_block(b, {"simple": simple, "complex": simple + 0.5 * rng.normal(size=(m, 77, width)),
                             "simple_len": np.full(m, 9), "complex_len": np.full(m, 40)})
        mean = rng.normal(size=(m, *LAT)) * 4
        vals = {"mean": mean, "std": np.full((m, *LAT), 0.01)}
        if flip:
            vals |= {"flip_mean": mean[..., ::-1], "flip_std": np.full((m, *LAT), 0.01)}
        vae.write_block(b, vals)
    return st


def _args(store, sd, out, *extra):
    return ["train", "--store", str(store), "--model", str(sd), "--llm-layer", "3", "--out", str(out),
            "--batch-size", "2", "--grad-accum", "2", "--workers", "0", "--no-progress", "--device", "cpu",
            "--dim-feedforward", "64", "--nhead", "4", *extra]


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def unet_only_folder(tiny_models, dst, which: str = "sd"):
    """A model folder that holds only unet/, scheduler/ and model_index.json (of tiny ``which``)."""
    dst.mkdir()
    for part in ("unet", "scheduler"):
        shutil.copytree(tiny_models / which / part, dst / part)
    shutil.copy(tiny_models / which / "model_index.json", dst / "model_index.json")
    return dst


def make_sharded_store(url, monkeypatch, n=32, block_rows=8, shard_blocks=2):
    """:func:`make_store` with every group stored ``shard_blocks`` blocks per object (zarr sharding)."""
    real = FeatureStore.require_group
    with monkeypatch.context() as m:
        m.setattr(FeatureStore, "require_group", lambda self, *a, **k: real(self, *a, **{**k, "shard_blocks": shard_blocks}))
        return make_store(url, n=n, block_rows=block_rows)


def make_learnable_store(path, n=96, width=32, llm_size=16, block_rows=32, seed=0, learnable=True):
    """A store whose complex embedding is a learnable, input-dependent function of the simple one:
    every token of row i is ``B + s * n_i`` (simple) and ``B + s * n_i @ Q`` (complex), with ``B``
    shared by all rows, ``n_i`` the row's own and ``Q`` a fixed rotation. Without the rotation the raw
    embedding cannot tell the rows' complex prompts apart (retrieval at chance); an adapter that
    learns ``Q`` can. LLM features carry the row's ``n_i`` too (projected). ``learnable=False``: the
    complex embedding uses a fresh draw instead of ``n_i``, so nothing links it to its simple prompt."""
    rng = np.random.default_rng(seed)
    st = FeatureStore.create_or_open(path, _DS(n), block_rows=block_rows)
    llm = st.require_group("llm", "tiny", {"layers": [3]}, {"layer_3/pooled": ArraySpec((llm_size,))})
    clip, vae = clip_vae_groups(st, width)
    base = rng.normal(size=(77, width))
    Q, _ = np.linalg.qr(rng.normal(size=(width, width)))
    P = rng.normal(size=(width, llm_size)) / np.sqrt(width)
    for b in range(st.num_blocks):
        s, e = st.block_range(b)
        own = rng.normal(size=(e - s, 1, width)) + 0.3 * rng.normal(size=(e - s, 77, width))
        other = own if learnable else rng.normal(size=own.shape[:2] + (width,)) + 0.3 * rng.normal(size=own.shape)
        clip.write_block(b, {"simple": base + own, "complex": base + other @ Q,
                             "simple_len": np.full(e - s, 9), "complex_len": np.full(e - s, 40)})
        llm.write_block(b, {"layer_3/pooled": own.mean(1) @ P * 3})
        vae.write_block(b, {"mean": rng.normal(size=(e - s, *LAT)), "std": np.full((e - s, *LAT), 0.01)})
    return st


def block_reader(store):
    """The BlockReader training reads ``store`` with (its groups resolved as train resolves them)."""
    from surpipe.store import FeatureStore
    from surpipe.train.data import BlockReader
    from surpipe.train.groups import resolve_groups

    st = FeatureStore(store)
    groups, problems = resolve_groups(st, llm_layer=-1, llm_group=None, clip_group=None, vae_group=None,
                                      use_flip=True)
    assert not problems
    return BlockReader(str(store), groups, st.block_rows)
