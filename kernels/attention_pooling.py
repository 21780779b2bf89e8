# SPDX-License-Identifier: Apache-2.0
"""Target attention pooling over variable-length sequences in Triton.

Per sample b with keys K_b = keys[offsets[b]:offsets[b+1]]:
``p = softmax(K_b q_b / sqrt(D))``, ``out_b = p @ K_b``; an empty sequence gives zeros.
Forward: online softmax in one pass over the keys, then a second pass that normalises the
stored scores into ``probs [L_total]`` (kept for the backward). Backward, with g = grad_out_b:
``ds_j = p_j (g.k_j - g.out_b)``, ``grad_k_j = p_j g + ds_j q / sqrt(D)``,
``grad_q = sum_j ds_j k_j / sqrt(D)``. Every key belongs to one sample: no atomics.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def _identity(kernel):
    return kernel


@triton.jit
def _attention_pooling_fwd_kernel(
    q_ptr,  # [B, D] contiguous
    k_ptr,  # [L_total, D] contiguous
    ofs_ptr,  # [B+1]
    out_ptr,  # [B, D]
    p_ptr,  # [L_total] probs (fp32 scratch for the scores first)
    D,
    scale,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per sample; keys in tiles of BLOCK_L; fp32 online softmax.
    b = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    start = tl.load(ofs_ptr + b).to(tl.int64)
    end = tl.load(ofs_ptr + b + 1).to(tl.int64)
    q = tl.load(q_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32) * scale
    m_i = tl.full((), -float("inf"), tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s in range(start, end, BLOCK_L):
        j = s + tl.arange(0, BLOCK_L)
        jm = j < end
        kt = tl.load(k_ptr + j[:, None] * D + d[None, :], mask=jm[:, None] & dm[None, :],
                     other=0.0).to(tl.float32)
        sc = tl.sum(kt * q[None, :], axis=1)
        sc = tl.where(jm, sc, -float("inf"))
        tl.store(p_ptr + j, sc, mask=jm)
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(sc - m_new)
        l_i = l_i * alpha + tl.sum(e, axis=0)
        acc = acc * alpha + tl.sum(e[:, None] * kt, axis=0)
        m_i = m_new
    # l_i >= 1 for a non-empty sequence (its max contributes exp(0)); 0 marks an empty one.
    inv = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1.0), 0.0)
    tl.store(out_ptr + b * D + d, (acc * inv).to(out_ptr.dtype.element_ty), mask=dm)
    for s in range(start, end, BLOCK_L):
        j = s + tl.arange(0, BLOCK_L)
        jm = j < end
        sc = tl.load(p_ptr + j, mask=jm, other=0.0)
        tl.store(p_ptr + j, tl.exp(sc - m_i) * inv, mask=jm)


@triton.jit
def _attention_pooling_bwd_kernel(
    g_ptr,  # [B, D] grad_out contiguous
    q_ptr,  # [B, D]
    k_ptr,  # [L_total, D]
    ofs_ptr,  # [B+1]
    p_ptr,  # [L_total] probs
    gq_ptr,  # [B, D]
    gk_ptr,  # [L_total, D]
    D,
    scale,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per sample; pass 1: g.out = sum_j p_j g.k_j; pass 2: the gradients.
    b = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    start = tl.load(ofs_ptr + b).to(tl.int64)
    end = tl.load(ofs_ptr + b + 1).to(tl.int64)
    g = tl.load(g_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32)
    go = tl.full((), 0.0, tl.float32)
    for s in range(start, end, BLOCK_L):
        j = s + tl.arange(0, BLOCK_L)
        jm = j < end
        kt = tl.load(k_ptr + j[:, None] * D + d[None, :], mask=jm[:, None] & dm[None, :],
                     other=0.0).to(tl.float32)
        p = tl.load(p_ptr + j, mask=jm, other=0.0).to(tl.float32)
        go += tl.sum(p * tl.sum(kt * g[None, :], axis=1), axis=0)
    gq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s in range(start, end, BLOCK_L):
        j = s + tl.arange(0, BLOCK_L)
        jm = j < end
        m2 = jm[:, None] & dm[None, :]
        kt = tl.load(k_ptr + j[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + j, mask=jm, other=0.0).to(tl.float32)
        ds = p * (tl.sum(kt * g[None, :], axis=1) - go) * scale  # [BLOCK_L]
        gk = p[:, None] * g[None, :] + ds[:, None] * q[None, :]
        tl.store(gk_ptr + j[:, None] * D + d[None, :], gk.to(gk_ptr.dtype.element_ty), mask=m2)
        gq += tl.sum(ds[:, None] * kt, axis=0)
    tl.store(gq_ptr + b * D + d, gq.to(gq_ptr.dtype.element_ty), mask=dm)


def _blocks(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(max(D, 1))
    return max(1, min(64, 4096 // block_d)), block_d


def attention_pooling_fwd(query, keys, offsets, wrap=_identity):
    """query [B, D], keys [L_total, D], offsets [B+1] -> (out [B, D], probs [L_total] fp32)."""
    B, D = query.shape
    query = query.contiguous()
    keys = keys.contiguous()
    out = torch.empty_like(query)
    probs = torch.empty(keys.shape[0], dtype=torch.float32, device=keys.device)
    if B == 0:
        return out, probs
    block_l, block_d = _blocks(D)
    wrap(_attention_pooling_fwd_kernel)[(B,)](
        query, keys, offsets, out, probs, D, 1.0 / math.sqrt(D) if D else 1.0,
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4,
    )
    return out, probs


def attention_pooling_bwd(grad_out, query, keys, offsets, probs, wrap=_identity):
    """-> (grad_query [B, D], grad_keys [L_total, D])."""
    B, D = query.shape
    query = query.contiguous()
    keys = keys.contiguous()
    gq = torch.empty_like(query)
    gk = torch.zeros_like(keys)  # keys outside every sequence get zero gradient
    if B == 0:
        return gq, gk
    block_l, block_d = _blocks(D)
    wrap(_attention_pooling_bwd_kernel)[(B,)](
        grad_out.contiguous(), query, keys, offsets, probs.contiguous(), gq, gk, D,
        1.0 / math.sqrt(D) if D else 1.0, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4,
    )
    return gq, gk
