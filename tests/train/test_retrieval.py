"""Retrieval of the complex prompt (surpipe.train.validation.retrieval), tried with the outputs that
would fool a weaker metric: an oracle, a constant, a scaled input, shuffled inputs; each against
a value computed by hand."""

import numpy as np
import pytest
import torch

from surpipe.train.validation import retrieval as R
from surpipe.train.validation.metrics import evaluate, evaluate_rows
from surpipe.train.validation.rows import ValidationSet

N, L, D = 12, 5, 8


def _emb(seed, n=N):
    return np.random.default_rng(seed).normal(size=(n, L, D))


def test_token_cosine_matrix_against_a_loop():
    q, c = _emb(0), _emb(1)
    S = R.token_cosine_matrix(q, c, block=5)
    ref = np.array([[np.mean([q[i, t] @ c[j, t] / np.linalg.norm(q[i, t]) / np.linalg.norm(c[j, t])
                              for t in range(L)]) for j in range(N)] for i in range(N)])
    np.testing.assert_allclose(S, ref, rtol=0, atol=1e-12)  # float64 both sides
    v = np.random.default_rng(2).normal(size=(N, D))  # one vector per candidate: compared with every token
    ref_v = np.array([[np.mean([q[i, t] @ v[j] / np.linalg.norm(q[i, t]) / np.linalg.norm(v[j]) for t in range(L)])
                       for j in range(N)] for i in range(N)])
    np.testing.assert_allclose(R.token_cosine_matrix(q, v), ref_v, rtol=0, atol=1e-12)


def test_oracle_scores_one():
    c = _emb(3)
    assert R.retrieval(R.token_cosine_matrix(c, c)) == {"r1": 1.0, "r5": 1.0, "median_rank": 1.0}


@pytest.mark.parametrize("const", ["random", "zero", "candidate"])
def test_a_constant_output_scores_exactly_chance(const):
    c = _emb(4)
    k = {"random": np.random.default_rng(5).normal(size=(L, D)), "zero": np.zeros((L, D)), "candidate": c[3]}[const]
    q = np.broadcast_to(k, c.shape)
    # every row ranks the candidates the same way: the own candidate's rank runs through 1..N once
    assert R.retrieval(R.token_cosine_matrix(q, c)) == pytest.approx(R.chance(N), abs=1e-12)
    assert R.chance(N) == {"r1": 1 / 12, "r5": 5 / 12, "median_rank": 6.5}


def test_all_ties_count_as_chance_not_as_first_place():
    sim = np.ones((N, N))
    assert R.retrieval(sim) == pytest.approx(R.chance(N), abs=1e-12)
    # one row's own candidate tied with two others for first: R@1 1/3, R@5 1
    sim = np.eye(4) * 0.5
    sim[0] = [1.0, 1.0, 1.0, 0.0]
    assert R.hits_at(sim, 1)[0] == pytest.approx(1 / 3) and R.hits_at(sim, 5)[0] == 1.0


@pytest.mark.parametrize("c", [1e-3, 0.5, 0.9, 3.0, 1e4])
def test_a_scaled_input_scores_exactly_what_the_input_does(c):
    x, cc = _emb(6), _emb(7) + 0.7 * _emb(6)  # the input says something about its own complex prompt
    plain = R.retrieval(R.token_cosine_matrix(x, cc))
    assert plain["r1"] > R.chance(N)["r1"]
    assert R.retrieval(R.token_cosine_matrix(c * x, cc)) == plain


def test_derangement_moves_every_row_and_is_fixed_by_its_seed():
    for n in (2, 3, 10, 257):
        p = R.derangement(n, 7)
        assert sorted(p) == list(range(n)) and (p != np.arange(n)).all()
        assert (R.derangement(n, 7) == p).all()
    assert not (R.derangement(50, 1) == R.derangement(50, 2)).all()


def test_shuffled_inputs_score_chance_in_expectation_on_independent_prompts():
    """Simple and complex prompts drawn independently, the identity as the 'adapter': the own
    prompt's R@1 with shuffled inputs averages 1/N (1600 trials: 4 standard errors is 0.014)."""
    n, trials, hits = 8, 1600, []
    rng = np.random.default_rng(11)
    for t in range(trials):
        x, cc = rng.normal(size=(n, 3, 4)), rng.normal(size=(n, 3, 4))
        shuffled = x[R.derangement(n, t)]
        hits.append(R.retrieval(R.token_cosine_matrix(shuffled, cc))["r1"])
    se = np.sqrt((1 / n) * (1 - 1 / n) / (n * trials))
    assert abs(np.mean(hits) - 1 / n) < 4 * se


class _MapAdapter(torch.nn.Module):
    """A stand-in adapter: output ``x @ W`` (``W`` given), the same as hidden output and fc branch."""

    def __init__(self, W):
        super().__init__()
        self.W = torch.nn.Parameter(torch.as_tensor(W, dtype=torch.float32))

    def forward(self, x, return_aux=False):
        o = x @ self.W
        return (o, o, o) if return_aux else o


def _vset(x, cc, const=None):
    n = len(x)
    arrays = {"llm": np.random.default_rng(0).normal(size=(n, 6)).astype(np.float32),
              "clip_simple": x.astype(np.float32), "clip_complex": cc.astype(np.float32)}
    vs = ValidationSet.build(arrays, [f"k{i}" for i in range(n)])
    if const is not None:
        vs.const = torch.as_tensor(const, dtype=torch.float32)
    return vs


def test_evaluate_oracle_constant_scaled_and_shuffled_controls():
    """Through the metrics a run logs: the complex embedding is a rotation of the simple one. The
    oracle adapter (that rotation) retrieves every row, the raw embedding and a scaled copy score the
    same, and the controls are what they must be."""
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    x = rng.normal(size=(N, L, D))
    cc = x @ Q
    proj = torch.nn.Linear(6, D)
    vs = _vset(x, cc, const=cc.mean(0))
    oracle = evaluate(_MapAdapter(Q), proj, None, None, vs, batch_size=5)
    assert oracle["val/r1"] == 1.0 and oracle["val/median_rank"] == 1.0
    assert oracle["val/cos_adapter"] == pytest.approx(1.0, abs=1e-6)
    assert oracle["val/r1_shuffled"] == 0.0  # a perfect mapping given another row's input finds that row
    assert oracle["val/r1_chance"] == pytest.approx(1 / N) and oracle["val/median_rank_chance"] == (N + 1) / 2
    ident = evaluate(_MapAdapter(np.eye(D)), proj, None, None, vs, batch_size=5)
    scaled = evaluate(_MapAdapter(0.3 * np.eye(D)), proj, None, None, vs, batch_size=5)
    for k in ("val/r1", "val/r5", "val/median_rank"):
        assert scaled[k] == ident[k] == ident[k + "_raw"]  # scale-free: c * x retrieves as x does
    assert scaled["val/cos_adapter"] == pytest.approx(ident["val/cos_adapter"], abs=1e-6)
    assert ident["val/r1"] == ident["val/r1_raw"] and ident["val/median_rank"] == ident["val/median_rank_raw"]
    # the constant control and the scaled-input control, by hand (float64)
    k = np.broadcast_to(cc.mean(0), cc.shape)
    assert oracle["val/prompt_const"] == pytest.approx(np.mean(_prompt_term(cc, k)), rel=1e-5)
    best = min((np.mean(_prompt_term(cc, c * x)), c) for c in np.round(0.05 * np.arange(1, 41), 2))
    assert oracle["val/prompt_scaled"] == pytest.approx(best[0], rel=1e-5) and oracle["val/scaled_factor"] == best[1]
    assert ident["val/prompt_baseline"] == pytest.approx(np.mean(_prompt_term(cc, x)), rel=1e-5)
    assert ident["val/prompt_shuffled"] == pytest.approx(np.mean(_prompt_term(cc, x[R.derangement(N, 0)])), rel=1e-5)


def _prompt_term(t, o):
    """KL(softmax(o) || softmax(t)) per row, summed over tokens (the authors' D(t, o)), numpy float64."""
    def log_softmax(v):
        v = v - v.max(-1, keepdims=True)
        return v - np.log(np.exp(v).sum(-1, keepdims=True))
    lo, lt = log_softmax(np.asarray(o, dtype=np.float64)), log_softmax(np.asarray(t, dtype=np.float64))
    return np.sum(np.exp(lo) * (lo - lt), axis=(-2, -1))


def test_per_row_retrieval_within_galleries():
    """A set larger than the gallery is compared within consecutive galleries; chance follows each
    gallery's size."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, L, D))
    vs = _vset(x, x)
    per = evaluate_rows(_MapAdapter(np.eye(D)), torch.nn.Linear(6, D), None, None, vs, gallery=3)
    np.testing.assert_allclose(per["val/r1_chance"], [1 / 3] * 6 + [1.0])
    np.testing.assert_array_equal(per["val/r1"], np.ones(7))


class _BranchAdapter(_MapAdapter):
    """Output ``0.9 x + 0.1 fc`` with branch ``fc = x @ W``, as the SUR-adapter mixes them."""

    def forward(self, x, return_aux=False):
        f = x @ self.W
        o = 0.9 * x + 0.1 * f
        return (o, o, f) if return_aux else o


def test_prompt_target_fc_validates_like_against_like():
    """``val/prompt`` is always the output the UNet sees, like ``val/prompt_baseline`` is the raw
    embedding; with --prompt-target fc the term as trained, on the branch, is ``val/prompt_fc``."""
    rng = np.random.default_rng(8)
    x, cc = rng.normal(size=(N, L, D)), rng.normal(size=(N, L, D))
    ad = _BranchAdapter(3 * rng.normal(size=(D, D)))
    vs = _vset(x, cc)
    out = evaluate(ad, torch.nn.Linear(6, D), None, None, vs, prompt_target="out")
    fc = evaluate(ad, torch.nn.Linear(6, D), None, None, vs, prompt_target="fc")
    o = 0.9 * x + 0.1 * (x @ ad.W.detach().double().numpy())
    assert "val/prompt_fc" not in out
    assert fc["val/prompt"] == out["val/prompt"] == pytest.approx(np.mean(_prompt_term(cc, o)), rel=1e-5)
    assert fc["val/prompt_fc"] == pytest.approx(np.mean(_prompt_term(cc, x @ ad.W.detach().double().numpy())), rel=1e-5)
    from surpipe.train.validation.metrics import selection_score

    assert selection_score(fc) == fc["val/prompt_fc"] + fc["val/llm"]  # --keep-best chooses on what is trained
    assert selection_score(out) == out["val/prompt"] + out["val/llm"]


def test_selection_part_splits_the_held_out_rows_in_two_by_key():
    from surpipe.train.validation.split import selection_mask, split_record

    keys = [f"row{i}" for i in range(200)]
    m = selection_mask(keys, seed=3)
    assert 70 < m.sum() < 130  # about half
    assert (selection_mask(keys[::-1], seed=3) == m[::-1]).all()  # from the keys, not their order
    assert (selection_mask(keys[:50], seed=3) == m[:50]).all()  # each key's part is its own
    assert not (selection_mask(keys, seed=4) == m).all()
    for n in (2, 3):  # never an empty part
        small = selection_mask(keys[:n], seed=0)
        assert 0 < small.sum() < n
    rec = split_record(np.array(keys), np.arange(0, 200, 2), rows=100, seed=3, keep_best=True)
    assert rec["selection"]["count"] + rec["report"]["count"] == rec["count"] == 100
    assert "selection" not in split_record(np.array(keys), np.arange(0, 200, 2), rows=100, seed=3)


def test_the_grid_shows_held_out_rows_only(tmp_path):
    from types import SimpleNamespace

    from helpers.stores import make_store
    from surpipe.train.validation.during import grid_prompts

    st = make_store(tmp_path / "s.zarr", n=12)
    held = np.array([2, 7, 8, 10, 11])
    simple = st.prompts("simple")
    assert grid_prompts(SimpleNamespace(held_out=held, store=st)) == [str(simple[i]) for i in (2, 7, 8, 10)]
    assert grid_prompts(SimpleNamespace(held_out=np.zeros(0, dtype=np.int64), store=st)) == []
