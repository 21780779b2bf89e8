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

#: how ``l2`` reaches the table (see EmbeddingBagCollection)
L2_MODES = ("lazy", "touched")


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

    ``l2 = lambda`` (fused optimizers only) adds the regulariser ``lambda/2 * ||W||^2`` over the
    whole table without a dense pass per step (``l2_mode``):

    * ``"lazy"`` (default): catch-up decay. Dense SGD on ``loss + lambda/2 ||W||^2`` multiplies
      every row by ``(1 - lr_s * lambda)`` at every step s, touched or not. Here a row is brought
      up to date when it is next looked up: it is multiplied by the product of the factors of
      the steps it missed, kept as a running sum of ``log(1 - lr_s * lambda)`` (``l2_logp``) and
      a per-row copy of that sum at the row's last update (``l2_clock``), so a learning-rate
      schedule is honoured. The step's own factor is folded into the fused update (its lr is
      divided by ``(1 - lr * lambda)`` and the factor applied at the next catch-up), so the
      backward stays one fused kernel. For SGD this is the dense regularised trajectory up to
      float rounding. For row-wise Adagrad it is decoupled weight decay (``w *= 1 - lr*lambda``
      every step, the Adagrad state sees only the loss gradient), not the gradient of the L2
      term passed through Adagrad's normalisation: the same knob with a different scale.
      Every row is brought up to date (``flush_l2``) before an eval-mode lookup and in
      ``state_dict``, so evaluation and checkpoints see the decayed table.
    * ``"touched"``: only the rows a step looks up are decayed, by that step's factor (the L2
      term of the rows in the batch): rows seen rarely are shrunk less.
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
        l2: float = 0.0,
        l2_mode: str = "lazy",
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
        l2 = float(l2)
        if not (l2 >= 0 and math.isfinite(l2)):
            raise ValueError(f"EmbeddingBagCollection: l2 must be a finite number >= 0, got {l2}")
        if l2_mode not in L2_MODES:
            raise ValueError(f"EmbeddingBagCollection: l2_mode must be one of {L2_MODES}, "
                             f"got {l2_mode!r}")
        if l2 > 0 and optimizer is None:
            raise ValueError("EmbeddingBagCollection: l2 > 0 needs a fused optimizer (FusedSGD or "
                             "FusedRowwiseAdagrad); with optimizer=None put the penalty in the loss")
        self.l2 = l2
        self.l2_mode = l2_mode
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
        # lazy decay bookkeeping (see the class docstring); not saved: state_dict flushes first
        self.l2_logp = 0.0
        self.register_buffer("l2_clock", torch.zeros(offs[-1] if l2 > 0 and l2_mode == "lazy"
                                                     else 0, dtype=torch.float64, device=device),
                             persistent=False)
        self._l2_dirty = False
        if l2 > 0:
            self.register_state_dict_pre_hook(lambda m, *_: m.flush_l2())
            self.register_load_state_dict_post_hook(lambda m, *_: m._l2_reset_clock())

    @property
    def num_tables(self) -> int:
        return len(self.num_embeddings)

    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        return self.lookup(self.table_offsets, indices, offsets, per_sample_weights)

    def lookup(self, table_offsets: Tensor, indices: Tensor, offsets: Tensor,
               per_sample_weights: Tensor | None = None) -> Tensor:
        """``forward`` with another table layout over the same ``weight`` buffer (e.g. the whole
        buffer as one table, ``indices`` then global row ids): the fused update and the L2
        decay still apply."""
        opt = self.optimizer
        if opt is None or not self.training or not torch.is_grad_enabled():
            if self._l2_dirty:
                self.flush_l2()
            return F.embedding_bag(
                self.weight, table_offsets, indices, offsets, per_sample_weights, self.pooling
            )
        lr = opt.lr
        if self.l2 > 0:
            lr = self._l2_step(table_offsets, indices, offsets, opt.lr)
        return _eb.embedding_bag_fused_update(
            self.weight, self.state, table_offsets, indices, offsets, per_sample_weights,
            self.pooling, opt.name, lr, opt.eps,
        )

    # -- L2 regularisation ----------------------------------------------------------------
    def _l2_step(self, table_offsets: Tensor, indices: Tensor, offsets: Tensor, lr: float) -> float:
        """Decay the rows this step looks up (before the lookup reads them); returns the lr of
        the fused update."""
        keep = 1.0 - lr * self.l2  # this step's factor
        if not keep > 0:
            raise ValueError(f"embedding L2: lr * l2 must be < 1 (lr {lr}, l2 {self.l2})")
        rows = _eb.global_rows(table_offsets, indices, offsets)  # [nnz], repeats allowed
        with torch.no_grad():
            if self.l2_mode == "touched":
                self.weight[rows] = self.weight[rows] * keep
                return lr
            # catch up on the steps each row missed (same value written for repeated rows)
            clock = self.l2_clock[rows]  # [nnz] float64
            factor = torch.exp(self.l2_logp - clock).to(self.weight.dtype)  # [nnz]
            self.weight[rows] = self.weight[rows] * factor[:, None]
            self.l2_clock[rows] = self.l2_logp
        self.l2_logp += math.log(keep)
        self._l2_dirty = True
        # w <- keep * w - lr * g = keep * (w - lr / keep * g): the update with lr / keep now,
        # the factor keep at the row's next catch-up (l2_logp already includes it)
        return lr / keep

    @torch.no_grad()
    def flush_l2(self) -> None:
        """Apply every pending lazy decay (all rows up to date); a no-op when none is pending."""
        if not self._l2_dirty:
            return
        self._l2_dirty = False
        factor = torch.exp(self.l2_logp - self.l2_clock).to(self.weight.dtype)  # [N]
        self.weight.mul_(factor[:, None])
        self.l2_clock.fill_(self.l2_logp)

    def _l2_reset_clock(self) -> None:
        """A loaded table is up to date: no decay pending for any row."""
        self._l2_dirty = False
        self.l2_clock.fill_(self.l2_logp)

    def extra_repr(self) -> str:
        opt = f", optimizer={self.optimizer}" if self.optimizer is not None else ""
        return (
            f"tables={self.num_tables}, rows={sum(self.num_embeddings)}, "
            f"dim={self.embedding_dim}, pooling={self.pooling!r}{opt}"
            + (f", l2={self.l2}, l2_mode={self.l2_mode!r}" if self.l2 else "")
        )
