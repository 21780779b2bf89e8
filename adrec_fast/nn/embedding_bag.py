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
from ..optim import FusedRowwiseAdagrad, FusedSGD

#: how ``l2`` reaches the table (see EmbeddingBagCollection)
L2_MODES = ("lazy", "touched")
#: the lazy mode folds its scale into the table when it falls below this (float32 keeps its
#: relative precision under any power-of-two scale; the bound only keeps values in range)
L2_RENORM = 1e-4


class _ScaleOut(torch.autograd.Function):
    """``out *= scale`` whose backward passes the incoming gradient on unscaled: the fused update
    behind ``out`` must see the gradient with respect to the rows of W = scale * weight."""

    @staticmethod
    def forward(ctx, out, scale):
        ctx.mark_dirty(out)  # scaled where it lies: the pooled rows are this call's own tensor
        return out.mul_(scale)

    @staticmethod
    def backward(ctx, g):
        return g, None


def check_l2(l2: float, mode: str, fused: bool, name: str = "l2") -> float:
    """The one validation of an embedding L2 setting (``name`` as the caller calls it):
    ``l2`` finite and >= 0, ``mode`` in ``L2_MODES``, and a fused optimizer when ``l2 > 0``
    (the decay lives inside the fused update). Returns ``float(l2)``."""
    l2 = float(l2)
    if not (l2 >= 0 and math.isfinite(l2)):
        raise ValueError(f"{name} must be a finite number >= 0, got {l2}")
    if mode not in L2_MODES:
        raise ValueError(f"{name}_mode must be one of {L2_MODES}, got {mode!r}")
    if l2 > 0 and not fused:
        raise ValueError(f"{name} > 0 needs a fused embedding optimizer (row-wise Adagrad or "
                         "SGD); without one put the penalty in the loss")
    return l2


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

    * ``"lazy"`` (default): dense SGD on ``loss + lambda/2 ||W||^2`` multiplies every row by
      ``keep = 1 - lr_s * lambda`` at every step s, touched or not. Here the table is stored as
      ``W = l2_scale * weight`` with one scalar ``l2_scale``: a step multiplies the scalar by
      ``keep`` (every row decays, at no cost), the lookup scales its output [B, T*D] by it, and
      the fused update gets the gradient with respect to W and the lr ``lr / (keep * scale)``,
      so that ``W <- keep * W - lr * step`` holds exactly for the stored rows. When the scalar
      falls below ``L2_RENORM`` it is folded into the table (one pass over all rows, every
      ~log(1e-4)/log(keep) steps), as it is before an eval-mode lookup and in ``state_dict``
      (``flush_l2``), so evaluation, checkpoints and ``weight`` after them see W itself. For
      SGD this is the dense regularised trajectory up to float rounding, with any lr schedule.
      For row-wise Adagrad it is decoupled weight decay (``w *= 1 - lr*lambda`` every step, the
      Adagrad state sees only the loss gradient), not the gradient of the L2 term passed through
      Adagrad's normalisation: the same knob with a different scale.
    * ``"touched"``: only the rows a step looks up are decayed, by that step's factor (the L2
      term of the rows in the batch; one extra gather/scatter of those rows per step): rows
      seen rarely are shrunk less.
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
        F.check_pooling(pooling)
        if optimizer is not None and not isinstance(optimizer, (FusedSGD, FusedRowwiseAdagrad)):
            raise TypeError(
                "EmbeddingBagCollection: optimizer must be adrec_fast.optim.FusedSGD, "
                f"FusedRowwiseAdagrad or None, got {type(optimizer).__name__}"
            )
        l2 = check_l2(l2, l2_mode, optimizer is not None, "EmbeddingBagCollection: l2")
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
        # lazy decay: W = l2_scale * weight (see the class docstring); never saved, since
        # state_dict folds it in first
        self.l2_scale = 1.0
        if l2 > 0:
            self.register_state_dict_pre_hook(lambda m, *_: m.flush_l2())
            self.register_load_state_dict_post_hook(lambda m, *_: m._l2_loaded())

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
            self.flush_l2()
            return F.embedding_bag(
                self.weight, table_offsets, indices, offsets, per_sample_weights, self.pooling
            )
        lr, scale = opt.lr, 1.0
        if self.l2 > 0:
            keep = 1.0 - lr * self.l2  # this step's factor for every row
            if not keep > 0:
                raise ValueError(f"embedding L2: lr * l2 must be < 1 (lr {lr}, l2 {self.l2})")
            if self.l2_mode == "touched":
                rows = F.embedding_rows(table_offsets, indices, offsets)  # [nnz], repeats allowed
                with torch.no_grad():
                    self.weight.index_copy_(0, rows, self.weight.index_select(0, rows).mul_(keep))
            else:
                if self.l2_scale < L2_RENORM:
                    self.flush_l2()
                scale = self.l2_scale
                # W <- keep * W - lr * step  <=>  weight <- weight - lr / (keep * scale) * step
                lr = lr / (keep * scale)
                self.l2_scale = scale * keep
        out = F.embedding_bag(
            self.weight, table_offsets, indices, offsets, per_sample_weights, self.pooling,
            optimizer=opt, state=self.state, lr=lr,
        )
        return out if scale == 1.0 else _ScaleOut.apply(out, scale)

    @torch.no_grad()
    def flush_l2(self) -> None:
        """Fold the lazy decay's scale into the table (``weight`` is W again); a no-op when
        nothing is pending."""
        if self.l2_scale != 1.0:
            self.weight.mul_(self.l2_scale)
            self.l2_scale = 1.0

    def _l2_loaded(self) -> None:
        """A loaded table is W itself."""
        self.l2_scale = 1.0

    def extra_repr(self) -> str:
        opt = f", optimizer={self.optimizer}" if self.optimizer is not None else ""
        return (
            f"tables={self.num_tables}, rows={sum(self.num_embeddings)}, "
            f"dim={self.embedding_dim}, pooling={self.pooling!r}{opt}"
            + (f", l2={self.l2}, l2_mode={self.l2_mode!r}" if self.l2 else "")
        )
