# SPDX-License-Identifier: Apache-2.0
"""FM second-order interaction in Triton: out[b] = 0.5 * sum_d((sum_f e)^2 - sum_f e^2).

Forward and backward each read ``emb`` once per pass (the backward twice: sum over fields, then
``grad[b, f] = g[b] * (s[b] - e[b, f])``). Deterministic: no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _identity(kernel):
    return kernel


@triton.jit
def _fm_interaction_fwd_kernel(
    emb_ptr,  # [B, F, D] (strided)
    out_ptr,  # [B, 1]
    B,
    F,
    D,
    s_b,
    s_f,
    s_d,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per BLOCK_B samples, all of D; loop over fields; accumulate in fp32.
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m = (b < B)[:, None] & (d < D)[None, :]
    base = emb_ptr + b.to(tl.int64)[:, None] * s_b + d[None, :] * s_d
    s = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    sq = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for f in range(0, F):
        e = tl.load(base + f * s_f, mask=m, other=0.0).to(tl.float32)
        s += e
        sq += e * e
    r = 0.5 * tl.sum(s * s - sq, axis=1)  # [BLOCK_B]
    tl.store(out_ptr + b, r.to(out_ptr.dtype.element_ty), mask=b < B)


@triton.jit
def _fm_interaction_bwd_kernel(
    g_ptr,  # [B] (grad_out [B, 1], contiguous)
    emb_ptr,  # [B, F, D] (strided)
    gemb_ptr,  # [B, F, D] contiguous
    B,
    F,
    D,
    s_b,
    s_f,
    s_d,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per BLOCK_B samples: pass 1 sums the fields, pass 2 writes g * (s - e).
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    d = tl.arange(0, BLOCK_D)
    m = (b < B)[:, None] & (d < D)[None, :]
    base = emb_ptr + b.to(tl.int64)[:, None] * s_b + d[None, :] * s_d
    s = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for f in range(0, F):
        s += tl.load(base + f * s_f, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b, mask=b < B, other=0.0).to(tl.float32)[:, None]
    obase = gemb_ptr + b.to(tl.int64)[:, None] * (F * D) + d[None, :]
    for f in range(0, F):
        e = tl.load(base + f * s_f, mask=m, other=0.0).to(tl.float32)
        tl.store(obase + f * D, (g * (s - e)).to(gemb_ptr.dtype.element_ty), mask=m)


def _config(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(max(D, 1))
    return max(1, min(64, 2048 // block_d)), block_d


def fm_interaction_fwd(emb, out=None, wrap=_identity):
    """emb [B, F, D] -> [B, 1] (emb's dtype, fp32 accumulation)."""
    B, F, D = emb.shape
    if out is None:
        out = emb.new_empty(B, 1)
    if B == 0:
        return out
    block_b, block_d = _config(D)
    wrap(_fm_interaction_fwd_kernel)[(triton.cdiv(B, block_b),)](
        emb, out, B, F, D, *emb.stride(), BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4
    )
    return out


def fm_interaction_bwd(grad_out, emb, out=None, wrap=_identity):
    """grad_out [B, 1], emb [B, F, D] -> grad_emb [B, F, D]."""
    B, F, D = emb.shape
    if out is None:
        out = torch.empty(B, F, D, dtype=emb.dtype, device=emb.device)
    if B == 0:
        return out
    g = grad_out.reshape(B).contiguous()
    block_b, block_d = _config(D)
    wrap(_fm_interaction_bwd_kernel)[(triton.cdiv(B, block_b),)](
        g, emb, out, B, F, D, *emb.stride(), BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4
    )
    return out
