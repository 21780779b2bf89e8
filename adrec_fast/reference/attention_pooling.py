# SPDX-License-Identifier: Apache-2.0
"""Target attention over a user's behaviour sequence (DIN/BST-style pooling)."""
import math

import torch
from torch import Tensor


def attention_pooling(query: Tensor, keys: Tensor, offsets: Tensor) -> Tensor:
    """query [B, D], keys [L_total, D], offsets [B+1] -> [B, D].

    For sample b with keys K_b = keys[offsets[b]:offsets[b+1]]:
    out_b = softmax(K_b @ q_b / sqrt(D)) @ K_b; an empty sequence gives zeros.
    """
    B, D = query.shape
    out = query.new_zeros(B, D)
    o = offsets.tolist()
    for b in range(B):
        k = keys[o[b] : o[b + 1]]  # [L_b, D]
        if k.size(0) == 0:
            continue
        p = torch.softmax(k @ query[b] / math.sqrt(D), dim=0)  # [L_b]
        out[b] = p @ k
    return out
