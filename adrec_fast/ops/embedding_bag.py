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


def global_rows(table_offsets: Tensor, indices: Tensor, offsets: Tensor) -> Tensor:
    """[nnz] global row id (row of the weight buffer) of every index of a TBE-layout lookup."""
    if table_offsets.numel() == 2:
        return indices.long() + table_offsets[0].long()
    return _global_rows(table_offsets, indices, offsets.long())[0]


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
        return _fused_ops(weights.device)[0](weights, table_offsets, indices, offsets, psw, pooling)

    @staticmethod
    def backward(ctx, grad_out):
        weights, state, tofs, idx, ofs, psw = ctx.saved_tensors
        pooling, opt, lr, eps = ctx.cfg
        _fused_ops(weights.device)[1](
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


_TRIGGERS: dict[torch.device, Tensor] = {}


def _trigger(device) -> Tensor:
    """One cached scalar leaf per device that requires grad. Created once outside any compiled
    region: torch.compile(fullgraph=True) cannot trace creating a tensor with requires_grad."""
    t = _TRIGGERS.get(device)
    if t is None:
        t = _TRIGGERS[device] = torch.zeros((), device=device, requires_grad=True)
    return t


def embedding_bag_fused_update(
    weights, state, table_offsets, indices, offsets, per_sample_weights, pooling, optimizer, lr, eps
):
    """Lookup whose backward applies ``optimizer`` ('sgd' | 'rowwise_adagrad') to the touched rows
    of ``weights`` (and row-wise ``state``) in place."""
    trigger = _trigger(weights.device)
    return _FusedUpdate.apply(
        trigger, weights, state, table_offsets, indices, offsets, per_sample_weights,
        pooling_code(pooling), OPTIMIZERS[optimizer], float(lr), float(eps),
    )


def _reference_bwd_update(grad_out, weights, state, tofs, idx, ofs, psw, pooling, opt, lr, eps):
    """Fused update through plain torch ops (the CUDA fallback when neither csrc/cuda nor Triton
    is there): sums each touched row's gradient, then SGD / row-wise Adagrad in place."""
    with torch.no_grad():
        grow, bag = _global_rows(tofs, idx, ofs)  # [nnz], [nnz]
        T = tofs.numel() - 1
        B = (ofs.numel() - 1) // T
        D = weights.shape[1]
        g = grad_out.reshape(B, T, D).transpose(0, 1).reshape(T * B, D)[bag].float()  # [nnz, D]
        c = torch.ones_like(grow, dtype=torch.float32) if psw is None else psw.float()
        if pooling == 1:
            c = c / (ofs[1:] - ofs[:-1]).clamp(min=1).float()[bag]
        rows, inv = torch.unique(grow, return_inverse=True)
        rg = torch.zeros(rows.numel(), D, device=weights.device).index_add_(0, inv, g * c[:, None])
        if opt == 1:
            state[rows] += rg.square().mean(dim=1)
            rg = rg / (state[rows].sqrt() + eps)[:, None]
        weights[rows] -= (lr * rg).to(weights.dtype)


def _fused_ops(device):
    """(lookup, backward+update) for the fused-optimizer path on ``device``."""
    be = _backend.backend_for("embedding_bag", device)
    if be == "triton":
        return torch.ops.adrec.embedding_bag_triton, torch.ops.adrec.embedding_bag_bwd_update_triton
    if be == "reference":
        return reference.embedding_bag, _reference_bwd_update
    return torch.ops.adrec.embedding_bag, torch.ops.adrec.embedding_bag_bwd_update


# --- Triton backend: adrec::embedding_bag_triton (triton_op; the reference is its CPU kernel),
# adrec::embedding_bag_bwd_triton -> (unique rows, row grads) and the fused
# adrec::embedding_bag_bwd_update_triton (custom ops: their output size / effect depends on the
# data, so torch.compile treats them as opaque). kernels/embedding_bag.py. Skipped without
# triton or a device it runs on.
_tk = None
if _backend.TRITON_OPS:  # a device the kernels can run on (ops/_backend.py)
    try:
        from typing import Optional

        from torch._subclasses.fake_tensor import is_fake
        from torch.library import triton_op, wrap_triton

        from ..kernels import embedding_bag as _tk
    except ImportError:  # triton is not installed
        _tk = None

if _tk is not None:

    @triton_op("adrec::embedding_bag_triton", mutates_args=())
    def _embedding_bag_triton(
        weights: Tensor, table_offsets: Tensor, indices: Tensor, offsets: Tensor,
        per_sample_weights: Optional[Tensor], pooling: int,  # noqa: UP045
    ) -> Tensor:
        # The bound check reads a flag back from the device: skipped while tracing (ids out of
        # range then read as zeros, never out of bounds).
        check = not (is_fake(weights) or torch.compiler.is_compiling())
        return _tk.embedding_bag_fwd(
            weights, table_offsets, indices, offsets, per_sample_weights, pooling,
            check=check, wrap=wrap_triton,
        )

    @_embedding_bag_triton.register_kernel("cpu")
    def _(weights, table_offsets, indices, offsets, per_sample_weights, pooling):
        return reference.embedding_bag(weights, table_offsets, indices, offsets, per_sample_weights, pooling)

    @torch.library.custom_op("adrec::embedding_bag_bwd_triton", mutates_args=())
    def _embedding_bag_bwd_triton(
        grad_out: Tensor, weights: Tensor, table_offsets: Tensor, indices: Tensor,
        offsets: Tensor, per_sample_weights: Optional[Tensor], pooling: int,  # noqa: UP045
    ) -> tuple[Tensor, Tensor]:
        if weights.device.type == "cpu":
            return torch.ops.adrec.embedding_bag_bwd(
                grad_out, weights, table_offsets, indices, offsets, per_sample_weights, pooling
            )
        return _tk.embedding_bag_bwd(
            grad_out, weights, table_offsets, indices, offsets, per_sample_weights, pooling
        )

    @_embedding_bag_bwd_triton.register_fake
    def _(grad_out, weights, table_offsets, indices, offsets, per_sample_weights, pooling):
        U = torch.library.get_ctx().new_dynamic_size()
        return weights.new_empty(U, dtype=torch.long), weights.new_empty(U, weights.shape[1])

    @torch.library.custom_op("adrec::embedding_bag_bwd_update_triton", mutates_args=("weights", "state"))
    def _embedding_bag_bwd_update_triton(
        grad_out: Tensor, weights: Tensor, state: Tensor, table_offsets: Tensor, indices: Tensor,
        offsets: Tensor, per_sample_weights: Optional[Tensor], pooling: int, optimizer: int,  # noqa: UP045
        lr: float, eps: float,
    ) -> None:
        if weights.device.type == "cpu":
            torch.ops.adrec.embedding_bag_bwd_update(
                grad_out, weights, state, table_offsets, indices, offsets, per_sample_weights,
                pooling, optimizer, lr, eps,
            )
            return
        _tk.embedding_bag_bwd_update(
            grad_out, weights, state, table_offsets, indices, offsets, per_sample_weights,
            pooling, optimizer, lr, eps,
        )

    @_embedding_bag_bwd_update_triton.register_fake
    def _(grad_out, weights, state, table_offsets, indices, offsets, psw, pooling, optimizer, lr, eps):
        return None

    def _triton_backward(ctx, grad_out):
        w, tofs, idx, ofs, psw = ctx.saved_tensors
        grad_w = grad_psw = None
        if ctx.needs_input_grad[0]:
            rows, row_grads = torch.ops.adrec.embedding_bag_bwd_triton(
                grad_out, w, tofs, idx, ofs, psw, ctx.pooling
            )
            grad_w = torch.sparse_coo_tensor(
                rows[None], row_grads, ctx.weights_shape, check_invariants=False
            )
        if psw is not None and ctx.needs_input_grad[4]:
            grad_psw = _psw_grad(grad_out, w, tofs, idx, ofs, ctx.pooling)
        return grad_w, None, None, None, grad_psw, None

    _embedding_bag_triton.register_autograd(_triton_backward, setup_context=_setup_context)
    _backend.register(
        "embedding_bag", "cuda", "triton",
        default=_backend.default_on_cuda("embedding_bag", "triton"),
    )
