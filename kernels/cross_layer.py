# SPDX-License-Identifier: Apache-2.0
"""DCN-v2 cross layer: the matrix products go through torch (cuBLAS), the elementwise parts are
fused in Triton.

Forward: ``xw = x @ W.T`` (torch), then one pass ``xw += bias; out = x0 * xw + x``.
Backward: one pass ``grad_x0 = g * xw; grad_xw = g * x0``, then torch for
``grad_x = g + grad_xw @ W``, ``grad_W = grad_xw.T @ x``, ``grad_b = sum_b grad_xw``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _identity(kernel):
    return kernel


@triton.jit
def _cross_layer_fwd_kernel(
    x0_ptr,  # [B, K] contiguous
    x_ptr,  # [B, K] contiguous
    xw_ptr,  # [B, K] in: x @ W.T, out: + bias
    bias_ptr,  # [K]
    out_ptr,  # [B, K]
    n,
    K,
    BLOCK: tl.constexpr,
):
    # One program per BLOCK flat elements; fp32 arithmetic.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    xw = tl.load(xw_ptr + i, mask=m, other=0.0).to(tl.float32)
    xw += tl.load(bias_ptr + i % K, mask=m, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + i, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + i, mask=m, other=0.0).to(tl.float32)
    tl.store(xw_ptr + i, xw.to(xw_ptr.dtype.element_ty), mask=m)
    tl.store(out_ptr + i, (x0 * xw + x).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _cross_layer_bwd_kernel(
    g_ptr,  # [B, K]
    x0_ptr,  # [B, K]
    xw_ptr,  # [B, K]
    gx0_ptr,  # [B, K] out: g * xw
    gxw_ptr,  # [B, K] out: g * x0
    n,
    BLOCK: tl.constexpr,
):
    # One program per BLOCK flat elements.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + i, mask=m, other=0.0).to(tl.float32)
    xw = tl.load(xw_ptr + i, mask=m, other=0.0).to(tl.float32)
    tl.store(gx0_ptr + i, (g * xw).to(gx0_ptr.dtype.element_ty), mask=m)
    tl.store(gxw_ptr + i, (g * x0).to(gxw_ptr.dtype.element_ty), mask=m)


_BLOCK = 1024


def cross_layer_fwd(x0, x, weight, bias, wrap=_identity):
    """x0, x [B, K], weight [K, K], bias [K] -> (out [B, K], xw [B, K])."""
    x0 = x0.contiguous()
    x = x.contiguous()
    xw = torch.mm(x, weight.t())  # [B, K]
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        wrap(_cross_layer_fwd_kernel)[(triton.cdiv(n, _BLOCK),)](
            x0, x, xw, bias.contiguous(), out, n, x.shape[1], BLOCK=_BLOCK, num_warps=4
        )
    return out, xw


def cross_layer_bwd(grad_out, x0, x, weight, xw, wrap=_identity):
    """-> (grad_x0 [B, K], grad_x [B, K], grad_weight [K, K], grad_bias [K])."""
    g = grad_out.contiguous()
    x0 = x0.contiguous()
    xw = xw.contiguous()
    gx0 = torch.empty_like(x0)
    gxw = torch.empty_like(x0)
    n = g.numel()
    if n:
        wrap(_cross_layer_bwd_kernel)[(triton.cdiv(n, _BLOCK),)](
            g, x0, xw, gx0, gxw, n, BLOCK=_BLOCK, num_warps=4
        )
    gx = torch.addmm(g, gxw, weight)  # g + grad_xw @ W
    gw = torch.mm(gxw.t(), x)
    gb = gxw.sum(0)
    return gx0, gx, gw, gb
