"""SURAdapter against an independent float64 re-implementation of the method, and persistence."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.authors_reference import TEMPLATE_KEYS, TheirAdapter
from surpipe import SURAdapter, SurpipeError
from surpipe.adapter import SURAdapterConfig

D, H, FF, L = 32, 4, 64, 77

EXPECTED_KEYS = [
    f"transformer_encoder.layers.{i}.{n}" for i in (0, 1) for n in (
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
        "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")
] + [
    "attention.query_layer.weight", "attention.query_layer.bias",
    "attention.key_layer.weight", "attention.key_layer.bias",
    "attention.value_layer.weight", "attention.value_layer.bias",
    "attention.output_layer.0.weight", "attention.output_layer.0.bias",
    "attention.output_layer.2.weight", "attention.output_layer.2.bias",
    "fc.weight", "fc.bias",
]


def randomized(token_mixing="sequence", seed=0, dtype=torch.float64, adapter_weight=0.1) -> SURAdapter:
    """An adapter with every weight random (fc.weight too, so the whole path is exercised)."""
    torch.manual_seed(seed)
    m = SURAdapter(width=D, nhead=H, dim_feedforward=FF, adapter_weight=adapter_weight,
                   token_mixing=token_mixing)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters(recurse=True):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, p in m.attention.value_layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        # Larger query/key weights: attention distributions far from uniform.
        m.attention.query_layer.weight.mul_(2.0)
        m.attention.key_layer.weight.mul_(2.0)
    return m.to(dtype).eval()


# ------------------------------------------------------------------ independent reference (float64)
def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _ref_layer(x, sd, p, nhead):
    """One post-norm ReLU transformer encoder layer on ONE sequence x [S, D], in plain ops."""
    d = x.shape[-1]
    W, b = sd[p + "self_attn.in_proj_weight"], sd[p + "self_attn.in_proj_bias"]
    q = x @ W[:d].T + b[:d]
    k = x @ W[d:2 * d].T + b[d:2 * d]
    v = x @ W[2 * d:].T + b[2 * d:]
    hd = d // nhead
    heads = []
    for h in range(nhead):
        s = slice(h * hd, (h + 1) * hd)
        scores = q[:, s] @ k[:, s].T / math.sqrt(hd)
        probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
        probs = probs / probs.sum(-1, keepdim=True)
        heads.append(probs @ v[:, s])
    att = torch.cat(heads, -1) @ sd[p + "self_attn.out_proj.weight"].T + sd[p + "self_attn.out_proj.bias"]
    x = _ln(x + att, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    f = torch.relu(x @ sd[p + "linear1.weight"].T + sd[p + "linear1.bias"])
    f = f @ sd[p + "linear2.weight"].T + sd[p + "linear2.bias"]
    return _ln(x + f, sd[p + "norm2.weight"], sd[p + "norm2.bias"])


def _ref_encoder(x, sd, nhead):
    for i in (0, 1):
        x = _ref_layer(x, sd, f"transformer_encoder.layers.{i}.", nhead)
    return x


def reference_forward(x, sd, nhead, adapter_weight, token_mixing):
    """method.md's adapter, one prompt at a time (x: [B, L, D]); returns (out, e, fc(a))."""
    sd = {k: v.detach().double() for k, v in sd.items()}
    outs, es, fs = [], [], []
    for xb in x.double():
        if token_mixing == "sequence":
            e = _ref_encoder(xb, sd, nhead)
        else:
            e = torch.cat([_ref_encoder(xb[i:i + 1], sd, nhead) for i in range(xb.shape[0])], 0)
        q = e @ sd["attention.query_layer.weight"].T + sd["attention.query_layer.bias"]
        k = xb @ sd["attention.key_layer.weight"].T + sd["attention.key_layer.bias"]
        scores = q @ k.T / math.sqrt(xb.shape[-1])
        probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
        probs = probs / probs.sum(-1, keepdim=True)
        w = xb + probs @ xb
        h = torch.relu(w @ sd["attention.output_layer.0.weight"].T + sd["attention.output_layer.0.bias"])
        a = h @ sd["attention.output_layer.2.weight"].T + sd["attention.output_layer.2.bias"] + w
        f = a @ sd["fc.weight"].T + sd["fc.bias"]
        outs.append(adapter_weight * f + (1 - adapter_weight) * xb)
        es.append(e)
        fs.append(f)
    return torch.stack(outs), torch.stack(es), torch.stack(fs)


# ------------------------------------------------------------------ tests
def test_state_dict_keys_exactly_the_authors():
    m = SURAdapter(width=D, nhead=H, dim_feedforward=FF)
    assert list(m.state_dict().keys()) == EXPECTED_KEYS
    theirs = TheirAdapter(D, H, FF)
    # theirs also holds the unused template layer (encoder_layer.*): 48 keys, 36 of them ours
    assert list(theirs.state_dict().keys()) == TEMPLATE_KEYS + EXPECTED_KEYS
    assert len(theirs.state_dict()) == 48 and len(m.state_dict()) == 36
    for k, v in theirs.state_dict().items():
        if k not in TEMPLATE_KEYS:
            assert m.state_dict()[k].shape == v.shape


@pytest.mark.parametrize("mixing", ["sequence", "tokenwise"])
def test_forward_matches_independent_reference(mixing):
    m = randomized(mixing)
    x = torch.randn(2, L, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        out, e, f = m.forward_with_aux(x)
        out2 = m(x)
    r_out, r_e, r_f = reference_forward(x, m.state_dict(), H, 0.1, mixing)
    # float64 on both sides (other kernels, same function): rounding ~1e-15 per op, 1e-10 covers the depth
    torch.testing.assert_close(e, r_e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, r_f, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, r_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)  # the same call on the same input: bit-equal
    # The two modes really differ (the check above is not vacuous).
    other = reference_forward(x, m.state_dict(), H, 0.1, "tokenwise" if mixing == "sequence" else "sequence")[0]
    assert (other - r_out).abs().max() > 1e-3


def test_return_aux_flag():
    m = randomized("sequence")
    x = torch.randn(2, L, D, dtype=torch.float64)
    with torch.no_grad():
        a = m(x, return_aux=True)
        b = m.forward_with_aux(x)
    assert isinstance(a, tuple) and len(a) == 3
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_tokenwise_equals_authors_batch_first_false_at_batch_size_one():
    """Their encoder saw [1, L, D] with batch_first=False: seq_len 1, batch L; each token alone."""
    m = randomized("tokenwise", seed=3)
    theirs = TheirAdapter(D, H, FF).double().eval()
    res = theirs.load_state_dict(m.state_dict(), strict=False)
    assert sorted(res.missing_keys) == sorted(TEMPLATE_KEYS) and not res.unexpected_keys
    x = torch.randn(4, L, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        out, e, f = m.forward_with_aux(x)
        for b in range(x.shape[0]):
            t_out, t_e, t_f = theirs(x[b:b + 1])
            torch.testing.assert_close(e[b:b + 1], t_e, rtol=1e-10, atol=1e-10)
            # their scores divide by a float32 sqrt(D): agreement to float32 rounding only
            torch.testing.assert_close(out[b:b + 1], t_out, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(f[b:b + 1], t_f, rtol=1e-6, atol=1e-7)
        # ... and their code at batch size > 1 mixes rows (what we deliberately avoid).
        t_out_batch = theirs(x[:2])[0]
        assert (t_out_batch - out[:2]).abs().max() > 1e-3


@pytest.mark.parametrize("mixing", ["sequence", "tokenwise"])
def test_rows_never_mix(mixing):
    m = randomized(mixing)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, L, D, generator=g, dtype=torch.float64)
    x2 = x.clone()
    x2[1] = torch.randn(L, D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        a, b = m(x), m(x2)
        single = m(x[:1])
    # float64: another batch size may pick other kernels; float64 rounding stays far below 1e-12
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a[2], b[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a[:1], single, rtol=1e-12, atol=1e-12)
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_init_output_is_blend_with_fc_bias():
    torch.manual_seed(0)
    m = SURAdapter(width=D, nhead=H, dim_feedforward=FF).eval()
    assert torch.count_nonzero(m.fc.weight) == 0
    m = m.double()  # float64: the claim is the formula, not float32 rounding of two add orders
    x = torch.randn(2, L, D, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
    torch.testing.assert_close(out, 0.9 * x + 0.1 * m.fc.bias, rtol=1e-12, atol=1e-12)


def test_defaults_are_the_authors():
    c = SURAdapterConfig()
    assert (c.width, c.nhead, c.dim_feedforward, c.num_layers, c.dropout, c.adapter_weight) == \
        (768, 8, 2048, 2, 0.1, 0.1)
    m = SURAdapter(width=64, nhead=8, dim_feedforward=128)
    layer = m.transformer_encoder.layers[0]
    assert layer.norm_first is False and layer.activation_relu_or_gelu == 1
    assert m.transformer_encoder.norm is None


def test_value_layer_unused_and_frozen():
    m = randomized("sequence")
    x = torch.randn(2, L, D, dtype=torch.float64)
    with torch.no_grad():
        before = m(x)
        m.attention.value_layer.weight.add_(1.0)
        after = m(x)
    assert torch.equal(before, after)
    assert not m.attention.value_layer.weight.requires_grad
    m.train()
    m(x).sum().backward()
    assert m.attention.value_layer.weight.grad is None
    assert m.fc.weight.grad is not None and m.attention.query_layer.weight.grad is not None
    assert m.transformer_encoder.layers[0].linear1.weight.grad is not None


def test_eval_disables_dropout_train_enables_it():
    torch.manual_seed(0)
    m = randomized("sequence").float()
    x = torch.randn(2, L, D)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    m.train()
    with torch.no_grad():
        assert not torch.equal(m(x), m(x))


def test_rejects_wrong_width_and_bad_config():
    m = SURAdapter(width=D, nhead=H, dim_feedforward=FF)
    with pytest.raises(SurpipeError, match="shape"):
        m(torch.randn(1, L, D + 1))
    with pytest.raises(SurpipeError, match="divisible"):
        SURAdapter(width=30, nhead=4)
    with pytest.raises(SurpipeError, match="token_mixing"):
        SURAdapter(width=D, nhead=H, token_mixing="batch")


def test_input_cast_to_module_dtype():
    m = randomized("sequence").float()
    x = torch.randn(2, L, D, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
    assert out.dtype == torch.float32


# ------------------------------------------------------------------ persistence
def test_save_load_round_trip(tmp_path):
    m = randomized("tokenwise", adapter_weight=0.25).float()
    m.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "config.json").read_text())
    assert cfg["_class_name"] == "SURAdapter" and "_surpipe_version" in cfg
    assert cfg["token_mixing"] == "tokenwise" and cfg["adapter_weight"] == 0.25
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["config.json", "model.safetensors"]
    m2 = SURAdapter.from_pretrained(tmp_path / "ad")
    assert not m2.training
    assert m2.config == m.config
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    x = torch.randn(2, L, D)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    m3 = SURAdapter.from_pretrained(str(tmp_path / "ad"), torch_dtype="float16", device="cpu")
    assert m3.dtype == torch.float16
    m4 = SURAdapter.from_pretrained(tmp_path / "ad", torch_dtype=torch.float64)
    assert m4.dtype == torch.float64
    assert not m2.attention.value_layer.weight.requires_grad


def _rewrite_weights(folder, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"))


def test_load_refuses_missing_extra_and_misshapen_keys(tmp_path):
    m = SURAdapter(width=D, nhead=H, dim_feedforward=FF)
    folder = tmp_path / "ad"
    m.save_pretrained(folder)

    def edit(sd):
        del sd["attention.key_layer.bias"]
        sd["extra.weight"] = torch.zeros(2)

    _rewrite_weights(folder, edit)
    with pytest.raises(SurpipeError) as ei:
        SURAdapter.from_pretrained(folder)
    msg = str(ei.value)
    assert "missing key: attention.key_layer.bias" in msg and "unexpected key: extra.weight" in msg

    m.save_pretrained(folder)
    _rewrite_weights(folder, lambda sd: sd.__setitem__("fc.bias", torch.zeros(D + 2)))
    with pytest.raises(SurpipeError, match=r"fc\.bias.*\[34\].*\[32\]"):
        SURAdapter.from_pretrained(folder)


def test_load_refuses_missing_folder_or_files(tmp_path):
    with pytest.raises(SurpipeError, match="not found"):
        SURAdapter.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurpipeError, match="config.json"):
        SURAdapter.from_pretrained(tmp_path / "empty")
    m = SURAdapter(width=D, nhead=H, dim_feedforward=FF)
    m.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "config.json").read_text())
    cfg["bogus"] = 1
    (tmp_path / "ad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SurpipeError, match="bogus"):
        SURAdapter.from_pretrained(tmp_path / "ad")
    (tmp_path / "ad" / "model.safetensors").write_bytes(b"garbage")
    cfg.pop("bogus")
    (tmp_path / "ad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SurpipeError, match="safetensors"):
        SURAdapter.from_pretrained(tmp_path / "ad")
