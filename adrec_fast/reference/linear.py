# SPDX-License-Identifier: Apache-2.0
"""Dense layer: a matrix product, a bias and an optional activation."""
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("none", "relu")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
           activation: str = "none") -> Tensor:
    """x [M, K], weight [N, K], bias [N] or None -> [M, N]: act(x @ weight.T + bias), act one of
    ``"none"`` (identity) or ``"relu"``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    y = F.linear(x, weight, bias)
    return y.relu() if activation == "relu" else y
