"""Held-out validation (issue 17): the split, the fixed-noise validation set and its metrics."""

import hashlib
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import SyntheticDataset
from helpers.stores import clip_vae_groups
from surpipe.train import losses as L
from surpipe.adapter import SURAdapter
from surpipe.errors import SurpipeError
from surpipe.store import ArraySpec, FeatureStore
from surpipe.train.groups import StoreGroups
from surpipe.train.validation.metrics import METRICS, evaluate, evaluate_rows, markdown_table, per_category, selection_score
from surpipe.train.validation.rows import ValidationSet, load_rows
from surpipe.train.validation.split import check_same_split, held_out_rows, split_record, training_rows

GROUPS = StoreGroups("llm/tiny", 3, "clip/sd", "vae/sd-16", False)
LAT = (4, 8, 8)
KEYS = [f"img_{i:05d}" for i in range(400)]


def _h(seed, key):
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


# ----------------------------------------------------------------------------------------- split
def test_rows_split_is_exact_deterministic_and_independent_of_row_order():
    held = held_out_rows(KEYS, rows=25, seed=3)
    assert len(held) == 25 and list(held) == sorted(set(held.tolist()))
    assert np.array_equal(held, held_out_rows(np.array(KEYS), rows=25, seed=3))
    # independent reference: the 25 smallest hashes
    want = sorted(sorted(KEYS, key=lambda k: _h(3, k))[:25])
    assert sorted(KEYS[i] for i in held) == want
    shuffled = KEYS[:]
    random.Random(1).shuffle(shuffled)
    assert {shuffled[i] for i in held_out_rows(shuffled, rows=25, seed=3)} == set(want)
    assert set(held.tolist()) != set(held_out_rows(KEYS, rows=25, seed=4).tolist())  # the seed matters


def test_fraction_split_is_a_hash_threshold_of_about_f():
    keys = [f"k{i}" for i in range(4000)]
    held = held_out_rows(keys, fraction=0.1, seed=0)
    assert {keys[i] for i in held} == {k for k in keys if _h(0, k) < 0.1 * 2**64}
    assert 330 < len(held) < 470  # binomial(4000, 0.1): mean 400, sd 19


def test_split_is_disjoint_from_training_rows_and_covers_the_store():
    held = held_out_rows(KEYS, fraction=0.2, seed=0)
    train = training_rows(len(KEYS), held)
    assert not set(held.tolist()) & set(train.tolist())
    assert sorted(held.tolist() + train.tolist()) == list(range(len(KEYS)))


def test_split_is_stable_when_keys_are_appended():
    more = KEYS + [f"new_{i}" for i in range(300)]
    old = {KEYS[i] for i in held_out_rows(KEYS, fraction=0.15, seed=0)}
    new = {more[i] for i in held_out_rows(more, fraction=0.15, seed=0)}
    assert new & set(KEYS) == old  # fraction: every existing key keeps its membership
    old_r = {KEYS[i] for i in held_out_rows(KEYS, rows=20, seed=0)}
    new_r = {more[i] for i in held_out_rows(more, rows=20, seed=0)}
    assert len(new_r) == 20 and (new_r & set(KEYS)) <= old_r  # rows: a trained-on row never becomes held out


def test_split_off_and_bad_arguments():
    assert len(held_out_rows(KEYS)) == 0
    for kw, flag in (({"rows": 2, "fraction": 0.1}, "--val-fraction"), ({"fraction": 0.6}, "--val-fraction"),
                     ({"fraction": float("nan")}, "--val-fraction"), ({"rows": -1}, "--val-rows"),
                     ({"rows": 400}, "--val-rows"), ({"rows": 2.5}, "--val-rows")):
        with pytest.raises(SurpipeError, match=flag):
            held_out_rows(KEYS, **kw)
    with pytest.raises(SurpipeError, match="holds out none"):
        held_out_rows(KEYS[:3], fraction=0.01)


def test_split_record_and_resume_check():
    held = held_out_rows(KEYS, rows=10, seed=0)
    rec = split_record(KEYS, held, rows=10, seed=0)
    assert rec["count"] == 10 and rec["mode"] == "rows" and len(rec["keys_sha256"]) == 64
    assert check_same_split(rec, split_record(list(reversed(KEYS)), 399 - held[::-1], rows=10, seed=0)) == []
    other = split_record(KEYS, held_out_rows(KEYS, rows=11, seed=0), rows=11, seed=0)
    assert "--val-rows 10" in check_same_split(rec, other)[0]
    reseeded = split_record(KEYS, held_out_rows(KEYS, rows=10, seed=1), rows=10, seed=1)
    assert check_same_split(rec, reseeded)
    changed = KEYS[:]
    changed[int(held[0])] = "renamed"
    assert "differ" in check_same_split(rec, split_record(changed, held, rows=10, seed=0))[0]
    off = split_record(KEYS, held_out_rows(KEYS))
    assert check_same_split(None, off) == [] and check_same_split(off, off) == []
    assert check_same_split(None, rec) and check_same_split(rec, off)


# ----------------------------------------------------------------------------------------- data
def _store(path, n=40, width=32, llm_size=16, block_rows=8, complex_fn=None, seed=0):
    """A store like test_train.make_store; ``complex_fn(simple)`` makes the complex embeddings."""
    rng = np.random.default_rng(seed)
    ds = SyntheticDataset([(f"r{i:03d}", f"cube {i}", f"cube {i}, 8k") for i in range(n)])
    st = FeatureStore.create_or_open(path, ds, block_rows=block_rows)
    llm = st.require_group("llm", "tiny", {"layers": [3]}, {"layer_3/pooled": ArraySpec((llm_size,))})
    clip, vae = clip_vae_groups(st, width)
    base = rng.normal(size=(77, width))
    for b in range(st.num_blocks):
        s, e = st.block_range(b)
        m = e - s
        llm.write_block(b, {"layer_3/pooled": rng.normal(size=(m, llm_size)) * 2})
        simple = base + 0.3 * rng.normal(size=(m, 77, width))
        cx = complex_fn(simple) if complex_fn else simple + 0.5 * rng.normal(size=(m, 77, width))
        clip.write_block(b, {"simple": simple, "complex": cx, "simple_len": np.full(m, 9),
                             "complex_len": np.full(m, 40)})
        vae.write_block(b, {"mean": rng.normal(size=(m, *LAT)) * 4, "std": np.full((m, *LAT), 0.5)})
    return path


@pytest.fixture(scope="module")
def sd_parts(tiny_models):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sd", subfolder="unet").eval()
    return unet, DDPMScheduler.from_pretrained(tiny_models / "sd", subfolder="scheduler")


def _adapter(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(width=32, nhead=4, dim_feedforward=64, num_layers=1, dropout=0.1, adapter_weight=0.3)
    return SURAdapter(**(cfg | kw))


def _vset(path, rows, seed=0):
    return ValidationSet.from_store(str(path), GROUPS, rows, scaling_factor=0.18215, seed=seed)


def test_validation_set_reads_the_held_out_rows(tmp_path):
    path = _store(tmp_path / "s.zarr")
    st = FeatureStore(path)
    rows = held_out_rows(st.keys(), rows=9, seed=0)
    vs = _vset(path, rows)
    assert vs.keys == [str(k) for k in st.keys()[rows]]
    clip = st.group("clip/sd")
    assert np.array_equal(vs.clip_simple.numpy(), np.asarray(clip.array("simple")[:])[rows])
    assert np.array_equal(vs.clip_complex.numpy(), np.asarray(clip.array("complex")[:])[rows])
    assert np.array_equal(vs.llm.numpy(), np.asarray(st.group("llm/tiny").array("layer_3/pooled")[:])[rows])
    # the latent sample is mean + std * eps, scaled: recover eps and check it is standard normal-ish
    mean = np.asarray(st.group("vae/sd-16").array("mean")[:])[rows]
    eps = (vs.latents.numpy() / 0.18215 - mean) / 0.5
    assert abs(eps.mean()) < 0.1 and 0.9 < eps.std() < 1.1
    assert vs.timesteps.min() >= 0 and vs.timesteps.max() < 1000 and len(set(vs.timesteps.tolist())) > 3


def test_fixed_draws_depend_on_the_key_only(tmp_path):
    path = _store(tmp_path / "s.zarr")
    a, b = _vset(path, [3, 7, 20]), _vset(path, [7, 20, 30, 31])
    for x in (a.latents, a.noise, a.timesteps):
        assert x.shape[0] == 3
    for ia, ib in ((1, 0), (2, 1)):
        assert torch.equal(a.noise[ia], b.noise[ib]) and torch.equal(a.latents[ia], b.latents[ib])
        assert a.timesteps[ia] == b.timesteps[ib]
    assert not torch.equal(_vset(path, [3], seed=1).noise[0], a.noise[0])


# ----------------------------------------------------------------------------------------- metrics
def test_two_evaluations_are_identical_and_modes_are_restored(tmp_path, sd_parts):
    unet, sched = sd_parts
    vs = _vset(_store(tmp_path / "s.zarr"), [0, 5, 9, 17, 33])
    ad, proj = _adapter(), L.LLMProjection(16, 32, seed=0)
    ad.train()
    r1 = evaluate(ad, proj, unet, sched, vs, batch_size=2)
    assert ad.training and proj.training
    ad.eval()
    r2 = evaluate(ad, proj, unet, sched, vs, batch_size=2)
    assert not ad.training
    # every metric but the fc term (prompt target "out") and the constant (no training rows given)
    assert r1 == r2 and set(r1) == set(METRICS) - {"val/prompt_fc", "val/prompt_const", "val/cos_const"}
    assert all(np.isfinite(v) for v in r1.values())
    r3 = evaluate(ad, proj, unet, sched, vs, batch_size=5)  # batching does not change the values
    assert r3.keys() == r1.keys() and all(abs(r3[k] - r1[k]) <= 1e-5 * max(1, abs(r1[k])) for k in r1)
    assert "val/denoise" not in evaluate(ad, proj, None, sched, vs)


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_values_equal_an_independent_recomputation(tmp_path, sd_parts, gamma):
    unet, sched = sd_parts
    vs = _vset(_store(tmp_path / "s.zarr"), [1, 2, 11, 25])
    ad, proj = _adapter(), L.LLMProjection(16, 32, seed=0)
    got = evaluate(ad, proj, unet, sched, vs, min_snr_gamma=gamma, batch_size=3)
    ad.eval()
    with torch.no_grad():
        x, cc = vs.clip_simple.float(), vs.clip_complex.float()
        out, e, _ = ad(x, return_aux=True)
        n = x.shape[0]

        def kl(p_logits, q_logits):  # KL(softmax(q) || softmax(p)), summed per row
            return F.kl_div(F.log_softmax(p_logits, -1), F.softmax(q_logits, -1), reduction="sum") / n

        pl = proj(vs.llm).unsqueeze(1).expand_as(e)
        acp = sched.alphas_cumprod[vs.timesteps].view(-1, 1, 1, 1)
        noisy = acp.sqrt() * vs.latents + (1 - acp).sqrt() * vs.noise
        pred = unet(noisy, vs.timesteps, out).sample
        per = F.mse_loss(pred, vs.noise, reduction="none").flatten(1).mean(1)
        if gamma is not None:
            snr = (acp / (1 - acp)).flatten()
            per = per * torch.clamp(snr, max=gamma) / snr
        want = {"val/llm": kl(pl, e), "val/prompt": kl(cc, out), "val/prompt_baseline": kl(cc, x),
                "val/cos_adapter": F.cosine_similarity(out, cc, dim=-1).mean(),
                "val/cos_baseline": F.cosine_similarity(x, cc, dim=-1).mean(), "val/denoise": per.mean()}
    for k, v in want.items():  # float32 both sides, other batch grouping of the row means: a few eps
        assert got[k] == pytest.approx(float(v), rel=1e-5, abs=1e-6), k


class _Identity(torch.nn.Module):
    """An "adapter" that returns its input (what SD sees without the adapter)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, return_aux=False):
        return (x, x, x) if return_aux else x


def test_prompt_baseline_is_the_prompt_term_of_an_identity_adapter(tmp_path, sd_parts):
    unet, sched = sd_parts
    vs = _vset(_store(tmp_path / "s.zarr"), [0, 4, 8, 12, 16, 20])
    r = evaluate(_Identity(), L.LLMProjection(16, 32), unet, sched, vs, batch_size=4)
    # the identity's output is its input: the same tensors in the same computation
    assert r["val/prompt"] == pytest.approx(r["val/prompt_baseline"], rel=1e-6)
    assert r["val/cos_adapter"] == pytest.approx(r["val/cos_baseline"], rel=1e-6)
    ra = evaluate(_adapter(), L.LLMProjection(16, 32), unet, sched, vs, batch_size=4)
    assert ra["val/prompt_baseline"] == pytest.approx(r["val/prompt_baseline"], rel=1e-6)
    assert ra["val/prompt"] != pytest.approx(r["val/prompt"], rel=1e-3)


def test_llm_term_skips_rows_without_an_llm_vector_like_training():
    rng = np.random.default_rng(0)
    arrays = {"llm": rng.normal(size=(5, 16)).astype(np.float32),
              "llm_matched": np.array([1, 0, 1, 1, 0], dtype=bool),
              "clip_simple": rng.normal(size=(5, 77, 32)).astype(np.float32),
              "clip_complex": rng.normal(size=(5, 77, 32)).astype(np.float32)}
    vs = ValidationSet.build(arrays, [f"k{i}" for i in range(5)])
    assert vs.latents is None
    ad, proj = _adapter(dropout=0.0), L.LLMProjection(16, 32)
    per = evaluate_rows(ad, proj, None, None, vs, batch_size=2)
    assert np.isnan(per["val/llm"]).tolist() == [False, True, False, False, True]
    r = evaluate(ad, proj, None, None, vs, batch_size=2)
    with torch.no_grad():
        _, e, _ = ad.eval()(torch.from_numpy(arrays["clip_simple"]), return_aux=True)
        train_term = L.llm_loss(proj(torch.from_numpy(arrays["llm"])), e, mask=torch.from_numpy(arrays["llm_matched"]))
    assert r["val/llm"] == pytest.approx(float(train_term), rel=1e-5)  # float32, batches of 2 vs 5: a few eps
    assert "val/denoise" not in r


def test_trained_adapter_beats_the_baseline_on_held_out_rows(tmp_path):
    """Complex = a fixed function of simple: minimising the prompt term on the training rows
    brings val/prompt below val/prompt_baseline on rows it never saw (no UNet needed)."""
    tilt = np.random.default_rng(5).normal(size=32) * 1.5
    path = _store(tmp_path / "s.zarr", n=32, complex_fn=lambda s: 2.0 * s + tilt)
    st = FeatureStore(path)
    held = held_out_rows(st.keys(), rows=8, seed=0)
    vs = _vset(path, held)
    train = load_rows(str(path), GROUPS, training_rows(st.num_samples, held))
    x, cc = torch.from_numpy(train["clip_simple"]).float(), torch.from_numpy(train["clip_complex"]).float()
    ad, proj = _adapter(dropout=0.0, adapter_weight=0.5), L.LLMProjection(16, 32)
    before = evaluate(ad, proj, None, None, vs)
    opt = torch.optim.Adam(ad.parameters(), lr=3e-2)
    for _ in range(15):
        opt.zero_grad()
        L.prompt_loss(cc, ad(x)).backward()
        opt.step()
    after = evaluate(ad, proj, None, None, vs)
    assert after["val/prompt_baseline"] == pytest.approx(before["val/prompt_baseline"])
    assert after["val/prompt"] < 0.5 * after["val/prompt_baseline"]
    assert after["val/prompt"] < 0.5 * before["val/prompt"]


# ----------------------------------------------------------------------------------------- reports
def test_per_category_and_table():
    vals = {"val/prompt": np.array([1.0, 2.0, 3.0, 5.0]), "val/llm": np.array([1.0, np.nan, 3.0, 4.0])}
    got = per_category(vals, ["a", "b", "a", "b"])
    assert got["a"] == {"val/prompt": 2.0, "val/llm": 2.0, "rows": 2}
    assert got["b"] == {"val/prompt": 3.5, "val/llm": 4.0, "rows": 2}
    assert got["all"] == {"val/prompt": 2.75, "val/llm": pytest.approx(8 / 3), "rows": 4}
    assert list(per_category(vals)) == ["all"]
    with pytest.raises(SurpipeError):
        per_category(vals, ["a"])
    table = markdown_table(got)
    assert "| a | 2 | " in table and "| all | 4 | " in table and "| prompt |" in table and "| 2.750 |" in table
    assert selection_score({"val/prompt": 1.5, "val/llm": 2.0, "val/denoise": 9}) == 3.5
