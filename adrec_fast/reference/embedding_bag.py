# SPDX-License-Identifier: Apache-2.0
"""Multi-table pooled embedding lookup: a loop of per-table ``F.embedding_bag`` calls."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def embedding_bag(
    weights: Tensor,  # [N_total, D]
    table_offsets: Tensor,  # [T+1]
    indices: Tensor,  # [nnz], ids within their table
    offsets: Tensor,  # [T*B+1], bag (t, b) = indices[offsets[t*B+b]:offsets[t*B+b+1]]
    per_sample_weights: Tensor | None = None,  # [nnz]
    pooling: str | int = "sum",
) -> Tensor:  # [B, T*D]
    """out[b, t*D:(t+1)*D] = pool_{k in bag(t, b)} psw[k] * weights[table_offsets[t] + indices[k]].

    Sum or mean pooling; an empty bag gives zeros. Mean divides the weighted sum by the bag
    length.
    """
    mean = pooling in ("mean", 1)
    T = table_offsets.numel() - 1
    B = (offsets.numel() - 1) // T
    D = weights.size(1)
    tofs = table_offsets.tolist()
    outs = []
    for t in range(T):
        o = offsets[t * B : (t + 1) * B + 1].long()  # [B+1]
        start = int(o[0])
        idx = indices[start : int(o[-1])].long()  # [n_t]
        w_t = weights[tofs[t] : tofs[t + 1]]  # [n_rows_t, D]
        psw = per_sample_weights[start : int(o[-1])] if per_sample_weights is not None else None
        pooled = F.embedding_bag(
            idx, w_t, o - start, mode="sum", per_sample_weights=psw, include_last_offset=True
        )  # [B, D]
        if mean:
            lengths = (o[1:] - o[:-1]).clamp(min=1).to(pooled.dtype)  # [B]
            pooled = pooled / lengths[:, None]
        outs.append(pooled)
    if not outs:
        return weights.new_zeros(B, 0)
    return torch.cat(outs, dim=1) if B > 0 else weights.new_zeros(0, T * D)


def sgd_update(weights: Tensor, grad: Tensor, lr: float) -> Tensor:
    """w <- w - lr * g (grad dense [N_total, D])."""
    return weights - lr * grad


def rowwise_adagrad_update(
    weights: Tensor,  # [N_total, D]
    state: Tensor,  # [N_total]
    grad: Tensor,  # [N_total, D] dense; rows with zero gradient that were not touched are skipped
    touched: Tensor,  # [N_total] bool: rows the batch used
    lr: float,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Row-wise Adagrad on the touched rows: s += mean(g*g); w -= lr * g / (sqrt(s) + eps)."""
    new_state = state + torch.where(touched, grad.square().mean(dim=1), torch.zeros_like(state))
    step = lr / (new_state.sqrt() + eps)  # [N_total]
    new_w = weights - torch.where(touched[:, None], step[:, None] * grad, torch.zeros_like(grad))
    return new_w, new_state
