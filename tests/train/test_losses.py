"""Losses against float64 hand computations."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from surpipe import SurpipeError
from surpipe.train.losses import (LLMProjection, apply_noise_offset, denoise_loss, denoise_target, kl_align,
                            llm_loss, min_snr_weights, prompt_loss)


def manual_kl_sum(x, y, temperature=1.0):
    """sum over every position of KL(softmax(y) || softmax(x)) along the last dim, in float64."""
    x, y = x.double() / temperature, y.double() / temperature
    p = torch.exp(y) / torch.exp(y).sum(-1, keepdim=True)
    q = torch.exp(x) / torch.exp(x).sum(-1, keepdim=True)
    return (p * (torch.log(p) - torch.log(q))).sum()


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_kl_align_is_authors_order_and_batchmean():
    x = torch.randn(3, 77, 16, generator=_g(0), dtype=torch.float64)
    y = torch.randn(3, 77, 16, generator=_g(1), dtype=torch.float64)
    got = kl_align(x, y)
    # float64 on both sides of every comparison here: 1e-12 is far above float64 rounding at this depth
    # batchmean: total sum over batch AND tokens, divided by B only (not B * 77).
    torch.testing.assert_close(got, manual_kl_sum(x, y) / 3, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, manual_kl_sum(y, x) / 3)  # the order matters
    # per-sample: the sum over tokens of the per-token KL
    one = kl_align(x[:1], y[:1])
    per_token = torch.stack([manual_kl_sum(x[0, i], y[0, i]) for i in range(77)])
    torch.testing.assert_close(one, per_token.sum(), rtol=1e-12, atol=1e-12)
    assert kl_align(x, x).abs() < 1e-12


def test_kl_align_temperature_and_half_inputs():
    x = torch.randn(2, 5, 8, generator=_g(2), dtype=torch.float64)
    y = torch.randn(2, 5, 8, generator=_g(3), dtype=torch.float64)
    torch.testing.assert_close(kl_align(x, y, temperature=2.0), manual_kl_sum(x, y, 2.0) / 2,
                               rtol=1e-12, atol=1e-12)
    h = kl_align(x.half(), y.half())
    assert h.dtype == torch.float32
    # float32 result vs float64 reference of the same half inputs: softmaxes over 8 and a sum of 80 terms
    # in float32, a few eps (1.2e-7) each; 1e-5 relative is ~80 eps
    torch.testing.assert_close(h.double(), manual_kl_sum(x.half(), y.half()) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(SurpipeError):
        kl_align(x, y, temperature=0)


def test_llm_loss_broadcasts_projection_over_tokens():
    v = torch.randn(2, 16, generator=_g(4), dtype=torch.float64)
    e = torch.randn(2, 77, 16, generator=_g(5), dtype=torch.float64)
    got = llm_loss(v, e)
    ref = manual_kl_sum(v[:, None, :].expand(2, 77, 16), e) / 2  # D(LLMResize(v) broadcast, e)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(llm_loss(v[:, None, :], e), got, rtol=0, atol=0)


def test_prompt_loss_order_and_gradient_reaches_out():
    clip_complex = torch.randn(2, 77, 16, generator=_g(6), dtype=torch.float64)
    out = torch.randn(2, 77, 16, generator=_g(7), dtype=torch.float64, requires_grad=True)
    got = prompt_loss(clip_complex, out)
    # D(CLIP(complex), out) = KL(softmax(out) || softmax(clip_complex))
    torch.testing.assert_close(got, manual_kl_sum(clip_complex, out.detach()) / 2, rtol=1e-12, atol=1e-12)
    got.backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    # gradient matches the float64 manual formula via autograd on the manual sum
    out2 = out.detach().clone().requires_grad_(True)
    (manual_kl_sum(clip_complex, out2) / 2).backward()
    torch.testing.assert_close(out.grad, out2.grad, rtol=1e-10, atol=1e-12)


def test_projection_seeded_deterministic_and_frozen(tmp_path):
    a, b, c = LLMProjection(40, 16, seed=7), LLMProjection(40, 16, seed=7), LLMProjection(40, 16, seed=8)
    assert torch.equal(a.linear.weight, b.linear.weight) and torch.equal(a.linear.bias, b.linear.bias)
    assert not torch.equal(a.linear.weight, c.linear.weight)
    assert not any(p.requires_grad for p in a.parameters())
    assert all(p.requires_grad for p in LLMProjection(40, 16, learnable=True).parameters())
    bound = 1 / 40 ** 0.5
    assert a.linear.weight.abs().max() <= bound and a.linear.weight.abs().max() > 0.8 * bound
    # the global RNG plays no part
    torch.manual_seed(123)
    d = LLMProjection(40, 16, seed=7)
    assert torch.equal(a.linear.weight, d.linear.weight)
    v = torch.randn(3, 40, dtype=torch.float16)
    assert a(v).shape == (3, 16) and a(v).dtype == torch.float32

    path = a.save(tmp_path / "proj.safetensors")
    r = LLMProjection.load(path)
    assert (r.llm_size, r.width, r.seed, r.learnable) == (40, 16, 7, False)
    assert torch.equal(r.linear.weight, a.linear.weight) and torch.equal(r.linear.bias, a.linear.bias)
    assert LLMProjection.load(path, learnable=True).linear.weight.requires_grad
    with pytest.raises(SurpipeError, match="not found"):
        LLMProjection.load(tmp_path / "missing.safetensors")
    with pytest.raises(SurpipeError):
        a(torch.randn(2, 41))


@pytest.fixture(scope="module")
def sched():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear")


def _acp64(sched, t):
    return sched.alphas_cumprod.double()[t]


def test_min_snr_weights_against_manual(sched):
    t = torch.tensor([0, 10, 100, 500, 999])
    gamma = 5.0
    acp = _acp64(sched, t)
    snr = acp / (1 - acp)
    eps = min_snr_weights(sched, t, gamma, "epsilon")
    v = min_snr_weights(sched, t, gamma, "v_prediction")
    assert eps.dtype == torch.float32 and eps.shape == (5,)
    # float32 weights vs float64 formula: three rounded float32 ops after float64 alphas; 1e-6 is ~8 eps
    torch.testing.assert_close(eps.double(), torch.minimum(snr, torch.full_like(snr, gamma)) / snr,
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v.double(), torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1),
                               rtol=1e-6, atol=1e-7)
    # low-noise timesteps (huge SNR) are down-weighted; high-noise ones keep weight 1 (epsilon)
    assert eps[0] < 0.01 and eps[-1] == 1.0
    # prediction type from the scheduler's config by default
    torch.testing.assert_close(min_snr_weights(sched, t, gamma), eps)  # same computation, same inputs
    with pytest.raises(SurpipeError, match="gamma"):
        min_snr_weights(sched, t, 0)


def test_min_snr_zero_terminal_snr_is_finite():
    s = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    t = torch.tensor([999, 500])
    w = min_snr_weights(s, t, 5.0, "epsilon")
    assert torch.isfinite(w).all() and w[0] == 1.0
    assert torch.isfinite(min_snr_weights(s, t, 5.0, "v_prediction")).all()


def test_denoise_targets(sched):
    lat = torch.randn(3, 4, 8, 8, generator=_g(8))
    noise = torch.randn(3, 4, 8, 8, generator=_g(9))
    t = torch.tensor([1, 400, 900])
    assert denoise_target(sched, lat, noise, t) is noise
    v = denoise_target(sched, lat, noise, t, prediction_type="v_prediction")
    acp = _acp64(sched, t)[:, None, None, None]
    ref = acp.sqrt() * noise.double() - (1 - acp).sqrt() * lat.double()
    # float32 vs float64: two products and a difference of unit-scale values, a few eps; 1e-5 / 1e-6 leave room
    torch.testing.assert_close(v.double(), ref, rtol=1e-5, atol=1e-6)
    vs = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    torch.testing.assert_close(denoise_target(vs, lat, noise, t), v)
    # a bare config works too
    torch.testing.assert_close(denoise_target(dict(vs.config), lat, noise, t), v)


def test_unknown_prediction_type_refused(sched):
    lat = noise = torch.zeros(1, 4, 8, 8)
    t = torch.tensor([1])
    with pytest.raises(SurpipeError, match="epsilon, v_prediction"):
        denoise_target(sched, lat, noise, t, prediction_type="sample")
    with pytest.raises(SurpipeError, match="valid"):
        min_snr_weights(sched, t, 5.0, "flow")


def test_denoise_loss_per_sample_weighted():
    pred = torch.randn(3, 4, 8, 8, generator=_g(10))
    target = torch.randn(3, 4, 8, 8, generator=_g(11))
    per = ((pred.double() - target.double()) ** 2).flatten(1).mean(1)
    # float32 mean of 768 squares vs float64: summation error ~eps*log2(768) ~ 1.2e-6 relative at worst
    # with pairwise/vectorised sums; values ~2, so rtol 1e-6 + atol 1e-7 is about that bound
    torch.testing.assert_close(denoise_loss(pred, target).double(), per.mean(), rtol=1e-6, atol=1e-7)
    w = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(denoise_loss(pred, target, w).double(), (per * w.double()).mean(),
                               rtol=1e-6, atol=1e-7)
    assert denoise_loss(pred.half(), target.half()).dtype == torch.float32


def test_noise_offset():
    noise = torch.randn(2, 4, 8, 8, generator=_g(12))
    assert apply_noise_offset(noise, 0.0) is noise
    got = apply_noise_offset(noise, 0.1, _g(13))
    shift = torch.randn(2, 4, 1, 1, generator=_g(13))  # same formula on the same tensors: default float32 tolerance
    torch.testing.assert_close(got, noise + 0.1 * shift)
    d = got - noise  # constant over H, W per sample and channel
    assert torch.allclose(d, d[:, :, :1, :1].expand_as(d))
