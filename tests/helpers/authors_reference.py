"""The authors' adapter module, with the structure of their real ``SUR_adapter.py``
(github.com/Qrange-group/SUR-adapter, commit 5d97aa3), written for the tests independently of
surpipe. Same class names, attribute names, registration order and forward as theirs:

- ``Adapter.__init__`` keeps the template ``nn.TransformerEncoderLayer`` as ``self.encoder_layer``
  and builds ``self.transformer_encoder = nn.TransformerEncoder(self.encoder_layer, depth)`` from
  it (torch deep-copies the template, so ``encoder_layer.*`` is a 12-key leftover, never used by
  the forward and never trained). Their ``state_dict()`` therefore has 48 keys, and their demo
  loads it strictly.
- ``batch_first`` left at torch's default (False) while fed [B, L, D].
- ``Attention.forward(query, key, value)`` with ``V = value`` (``value_layer`` unused).

Only difference: ``nhead``/``dim_feedforward`` are constructor arguments here (theirs hard-codes
8/2048) so tests can use small sizes; the defaults are theirs.
"""

import warnings

import torch
import torch.nn as nn


class Attention(nn.Module):
    def __init__(self, hidden_size=768):
        super().__init__()
        self.hidden_size = hidden_size
        self.query_layer = nn.Linear(hidden_size, hidden_size)
        self.key_layer = nn.Linear(hidden_size, hidden_size)
        self.value_layer = nn.Linear(hidden_size, hidden_size)
        self.output_layer = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, query, key, value):
        q = self.query_layer(query)
        k = self.key_layer(key)
        v = value  # as theirs: value_layer is never applied
        scores = torch.matmul(q, k.transpose(-2, -1)) / torch.sqrt(
            torch.tensor(self.hidden_size, dtype=torch.float32))
        weighted = torch.matmul(nn.functional.softmax(scores, dim=-1), v) + value
        return self.output_layer(weighted) + weighted


class Adapter(nn.Module):
    def __init__(self, depth=2, adapter_weight=0.01, sd_text_size=768, nhead=8, dim_feedforward=2048):
        super().__init__()
        self.adapter_weight = adapter_weight
        self.encoder_layer = nn.TransformerEncoderLayer(
            d_model=sd_text_size, nhead=nhead, dim_feedforward=dim_feedforward)
        with warnings.catch_warnings():
            # torch warns that nested tensors need batch_first=True; it changes no output here.
            warnings.simplefilter("ignore", UserWarning)
            self.transformer_encoder = nn.TransformerEncoder(self.encoder_layer, num_layers=depth)
        self.attention = Attention(hidden_size=sd_text_size)
        self.fc = nn.Linear(sd_text_size, sd_text_size)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x):
        """(out, e, fc(a)) as their forward returns them."""
        out_transformer_encoder = self.transformer_encoder(x)
        out_attention = self.attention(query=out_transformer_encoder, key=x, value=x)
        out_llm = self.fc(out_attention)
        out = self.adapter_weight * out_llm + (1 - self.adapter_weight) * x
        return out, out_transformer_encoder, out_llm

    def forward_sequence(self, x):
        """Test helper, not theirs: their forward with the encoder attending across the L tokens of
        each prompt (what the paper describes; surpipe's ``token_mixing="sequence"``). Their
        encoder takes [L, B, D], so transposing in and out is all it needs."""
        e = self.transformer_encoder(x.transpose(0, 1)).transpose(0, 1)
        f = self.fc(self.attention(query=e, key=x, value=x))
        return self.adapter_weight * f + (1 - self.adapter_weight) * x, e, f


def TheirAdapter(d, nhead, ff, adapter_weight=0.1):
    """Their ``Adapter`` at test sizes (width d, nhead, dim_feedforward ff)."""
    return Adapter(depth=2, adapter_weight=adapter_weight, sd_text_size=d, nhead=nhead, dim_feedforward=ff)


TEMPLATE_KEYS = [f"encoder_layer.{n}" for n in (
    "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
    "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")]


def imported_in_float64(ours, theirs, x_shape, seed):
    """Check that ``ours`` (an imported SURAdapter) holds exactly ``theirs``' weights, then return both
    modules and an input in float64. Comparing two forwards claims they are the same function, so
    both run in float64: in float32 they are different kernels (torch's fused encoder fast path,
    another CPU's SIMD) and differ by ~1e-5 on some machines. What is left is their float32 sqrt(D)
    in the attention scale: compare with rtol 1e-6, atol 1e-7."""
    for k, v in theirs.state_dict().items():
        if k not in TEMPLATE_KEYS:
            assert torch.equal(ours.state_dict()[k], v), k
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ours.double(), theirs.double(), x
