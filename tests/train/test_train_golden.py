"""Golden test of the composed training loss: one ``TrainRecipe`` micro-batch against the same
step rebuilt from independent parts (the authors' adapter module loaded with the recipe's weights,
the LLM projection rebuilt from its documented seeded formula, a freshly loaded UNet and scheduler,
``F.kl_div`` and ``F.mse_loss``), with the same noise and timesteps, for both gradient paths."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers.authors_reference import TEMPLATE_KEYS, TheirAdapter

LLM_W, PROMPT_W = 0.7, 0.3  # not the authors' 1e-5: both KL terms must weigh in the comparison


def _recipe(store, sd, out, gradient_path, token_mixing):
    from surpipe.train.config import TrainConfig
    from surpipe.train.recipe import TrainRecipe

    cfg = TrainConfig(store=str(store), model=str(sd), out=str(out), llm_layer=3, nhead=4, dim_feedforward=64,
                      batch_size=3, workers=0, device="cpu", dropout=0.0, llm_weight=LLM_W, prompt_weight=PROMPT_W,
                      gradient_path=gradient_path, token_mixing=token_mixing, projection_seed=5, progress=False)
    r = TrainRecipe(cfg)
    r.setup(r.check())
    adapter = r.accelerator.unwrap_model(r.adapter)
    with torch.no_grad():  # fc.weight starts at zero; random weights exercise the whole fc(a) branch
        g = torch.Generator().manual_seed(1)
        adapter.fc.weight.copy_(torch.randn(adapter.fc.weight.shape, generator=g) * 0.2)
    return r, adapter


def _projection(llm_size, width, seed):
    """LLMProjection's documented weights: nn.Linear's U(-1/sqrt(n), 1/sqrt(n)) from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / llm_size ** 0.5
    w = torch.rand(width, llm_size, generator=g) * (2 * bound) - bound
    return w, torch.rand(width, generator=g) * (2 * bound) - bound


def _their_forward(theirs, x, token_mixing):
    """(out, e, fc) of the authors' module. Their forward feeds [B, L, D] to a batch_first=False
    encoder: at their batch size 1 each token attends only to itself, which is surpipe's tokenwise
    mixing; at B > 1 it would mix samples, so tokenwise runs it one sample at a time."""
    if token_mixing == "sequence":
        return theirs.forward_sequence(x)
    parts = [theirs(x[i:i + 1]) for i in range(len(x))]
    return tuple(torch.cat(p) for p in zip(*parts))


def _kl(x, y):
    """The authors' D(x, y) = KL(softmax(y) || softmax(x)), F.kl_div batchmean."""
    return F.kl_div(F.log_softmax(x, dim=-1), F.softmax(y, dim=-1), reduction="batchmean")


@pytest.mark.parametrize("gradient_path,token_mixing", [("paper", "sequence"), ("authors", "tokenwise")])
def test_one_step_loss_matches_an_independent_rebuild(tmp_path, store, tiny_models, gradient_path, token_mixing):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    sd = tiny_models / "sd"
    r, adapter = _recipe(store, sd, tmp_path / "run", gradient_path, token_mixing)
    b = r._batch_to_tensors(next(iter(r._stream())))
    gen_state = r.gen.get_state()  # the noise and timesteps of r.loss come from here
    losses = r.loss(b)
    losses["loss"].backward()
    ours = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}

    # --- the same step, independently
    theirs = TheirAdapter(adapter.config.width, 4, 64, adapter_weight=adapter.config.adapter_weight)
    missing, unexpected = theirs.load_state_dict(adapter.state_dict(), strict=False)
    assert sorted(missing) == sorted(TEMPLATE_KEYS) and not unexpected
    theirs.eval()  # no dropout, as the recipe's dropout=0
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet").eval().requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    g = torch.Generator().manual_seed(0)
    g.set_state(gen_state)
    lat = b["latents"]
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=g)
    acp = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noisy = acp.sqrt() * lat + (1 - acp).sqrt() * noise
    pt = json.loads((sd / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type", "epsilon")
    target = noise if pt == "epsilon" else acp.sqrt() * noise - (1 - acp).sqrt() * lat

    x = b["clip_simple"]
    out, e, fc = _their_forward(theirs, x, token_mixing)
    w, bias = _projection(b["llm"].shape[-1], x.shape[-1], seed=5)
    proj = (b["llm"] @ w.T + bias)[:, None, :].expand_as(e)
    mask = b["llm_mask"] if b["llm_mask"] is not None else torch.ones(len(x), dtype=torch.bool)
    assert bool(mask.all())  # this store matches every row: the LLM term covers the whole batch
    llm = _kl(proj, e)
    prompt = _kl(b["clip_complex"], out)
    cond = out if gradient_path == "paper" else out.detach()
    denoise = F.mse_loss(unet(noisy, t, cond).sample.float(), target, reduction="mean")
    total = denoise + LLM_W * llm + PROMPT_W * prompt

    for name, ref in (("denoise", denoise), ("llm", llm), ("prompt", prompt), ("loss", total)):
        torch.testing.assert_close(losses[name], ref, rtol=1e-5, atol=1e-6, msg=f"{name} differs")
    assert min(float(llm.detach()), float(prompt.detach()), float(denoise.detach())) > 0

    total.backward()
    ref_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert set(ours) == set(ref_grads)
    for n in ours:
        torch.testing.assert_close(ours[n], ref_grads[n], rtol=1e-4, atol=1e-7, msg=f"gradient of {n} differs")
    # the gradient path really differs: only on the paper's path does the UNet's share reach fc
    # (e, hence the LLM term, does not depend on fc: the prompt term alone is fc's KL gradient)
    out_again = _their_forward(theirs, x, token_mixing)[0]
    fc_kl_only = torch.autograd.grad(PROMPT_W * _kl(b["clip_complex"], out_again), theirs.fc.weight)[0]
    assert torch.allclose(fc_kl_only, ours["fc.weight"], rtol=1e-5, atol=1e-9) == (gradient_path == "authors")
