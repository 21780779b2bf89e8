# SPDX-License-Identifier: Apache-2.0
"""Sigmoid + binary cross-entropy in one pass (loss and gradient), and the fused linear +
sigmoid score, in Triton.

Loss per element, stable for any z: ``w * (max(z, 0) - z*y + log1p(exp(-|z|)))``; the mean's
gradient ``(sigmoid(z) - y) * w / B`` is written by the same pass. The loss is reduced in two
fixed-order stages (per-program partials, then one torch sum), so it is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _identity(kernel):
    return kernel


@triton.jit
def _sigmoid_bce_fwd_kernel(
    z_ptr,  # [B]
    y_ptr,  # [B]
    w_ptr,  # [B] or dummy
    grad_ptr,  # [B]
    part_ptr,  # [num_programs] fp32 partial loss sums
    n,
    inv_n,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per BLOCK elements; fp32 arithmetic.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    z = tl.load(z_ptr + i, mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + i, mask=m, other=0.0).to(tl.float32)
    ez = tl.exp(-tl.abs(z))
    loss = tl.maximum(z, 0.0) - z * y + tl.log(1.0 + ez)
    sig = tl.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez))
    g = sig - y
    if HAS_W:
        w = tl.load(w_ptr + i, mask=m, other=0.0).to(tl.float32)
        loss = loss * w
        g = g * w
    tl.store(grad_ptr + i, (g * inv_n).to(grad_ptr.dtype.element_ty), mask=m)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.where(m, loss, 0.0), axis=0))


@triton.jit
def _score_fwd_kernel(
    x_ptr,  # [B, K] (strided)
    w_ptr,  # [K]
    b_ptr,  # [1]
    out_ptr,  # [B]
    B,
    K,
    s_b,
    s_k,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per BLOCK_B rows; loop over K in BLOCK_K tiles; fp32 accumulate.
    r = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = r < B
    acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        x = tl.load(x_ptr + r.to(tl.int64)[:, None] * s_b + k[None, :] * s_k,
                    mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + k, mask=km, other=0.0).to(tl.float32)
        acc += tl.sum(x * w[None, :], axis=1)
    z = acc + tl.load(b_ptr).to(tl.float32)
    tl.store(out_ptr + r, (1.0 / (1.0 + tl.exp(-z))).to(out_ptr.dtype.element_ty), mask=rm)


_BLOCK = 1024


def sigmoid_bce_fwd(logits, labels, weight=None, wrap=_identity):
    """logits [B], labels [B], weight [B]? -> (loss [] mean, grad_logits [B])."""
    n = logits.numel()
    z = logits.contiguous()
    y = labels.contiguous()
    grad = torch.empty_like(z)
    nprog = triton.cdiv(n, _BLOCK)
    part = torch.zeros(max(nprog, 1), dtype=torch.float32, device=z.device)
    if n:
        wrap(_sigmoid_bce_fwd_kernel)[(nprog,)](
            z, y, weight.contiguous() if weight is not None else z, grad, part, n, 1.0 / n,
            HAS_W=weight is not None, BLOCK=_BLOCK, num_warps=4,
        )
    # Mean of an empty batch is NaN, as in torch.
    loss = (part.sum() / n if n else part.sum() * float("nan")).to(logits.dtype)
    return loss, grad


def score_fwd(x, w, b, wrap=_identity):
    """x [B, K], w [K], b [] or [1] -> sigmoid(x @ w + b) [B]."""
    B, K = x.shape
    out = x.new_empty(B)
    if B == 0:
        return out
    block_k = min(triton.next_power_of_2(max(K, 1)), 128)
    block_b = max(1, min(64, 4096 // block_k))
    wrap(_score_fwd_kernel)[(triton.cdiv(B, block_b),)](
        x, w.contiguous(), b.reshape(1), out, B, K, *x.stride(),
        BLOCK_B=block_b, BLOCK_K=block_k, num_warps=4,
    )
    return out
