# SPDX-License-Identifier: Apache-2.0
"""Sigmoid scoring: mean binary cross-entropy with logits, and the fused linear+sigmoid score."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_bce(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """logits [B], labels [B], weight [B]? -> scalar mean_b w_b * BCE(sigmoid(z_b), y_b).

    d loss / d z_b = (sigmoid(z_b) - y_b) * w_b / B.
    """
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), weight=weight)


def score(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x [B, K], w [K], b [] or [1] -> [B] probabilities sigmoid(x @ w + b)."""
    return torch.sigmoid(x @ w + b.reshape(()))
