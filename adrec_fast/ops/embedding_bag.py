# SPDX-License-Identifier: Apache-2.0
"""Op layer for the multi-table pooled embedding lookup: fake kernels, autograd, backend choice,
and the backward fused with the optimizer update."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from . import _backend

_POOLING = {"sum": 0, "mean": 1}
OPTIMIZERS = {"sgd": 0, "rowwise_adagrad": 1}


def pooling_code(pooling: str | int) -> int:
    if isinstance(pooling, str):
        if pooling not in _POOLING:
            raise ValueError(f"embedding_bag: pooling must be 'sum' or 'mean', got {pooling!r}")
        return _POOLING[pooling]
    if pooling not in (0, 1):
        raise ValueError(f"embedding_bag: pooling must be 'sum' or 'mean', got {pooling!r}")
    return int(pooling)


@torch.library.register_fake("adrec::embedding_bag")
def _(weights, table_offsets, indices, offsets, per_sample_weights, pooling):
    T = table_offsets.shape[0] - 1
    B = (offsets.shape[0] - 1) // T
    return weights.new_empty(B, T * weights.shape[1])  # [B, T*D]


@torch.library.register_fake("adrec::embedding_bag_bwd")
def _(grad_out, weights, table_offsets, indices, offsets, per_sample_weights, pooling):
    U = torch.library.get_ctx().new_dynamic_size()
    rows = weights.new_empty(U, dtype=torch.long)  # [U]
    return rows, weights.new_empty(U, weights.shape[1])  # [U, D]


@torch.library.register_fake("adrec::embedding_bag_bwd_update")
def _(grad_out, weights, state, table_offsets, indices, offsets, psw, pooling, optimizer, lr, eps):
    return None


def _global_rows(table_offsets: Tensor, indices: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Global row id and bag id of every index: ([nnz], [nnz])."""
    T = table_offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]  # [T*B]
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=indices.device), lengths)
    B = lengths.numel() // T
    table = bag // B if B > 0 else bag
    return table_offsets.long()[table] + indices.long(), bag


def _psw_grad(grad_out, weights, table_offsets, indices, offsets, pooling) -> Tensor:
    """d out / d psw[k] = <grad_out bag slice, weights row> (/ L for mean). [nnz]"""
    T = table_offsets.numel() - 1
    D = weights.size(1)
    rows, bag = _global_rows(table_offsets, indices, offsets.long())
    B = (offsets.numel() - 1) // T
    g = grad_out.reshape(B, T, D).transpose(0, 1).reshape(T * B, D)  # [T*B, D], bag-major
    gk = (g[bag] * weights[rows]).sum(dim=1)  # [nnz]
    if pooling == 1:
        lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).to(gk.dtype)
        gk = gk / lengths[bag]
    return gk


def _setup_context(ctx, inputs, output):
    weights, table_offsets, indices, offsets, psw, pooling = inputs
    ctx.save_for_backward(weights, table_offsets, indices, offsets, psw)
    ctx.pooling = pooling
    ctx.weights_shape = weights.shape


def _backward(ctx, grad_out):
    w, tofs, idx, ofs, psw = ctx.saved_tensors
    grad_w = grad_psw = None
    if ctx.needs_input_grad[0]:
        rows, row_grads = torch.ops.adrec.embedding_bag_bwd(grad_out, w, tofs, idx, ofs, psw, ctx.pooling)
        # Touched rows only: a sparse COO gradient that torch's sparse-aware optimizers accept.
        grad_w = torch.sparse_coo_tensor(
            rows[None], row_grads, ctx.weights_shape, check_invariants=False
        )
    if psw is not None and ctx.needs_input_grad[4]:
        grad_psw = _psw_grad(grad_out, w, tofs, idx, ofs, ctx.pooling)
    return grad_w, None, None, None, grad_psw, None


torch.library.register_autograd("adrec::embedding_bag", _backward, setup_context=_setup_context)


class _FusedUpdate(torch.autograd.Function):
    """Forward is the lookup; backward updates the touched rows of ``weights`` in place with the
    optimizer (no ``.grad``). ``trigger`` is a scalar that requires grad, so autograd calls the
    backward even though ``weights`` does not require grad."""

    @staticmethod
    def forward(ctx, trigger, weights, state, table_offsets, indices, offsets, psw, pooling, opt, lr, eps):
        ctx.save_for_backward(weights, state, table_offsets, indices, offsets, psw)
        ctx.cfg = (pooling, opt, lr, eps)
        return torch.ops.adrec.embedding_bag(weights, table_offsets, indices, offsets, psw, pooling)

    @staticmethod
    def backward(ctx, grad_out):
        weights, state, tofs, idx, ofs, psw = ctx.saved_tensors
        pooling, opt, lr, eps = ctx.cfg
        torch.ops.adrec.embedding_bag_bwd_update(
            grad_out, weights, state, tofs, idx, ofs, psw, pooling, opt, lr, eps
        )
        return (None,) * 11


def embedding_bag(weights, table_offsets, indices, offsets, per_sample_weights=None, pooling="sum"):
    code = pooling_code(pooling)
    be = _backend.backend_for("embedding_bag", weights.device)
    if be == "reference":
        return reference.embedding_bag(weights, table_offsets, indices, offsets, per_sample_weights, code)
    if be == "triton":
        return torch.ops.adrec.embedding_bag_triton(
            weights, table_offsets, indices, offsets, per_sample_weights, code
        )
    return torch.ops.adrec.embedding_bag(weights, table_offsets, indices, offsets, per_sample_weights, code)


def embedding_bag_fused_update(
    weights, state, table_offsets, indices, offsets, per_sample_weights, pooling, optimizer, lr, eps
):
    """Lookup whose backward applies ``optimizer`` ('sgd' | 'rowwise_adagrad') to the touched rows
    of ``weights`` (and row-wise ``state``) in place."""
    trigger = torch.zeros((), device=weights.device, requires_grad=torch.is_grad_enabled())
    return _FusedUpdate.apply(
        trigger, weights, state, table_offsets, indices, offsets, per_sample_weights,
        pooling_code(pooling), OPTIMIZERS[optimizer], float(lr), float(eps),
    )
