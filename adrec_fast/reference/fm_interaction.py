# SPDX-License-Identifier: Apache-2.0
"""Factorization-machine second-order term."""
from torch import Tensor


def fm_interaction(emb: Tensor) -> Tensor:
    """emb [B, F, D] -> [B, 1]: 0.5 * sum_d((sum_f e)^2 - sum_f e^2)."""
    square_of_sum = emb.sum(dim=1).square()  # [B, D]
    sum_of_square = emb.square().sum(dim=1)  # [B, D]
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1, keepdim=True)
