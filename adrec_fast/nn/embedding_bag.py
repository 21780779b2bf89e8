# SPDX-License-Identifier: Apache-2.0
"""EmbeddingBagCollection: T pooled embedding tables in one buffer, with an optional optimizer
fused into the backward."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import functional as F
from .._memory import empty_table
from ..ops import embedding_bag as _eb
from ..optim import FusedRowwiseAdagrad, FusedSGD


class EmbeddingBagCollection(nn.Module):
    """T tables of ``num_embeddings[t]`` rows, all of width ``embedding_dim``, in one
    ``weight [N_total, D]`` buffer.

    ``forward(indices, offsets, per_sample_weights=None) -> [B, T*D]`` with the FBGEMM TBE layout
    (see :func:`adrec_fast.functional.embedding_bag`).

    With ``optimizer=None`` the weight is a ``Parameter`` whose gradient is sparse (touched rows
    only; use ``torch.optim.SparseAdam``/``SGD``/``Adagrad``). With ``optimizer=FusedSGD(lr)`` or
    ``FusedRowwiseAdagrad(lr, eps)``, backward updates the touched rows in place: the weight is a
    buffer (no ``.grad``; dense optimizers do not see it) and row-wise Adagrad keeps one float per
    row in ``state``. Updates are deterministic.
    """

    def __init__(
        self,
        num_embeddings: Sequence[int],
        embedding_dim: int,
        pooling: str = "sum",
        optimizer: FusedSGD | FusedRowwiseAdagrad | None = None,
        init_std: float | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        num_embeddings = [int(n) for n in num_embeddings]
        if not num_embeddings:
            raise ValueError("EmbeddingBagCollection: num_embeddings must name at least one table")
        if any(n <= 0 for n in num_embeddings):
            raise ValueError(f"EmbeddingBagCollection: every table needs >= 1 row, got {num_embeddings}")
        if embedding_dim <= 0:
            raise ValueError(f"EmbeddingBagCollection: embedding_dim must be > 0, got {embedding_dim}")
        _eb.pooling_code(pooling)
        if optimizer is not None and not isinstance(optimizer, (FusedSGD, FusedRowwiseAdagrad)):
            raise TypeError(
                "EmbeddingBagCollection: optimizer must be adrec_fast.optim.FusedSGD, "
                f"FusedRowwiseAdagrad or None, got {type(optimizer).__name__}"
            )
        self.num_embeddings = num_embeddings
        self.embedding_dim = int(embedding_dim)
        self.pooling = pooling
        self.optimizer = optimizer
        offs = [0]
        for n in num_embeddings:
            offs.append(offs[-1] + n)
        self.register_buffer(
            "table_offsets", torch.tensor(offs, dtype=torch.long, device=device), persistent=False
        )
        # Random-row reads and updates of a large table: back it with huge pages (_memory.py).
        w = empty_table(offs[-1], embedding_dim, dtype=dtype, device=device)
        std = init_std if init_std is not None else 1.0 / math.sqrt(embedding_dim) * 0.1
        with torch.no_grad():
            w.normal_(0.0, std)
        if optimizer is None:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)
        state = empty_table(
            offs[-1] if isinstance(optimizer, FusedRowwiseAdagrad) else 0,
            dtype=torch.float32,
            device=device,
        )
        state.zero_()
        self.register_buffer("state", state)

    @property
    def num_tables(self) -> int:
        return len(self.num_embeddings)

    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        opt = self.optimizer
        if opt is None or not self.training or not torch.is_grad_enabled():
            return F.embedding_bag(
                self.weight, self.table_offsets, indices, offsets, per_sample_weights, self.pooling
            )
        return _eb.embedding_bag_fused_update(
            self.weight, self.state, self.table_offsets, indices, offsets, per_sample_weights,
            self.pooling, opt.name, opt.lr, opt.eps,
        )

    def extra_repr(self) -> str:
        opt = f", optimizer={self.optimizer}" if self.optimizer is not None else ""
        return (
            f"tables={self.num_tables}, rows={sum(self.num_embeddings)}, "
            f"dim={self.embedding_dim}, pooling={self.pooling!r}{opt}"
        )
