# SPDX-License-Identifier: Apache-2.0
"""DCN-v2 cross layer (torchrec CrossNet, one layer)."""
import torch.nn.functional as F
from torch import Tensor


def cross_layer(x0: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x0 [B, K], x [B, K], weight [K, K], bias [K] -> [B, K]: x0 * (x @ weight.T + bias) + x."""
    return x0 * F.linear(x, weight, bias) + x
