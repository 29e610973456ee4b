"""The authors' adapter module as ../shared/method.md describes it, written independently of
surpipe: their attribute names, nn.TransformerEncoder with batch_first=False fed [B, L, D] as is,
fc weight zero-initialised. Tests load weights into it and compare with SURAdapter."""

import math

from torch import nn
import torch


class TheirAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query_layer = nn.Linear(d, d)
        self.key_layer = nn.Linear(d, d)
        self.value_layer = nn.Linear(d, d)  # in their state dict, never used (V = x)
        self.output_layer = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.d = d

    def forward(self, x, e):
        scores = torch.matmul(self.query_layer(e), self.key_layer(x).transpose(-1, -2)) / math.sqrt(self.d)
        w = x + torch.matmul(torch.softmax(scores, dim=-1), x)
        return self.output_layer(w) + w


class TheirAdapter(nn.Module):
    def __init__(self, d, nhead, ff, adapter_weight=0.1):
        super().__init__()
        self.transformer_encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model=d, nhead=nhead, dim_feedforward=ff), num_layers=2,
            enable_nested_tensor=False)
        self.attention = TheirAttention(d)
        self.fc = nn.Linear(d, d)
        nn.init.zeros_(self.fc.weight)
        self.adapter_weight = adapter_weight

    def forward(self, x):
        """(out, e, fc(a)) as their forward returns them."""
        e = self.transformer_encoder(x)
        f = self.fc(self.attention(x, e))
        return self.adapter_weight * f + (1 - self.adapter_weight) * x, e, f
