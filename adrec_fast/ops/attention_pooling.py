# SPDX-License-Identifier: Apache-2.0
"""Op layer for target attention pooling over variable-length behaviour sequences."""
import torch

from .. import reference
from . import _backend


@torch.library.register_fake("adrec::attention_pooling")
def _(query, keys, offsets):
    return torch.empty_like(query), keys.new_empty(keys.shape[0])  # out [B, D], probs [L_total]


@torch.library.register_fake("adrec::attention_pooling_bwd")
def _(grad_out, query, keys, offsets, probs):
    return torch.empty_like(query), torch.empty_like(keys)


def _setup_context(ctx, inputs, output):
    query, keys, offsets = inputs
    ctx.save_for_backward(query, keys, offsets, output[1])
    # The attention weights are returned for inspection and for the backward only: they carry
    # no gradient (a data-dependent check on grad_probs would also break tracing).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no [L_total] zeros for the unused probs gradient


def _backward(ctx, grad_out, grad_probs):
    if grad_out is None:  # grads are not materialised: nothing flows back
        return None, None, None
    query, keys, offsets, probs = ctx.saved_tensors
    gq, gk = torch.ops.adrec.attention_pooling_bwd(grad_out, query, keys, offsets, probs)
    return gq, gk, None


torch.library.register_autograd("adrec::attention_pooling", _backward, setup_context=_setup_context)


def attention_pooling(query, keys, offsets):
    be = _backend.backend_for("attention_pooling", query.device)
    if be == "reference":
        return reference.attention_pooling(query, keys, offsets)
    if be == "triton":
        return torch.ops.adrec.attention_pooling_triton(query, keys, offsets)[0]
    return torch.ops.adrec.attention_pooling(query, keys, offsets)[0]


# --- Triton backend: adrec::attention_pooling_triton for CUDA tensors
# (kernels/attention_pooling.py); returns (out, probs) like adrec::attention_pooling. The
# reference is its CPU kernel. Skipped without triton or a device it runs on.
_tk = None
if _backend.TRITON_OPS:  # a device the kernels can run on (ops/_backend.py)
    try:
        from torch.library import triton_op, wrap_triton

        from ..kernels import attention_pooling as _tk
    except ImportError:  # triton is not installed
        _tk = None

if _tk is not None:

    @triton_op("adrec::attention_pooling_triton", mutates_args=())
    def _attention_pooling_triton(
        query: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.attention_pooling_fwd(query, keys, offsets, wrap=wrap_triton)

    @triton_op("adrec::attention_pooling_bwd_triton", mutates_args=())
    def _attention_pooling_bwd_triton(
        grad_out: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
        probs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.attention_pooling_bwd(grad_out, query, keys, offsets, probs, wrap=wrap_triton)

    def _segment_ids(offsets, n):
        lengths = offsets[1:].long() - offsets[:-1].long()  # [B]
        return torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=n)

    @_attention_pooling_triton.register_kernel("cpu")
    def _(query, keys, offsets):
        out = reference.attention_pooling(query, keys, offsets)  # [B, D]
        probs = keys.new_zeros(keys.shape[0], dtype=torch.float32)  # [L_total]
        o = offsets.tolist()
        for b in range(query.shape[0]):
            k = keys[o[b] : o[b + 1]]
            if k.shape[0]:
                s = (k @ query[b]).float() / query.shape[1] ** 0.5
                probs[o[b] : o[b + 1]] = torch.softmax(s, dim=0)
        return out, probs

    @_attention_pooling_bwd_triton.register_kernel("cpu")
    def _(grad_out, query, keys, offsets, probs):
        n, D = keys.shape
        seg = _segment_ids(offsets, n)  # [L_total]
        p = probs.to(keys.dtype)
        g = grad_out[seg]  # [L_total, D]
        gk_dot = (g * keys).sum(1)  # [L_total]
        go = torch.zeros(query.shape[0], dtype=keys.dtype).index_add_(0, seg, p * gk_dot)
        ds = p * (gk_dot - go[seg]) / D**0.5
        gk = p[:, None] * g + ds[:, None] * query[seg]
        gq = torch.zeros_like(query).index_add_(0, seg, ds[:, None] * keys)
        return gq, gk

    def _triton_backward(ctx, grad_out, grad_probs):
        if grad_out is None:  # _setup_context does not materialise grads
            return None, None, None
        query, keys, offsets, probs = ctx.saved_tensors
        gq, gk = torch.ops.adrec.attention_pooling_bwd_triton(grad_out, query, keys, offsets, probs)
        return gq, gk, None

    _attention_pooling_triton.register_autograd(_triton_backward, setup_context=_setup_context)
    _backend.register(
        "attention_pooling", "cuda", "triton",
        default=_backend.default_on_cuda("attention_pooling", "triton"),
    )
