# SPDX-License-Identifier: Apache-2.0
"""Optimizers fused into the embedding backward (FBGEMM TBE style).

Pass one to :class:`adrec_fast.nn.EmbeddingBagCollection`; the backward then updates the rows
the batch touched, in place, with no ``.grad`` and no dense ``[N_total, D]`` write.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FusedSGD:
    """w[r] -= lr * g_r for every touched row r (g_r: the row's summed gradient)."""

    lr: float = 0.01
    name = "sgd"
    eps = 0.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"FusedSGD: lr must be > 0, got {self.lr}")


@dataclass
class FusedRowwiseAdagrad:
    """Row-wise Adagrad: state[r] += mean(g_r * g_r); w[r] -= lr * g_r / (sqrt(state[r]) + eps).

    One float32 of state per row."""

    lr: float = 0.01
    eps: float = 1e-8
    name = "rowwise_adagrad"

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"FusedRowwiseAdagrad: lr must be > 0, got {self.lr}")
        if not self.eps >= 0:
            raise ValueError(f"FusedRowwiseAdagrad: eps must be >= 0, got {self.eps}")
