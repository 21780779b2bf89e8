# SPDX-License-Identifier: Apache-2.0
"""DLRM pairwise dot interaction in Triton: out[b, p(i, j)] = e_i . e_j for i < j (i <= j with
self interaction), row-major in (i, j).

Forward: the per-sample Gram matrix with ``tl.dot`` (IEEE fp32 for fp32 inputs), scattered to
the upper triangle. Backward: ``grad_E = G @ E`` with G the symmetric matrix of the pair
gradients (diagonal doubled). Deterministic: no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _identity(kernel):
    return kernel


@triton.jit
def _pair_index(i, j, F, SELF: tl.constexpr):
    # Position of pair (i, j), i < j (i <= j with SELF), in the row-major upper triangle.
    if SELF:
        return i * F - (i * (i - 1)) // 2 + (j - i)
    else:
        return i * F - (i * (i + 1)) // 2 + (j - i - 1)


@triton.jit
def _dot_interaction_fwd_kernel(
    emb_ptr,  # [B, F, D] (strided)
    out_ptr,  # [B, P]
    F,
    D,
    P,
    s_b,
    s_f,
    s_d,
    SELF: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per sample: Gram matrix of its [F, D] tile (fp32 accumulate).
    b = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_D)
    m = (f < F)[:, None] & (d < D)[None, :]
    e = tl.load(emb_ptr + b * s_b + f[:, None] * s_f + d[None, :] * s_d, mask=m, other=0.0)
    if IEEE:
        gram = tl.dot(e, tl.trans(e), input_precision="ieee")
    else:
        gram = tl.dot(e, tl.trans(e))
    i = f[:, None]
    j = f[None, :]
    if SELF:
        keep = (i <= j) & (j < F)
    else:
        keep = (i < j) & (j < F)
    p = _pair_index(i, j, F, SELF)
    tl.store(out_ptr + b * P + p, gram.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _dot_interaction_bwd_kernel(
    g_ptr,  # [B, P] contiguous
    emb_ptr,  # [B, F, D] (strided)
    gemb_ptr,  # [B, F, D] contiguous
    F,
    D,
    P,
    s_b,
    s_f,
    s_d,
    SELF: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per sample: grad_E = G @ E, G[i, j] = g[p(min, max)], G[i, i] = 2 g[p(i, i)].
    b = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_D)
    m = (f < F)[:, None] & (d < D)[None, :]
    e = tl.load(emb_ptr + b * s_b + f[:, None] * s_f + d[None, :] * s_d, mask=m, other=0.0)
    i = f[:, None]
    j = f[None, :]
    lo = tl.minimum(i, j)
    hi = tl.maximum(i, j)
    valid = (i < F) & (j < F)
    if SELF:
        keep = valid
    else:
        keep = valid & (i != j)
    p = _pair_index(lo, hi, F, SELF)
    gm = tl.load(g_ptr + b * P + p, mask=keep, other=0.0).to(tl.float32)
    gm = tl.where(i == j, 2.0 * gm, gm)
    if IEEE:
        ge = tl.dot(gm, e.to(tl.float32), input_precision="ieee")
    else:
        ge = tl.dot(gm.to(e.dtype), e)
    out = gemb_ptr + b * (F * D) + f[:, None] * D + d[None, :]
    tl.store(out, ge.to(gemb_ptr.dtype.element_ty), mask=m)


def _blocks(F: int, D: int) -> tuple[int, int]:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(F)), max(16, triton.next_power_of_2(D))


def _num_pairs(F: int, self_interaction: bool) -> int:
    return F * (F + 1) // 2 if self_interaction else F * (F - 1) // 2


def dot_interaction_fwd(emb, self_interaction: bool = False, out=None, wrap=_identity):
    """emb [B, F, D] -> [B, P]."""
    B, F, D = emb.shape
    P = _num_pairs(F, self_interaction)
    if out is None:
        out = emb.new_empty(B, P)
    if B == 0 or P == 0:
        return out
    if D == 0:
        return out.zero_()
    block_f, block_d = _blocks(F, D)
    wrap(_dot_interaction_fwd_kernel)[(B,)](
        emb, out, F, D, P, *emb.stride(), SELF=self_interaction,
        IEEE=emb.dtype == torch.float32, BLOCK_F=block_f, BLOCK_D=block_d, num_warps=4,
    )
    return out


def dot_interaction_bwd(grad_out, emb, self_interaction: bool = False, out=None, wrap=_identity):
    """grad_out [B, P], emb [B, F, D] -> grad_emb [B, F, D]."""
    B, F, D = emb.shape
    P = _num_pairs(F, self_interaction)
    if out is None:
        out = torch.empty(B, F, D, dtype=emb.dtype, device=emb.device)
    if B == 0 or D == 0:
        return out
    if P == 0:
        return out.zero_()
    block_f, block_d = _blocks(F, D)
    wrap(_dot_interaction_bwd_kernel)[(B,)](
        grad_out.contiguous(), emb, out, F, D, P, *emb.stride(), SELF=self_interaction,
        IEEE=emb.dtype == torch.float32, BLOCK_F=block_f, BLOCK_D=block_d, num_warps=4,
    )
    return out
