# SPDX-License-Identifier: Apache-2.0
"""Inputs and oracles shared by the Triton-interpreter tests (tests/triton) and the GPU tests
(tests/cuda)."""
from __future__ import annotations

import torch

from adrec_fast import reference as R


def make_bags(rows, B, max_len, index_dtype=torch.int64, min_len=0, dup=False, device="cpu"):
    """Random TBE inputs: table_offsets [T+1], indices [nnz], offsets [T*B+1]; every table that
    has indices uses its largest valid id once; ``dup`` draws from 3 ids (many duplicates)."""
    T = len(rows)
    tofs = torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist(), dtype=torch.long)
    lengths = torch.randint(min_len, max_len + 1, (T * B,))
    idx = []
    for t in range(T):
        n = int(lengths[t * B : (t + 1) * B].sum())
        ids = torch.randint(0, min(rows[t], 3) if dup else rows[t], (n,))
        if n > 0:
            ids[torch.randint(0, n, (1,))] = rows[t] - 1
        idx.append(ids)
    indices = torch.cat(idx).to(index_dtype)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(index_dtype)
    return tofs.to(device), indices.to(device), offsets.to(device)


def reference_dense_grad(w, tofs, idx, ofs, psw, pooling, grad_out):
    """Dense [N, D] float64 gradient of the reference, and the touched-row mask [N]."""
    wd = w.detach().double().cpu().requires_grad_(True)
    p = psw.detach().double().cpu() if psw is not None else None
    out = R.embedding_bag(wd, tofs.cpu(), idx.cpu(), ofs.cpu(), p, pooling)
    (g,) = torch.autograd.grad(out, wd, grad_out.double().cpu())
    T = tofs.numel() - 1
    lengths = ofs.cpu().long()[1:] - ofs.cpu().long()[:-1]
    table = torch.repeat_interleave(torch.arange(lengths.numel()), lengths) // max(
        (ofs.numel() - 1) // T, 1
    )
    touched = torch.zeros(w.shape[0], dtype=torch.bool)
    touched[tofs.cpu()[table] + idx.cpu().long()] = True
    return g, touched


def reference_update(w, state, dense, touched, optimizer, lr, eps):
    """(w', state') float64 after SGD (0) or row-wise Adagrad (1) on the touched rows."""
    wd = w.detach().double().cpu()
    if optimizer == 0:
        return wd - lr * dense, state.detach().cpu().double()
    return R.rowwise_adagrad_update(wd, state.detach().double().cpu(), dense, touched, lr, eps)
