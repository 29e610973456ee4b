"""Rows of an imported prompt2vec group without a vector (zeros, matched=false) take no part in
the LLM term: they would otherwise pull the adapter towards the projection of a zero vector."""

import numpy as np
import torch
import torch.nn.functional as F

from surpipe.train import losses as L
from surpipe.store import ArraySpec, FeatureStore
from helpers.stores import LAT, _DS, _args, clip_vae_groups


def _reference(p, e):  # the authors' D(x, y) on the kept rows, written out
    x = p.unsqueeze(1).expand_as(e)
    return F.kl_div(F.log_softmax(x, -1), F.softmax(e, -1), reduction="batchmean")


def test_masked_llm_loss_is_the_loss_of_the_matched_rows_only():
    g = torch.Generator().manual_seed(0)
    p, e = torch.randn(5, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    mask = torch.tensor([True, False, True, True, False])
    got = L.llm_loss(p, e, mask=mask)
    # float32 on both sides, the same softmaxes over 8 and sums of <= 15 terms: a few eps; 1e-6 absolute on
    # values ~0.5 is ~16 eps
    assert torch.allclose(got, _reference(p[mask], e[mask]), atol=1e-6)
    assert torch.allclose(L.llm_loss(p, e, mask=torch.ones(5, dtype=torch.bool)), _reference(p, e), atol=1e-6)
    e.requires_grad_(True)
    none = L.llm_loss(p, e, mask=torch.zeros(5, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.count_nonzero(e.grad) == 0


def _store_with_unmatched_rows(path, n=16, width=32, llm_size=16):
    rng = np.random.default_rng(0)
    st = FeatureStore.create_or_open(path, _DS(n), block_rows=8)
    llm = st.require_group("llm", "prompt2vec", {"layer": 3}, {"layer_3/pooled": ArraySpec((llm_size,)),
                                                               "matched": ArraySpec((), "bool")})
    clip, vae = clip_vae_groups(st, width)
    for b in range(st.num_blocks):
        s, e = st.block_range(b)
        m = e - s
        matched = np.arange(s, e) % 3 != 0
        llm.write_block(b, {"layer_3/pooled": rng.normal(size=(m, llm_size)) * matched[:, None], "matched": matched})
        x = rng.normal(size=(m, 77, width))
        clip.write_block(b, {"simple": x, "complex": x + 0.1, "simple_len": np.full(m, 9), "complex_len": np.full(m, 9)})
        vae.write_block(b, {"mean": rng.normal(size=(m, *LAT)), "std": np.full((m, *LAT), 0.01)})
    return st


def test_reader_carries_matched_and_train_runs(tmp_path, tiny_models):
    from stages.cli import main
    from surpipe.train.groups import resolve_groups
    from surpipe.train.data import BlockReader

    st = _store_with_unmatched_rows(tmp_path / "s.zarr")
    groups, problems = resolve_groups(st, llm_layer=3, llm_group=None, clip_group=None, vae_group=None, use_flip=False)
    assert not problems
    block = BlockReader(str(tmp_path / "s.zarr"), groups, 8)[0]
    assert block["llm_matched"].tolist() == [i % 3 != 0 for i in range(8)]
    out = tmp_path / "run"
    assert main(_args(tmp_path / "s.zarr", tiny_models / "sd", out, "--max-steps", "2", "--no-flip")) == 0
