# SPDX-License-Identifier: Apache-2.0
"""``Dropout``: ``torch.nn.Dropout`` through ``functional.dropout`` (the counter-based mask:
one draw from torch's generator per call, no mask kept for the backward). It is an
``nn.Dropout``, so whatever walks a model for dropout layers (serving, eval checks) sees it."""
from __future__ import annotations

from torch import Tensor, nn

from .. import functional as F


class Dropout(nn.Dropout):
    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            raise ValueError("adrec_fast.nn.Dropout: inplace is not supported")
        return F.dropout(x, self.p, self.training)

    def after_linear_relu(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``self(relu(x @ weight.T + bias))`` in one call (``functional.linear_relu_dropout``:
        the same mask, a backward without a pass of the dropout's own)."""
        return F.linear_relu_dropout(x, weight, bias, self.p, self.training)
