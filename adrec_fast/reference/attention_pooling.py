# SPDX-License-Identifier: Apache-2.0
"""Target attention over a user's behaviour sequence (DIN/BST-style pooling)."""
import math

import torch
from torch import Tensor


def attention_pooling(query: Tensor, keys: Tensor, offsets: Tensor) -> Tensor:
    """query [B, D], keys [L_total, D], offsets [B+1] -> [B, D].

    For sample b with keys K_b = keys[offsets[b]:offsets[b+1]]:
    out_b = softmax(K_b @ q_b / sqrt(D)) @ K_b; an empty sequence gives zeros.

    Written for all samples at once, as a segment softmax (a per-sample loop says the same, see
    tests/ops/test_attention_pooling.py, but cannot be run at benchmark sizes or compiled:
    torch.compile unrolls it): s_l = k_l . q_seg(l) / sqrt(D) for every key l of sample seg(l);
    p_l = exp(s_l - max_seg s) / sum_seg exp(s - max_seg s); out_b = sum_{seg(l) = b} p_l k_l.
    The per-sample maximum only shifts the exponent (the softmax does not depend on it), so it
    is taken without gradient.
    """
    B, D = query.shape
    L = keys.shape[0]
    lengths = (offsets[1:] - offsets[:-1]).long()  # [B]
    seg = torch.repeat_interleave(torch.arange(B, device=query.device), lengths, output_size=L)
    s = (keys * query[seg]).sum(-1) / math.sqrt(D)  # [L]
    m = torch.full((B,), -math.inf, dtype=s.dtype, device=s.device).scatter_reduce(
        0, seg, s.detach(), "amax", include_self=True
    )  # [B]
    p = torch.exp(s - m[seg])  # [L]
    z = torch.zeros(B, dtype=s.dtype, device=s.device).index_add(0, seg, p)  # [B]
    p = p / z[seg]
    return torch.zeros(B, D, dtype=keys.dtype, device=keys.device).index_add(0, seg, p[:, None] * keys)
