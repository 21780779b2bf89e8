# SPDX-License-Identifier: Apache-2.0
"""DCN-v2 cross layer (torchrec CrossNet, one layer)."""
import torch.nn.functional as F
from torch import Tensor


def cross_layer(x0: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x0 [B, K], x [B, K], weight [K, K], bias [K] -> [B, K]: x0 * (x @ weight.T + bias) + x."""
    return x0 * F.linear(x, weight, bias) + x


def cross_layer_bwd_(g: Tensor, gx0: Tensor, x0: Tensor, x: Tensor, weight: Tensor, xw: Tensor,
                     accumulate: bool, last: bool) -> tuple[Tensor, Tensor]:
    """One layer of a cross net's backward on the caller's buffers (``adrec::cross_layer_bwd_``):
    g_xw = g * x0; gx0 = (gx0 if accumulate else 0) + g * xw, plus g + g_xw @ weight if last (the
    first layer, whose x is x0); otherwise g becomes g + g_xw @ weight. Returns (grad_weight,
    grad_bias) = (g_xw.T @ x, g_xw summed over rows)."""
    g_xw = g * x0
    v = g * xw
    if last:
        v = v + g + g_xw @ weight
    else:
        g.add_(g_xw @ weight)
    if accumulate:
        gx0.add_(v)
    else:
        gx0.copy_(v)
    return g_xw.t() @ x, g_xw.sum(0)
