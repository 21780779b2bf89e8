# SPDX-License-Identifier: Apache-2.0
"""Modules for the feature-interaction and scoring ops."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .. import functional as F


class FMInteraction(nn.Module):
    """emb [B, F, D] -> [B, 1]: the FM second-order term."""

    def forward(self, emb: Tensor) -> Tensor:
        return F.fm_interaction(emb)


class DotInteraction(nn.Module):
    """emb [B, F, D] -> [B, P]: DLRM pairwise dot products (i < j, or i <= j with self)."""

    def __init__(self, self_interaction: bool = False):
        super().__init__()
        self.self_interaction = self_interaction

    def forward(self, emb: Tensor) -> Tensor:
        return F.dot_interaction(emb, self.self_interaction)


class CrossNet(nn.Module):
    """DCN-v2 cross network: ``num_layers`` full-rank cross layers,
    x_{l+1} = x0 * (x_l @ W_l.T + b_l) + x_l. x0 [B, K] -> [B, K]."""

    def __init__(self, in_features: int, num_layers: int = 3):
        super().__init__()
        self.in_features = int(in_features)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(in_features, in_features)) for _ in range(num_layers)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(in_features)) for _ in range(num_layers))
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            for w in self.weights:
                w.uniform_(-bound, bound)

    def forward(self, x0: Tensor) -> Tensor:
        """x0 [B, K] -> [B, K]. x0 may also be [B, K + P] with P zero columns appended (a
        GEMM-friendly width): the weights are then zero-padded to [K + P, K + P] on the fly,
        the extra columns of every x_l stay exactly zero (x0 * 0 + 0), and the output is
        [B, K + P] with zeros in the last P columns. The parameters keep their [K, K] shape.
        Under ``torch.autocast`` the layers run in the autocast dtype, like ``nn.Linear``."""
        pad = x0.size(1) - self.in_features
        if pad < 0:
            raise ValueError(f"CrossNet: x0 has {x0.size(1)} columns, expected at least "
                             f"{self.in_features}")
        if torch.is_autocast_enabled(x0.device.type):  # run in the autocast dtype (as Linear)
            x0 = x0.to(torch.get_autocast_dtype(x0.device.type))
        weights, biases = [], []
        for w, b in zip(self.weights, self.biases):
            # fp32 parameters meet a bf16 x0 under autocast: cast them (the gradient flows back
            # to the fp32 parameter through the cast)
            w, b = w.to(x0.dtype), b.to(x0.dtype)
            if pad:
                w, b = TF.pad(w, (0, pad, 0, pad)), TF.pad(b, (0, pad))  # [K+P, K+P], [K+P]
            weights.append(w)
            biases.append(b)
        return F.cross_net(x0, weights, biases)


class AttentionPooling(nn.Module):
    """Target attention: query [B, D], keys [L_total, D], offsets [B+1] -> [B, D]."""

    def forward(self, query: Tensor, keys: Tensor, offsets: Tensor) -> Tensor:
        return F.attention_pooling(query, keys, offsets)


class SigmoidBCEHead(nn.Module):
    """Final linear layer + sigmoid. ``forward(x [B, K]) -> logits [B]``;
    ``loss(logits, labels, weight=None)`` is the fused mean BCE; ``predict(x)`` returns
    probabilities through the fused score op."""

    def __init__(self, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features))
        self.bias = nn.Parameter(torch.zeros(()))
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.view(1, -1), self.bias.view(1)).view(-1)  # [B]

    @staticmethod
    def loss(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        return F.sigmoid_bce(logits, labels, weight)

    def predict(self, x: Tensor) -> Tensor:
        return F.score(x, self.weight, self.bias)
