# SPDX-License-Identifier: Apache-2.0
"""Multi-table pooled embedding lookup (FBGEMM TBE layout) in Triton: forward, the backward that
returns only the touched rows, and the backward fused with SGD / row-wise Adagrad.

Tables share one buffer ``weights [N_total, D]``; table t owns rows
``table_offsets[t]:table_offsets[t+1]`` and is addressed by that integer row offset (no
pointer-of-pointers, so the kernels also run under ``TRITON_INTERPRET=1``).

Determinism: the backward sorts the global row ids with a *stable* sort, so every unique row's
contributions are summed by one program in order of occurrence; no atomics on gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_NO_ERROR = 2**62  # "no bad index seen" marker for the error slot (> any position)


def _identity(kernel):
    return kernel


@triton.jit
def _embedding_bag_fwd_kernel(
    w_ptr,  # [N_total, D]
    tofs_ptr,  # [T+1] row starts
    idx_ptr,  # [nnz] ids within their table
    ofs_ptr,  # [T*B+1]
    psw_ptr,  # [nnz] or dummy
    out_ptr,  # [B, T*D]
    err_ptr,  # [1] int64: lowest position of an out-of-range id
    nnz,
    B,
    T,
    D,
    HAS_PSW: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (table, BLOCK_B samples, D-block); the L loop runs to the longest bag in
    # the tile with shorter bags masked. Accumulates in fp32.
    pid_b = tl.program_id(0)
    t = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    bmask = b < B
    dmask = d < D
    bag = t.to(tl.int64) * B + b  # [BLOCK_B]
    start = tl.load(ofs_ptr + bag, mask=bmask, other=0).to(tl.int64)
    end = tl.load(ofs_ptr + bag + 1, mask=bmask, other=0).to(tl.int64)
    length = end - start  # [BLOCK_B]
    row0 = tl.load(tofs_ptr + t).to(tl.int64)
    rows = tl.load(tofs_ptr + t + 1).to(tl.int64) - row0
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    bad_pos = tl.full((BLOCK_B,), 2**62, dtype=tl.int64)
    max_len = tl.max(length, axis=0)
    for j in range(0, max_len):
        k = start + j  # [BLOCK_B]
        # k outside [0, nnz) only with malformed offsets (the host check reports those).
        live = (j < length) & (k >= 0) & (k < nnz)
        r = tl.load(idx_ptr + k, mask=live, other=0).to(tl.int64)
        ok = live & (r >= 0) & (r < rows)
        # An out-of-range id is never read: it is masked and its position reported.
        bad_pos = tl.minimum(bad_pos, tl.where(live & ~ok, k, 2**62))
        src = w_ptr + (row0 + r)[:, None] * D + d[None, :]
        v = tl.load(src, mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if HAS_PSW:
            c = tl.load(psw_ptr + k, mask=ok, other=0.0).to(tl.float32)
            v = v * c[:, None]
        acc += v
    if MEAN:
        acc = acc / tl.maximum(length, 1).to(tl.float32)[:, None]
    dst = out_ptr + b.to(tl.int64)[:, None] * (T * D) + t * D + d[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=bmask[:, None] & dmask[None, :])
    first_bad = tl.min(bad_pos, axis=0)
    if first_bad < 2**62:
        tl.atomic_min(err_ptr, first_bad)


@triton.jit
def _embedding_bag_bwd_kernel(
    g_ptr,  # [B, T*D] grad_out
    perm_ptr,  # [nnz] positions sorted by global row (stable)
    seg_ptr,  # [U+1] segment starts into perm
    bag_ptr,  # [nnz] bag id (t*B+b) of every position
    ofs_ptr,  # [T*B+1]
    psw_ptr,  # [nnz] or dummy
    urow_ptr,  # [U] unique global rows (for the fused update)
    w_ptr,  # [N_total, D] weights (updated in place when UPDATE)
    state_ptr,  # [N_total] float32 row-wise Adagrad state
    rg_ptr,  # [U, D] row grads out (when not UPDATE)
    U,
    B,
    T,
    D,
    lr,
    eps,
    HAS_PSW: tl.constexpr,
    MEAN: tl.constexpr,
    UPDATE: tl.constexpr,  # 0 = write row grads, 1 = SGD, 2 = row-wise Adagrad
    BLOCK_U: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per BLOCK_U unique rows, all of D (row-wise Adagrad needs the whole row's
    # mean(g*g)). Each row's contributions are summed in occurrence order, so the result is
    # deterministic; each row belongs to one program, so the in-place update needs no atomics.
    u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)  # [BLOCK_U]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    umask = u < U
    dmask = d < D
    s0 = tl.load(seg_ptr + u, mask=umask, other=0).to(tl.int64)
    s1 = tl.load(seg_ptr + u + 1, mask=umask, other=0).to(tl.int64)
    cnt = s1 - s0
    acc = tl.zeros((BLOCK_U, BLOCK_D), dtype=tl.float32)
    max_cnt = tl.max(cnt, axis=0)
    for j in range(0, max_cnt):
        live = j < cnt
        k = tl.load(perm_ptr + s0 + j, mask=live, other=0).to(tl.int64)
        bag = tl.load(bag_ptr + k, mask=live, other=0).to(tl.int64)
        t = bag // B
        b = bag - t * B
        c = tl.where(live, 1.0, 0.0)
        if HAS_PSW:
            c = c * tl.load(psw_ptr + k, mask=live, other=0.0).to(tl.float32)
        if MEAN:
            o0 = tl.load(ofs_ptr + bag, mask=live, other=0)
            o1 = tl.load(ofs_ptr + bag + 1, mask=live, other=1)
            c = c / tl.maximum(o1 - o0, 1).to(tl.float32)
        src = g_ptr + b[:, None] * (T * D) + t[:, None] * D + d[None, :]
        gv = tl.load(src, mask=live[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += gv * c[:, None]
    m2 = umask[:, None] & dmask[None, :]
    if UPDATE == 0:
        dst = rg_ptr + u.to(tl.int64)[:, None] * D + d[None, :]
        tl.store(dst, acc.to(rg_ptr.dtype.element_ty), mask=m2)
    else:
        row = tl.load(urow_ptr + u, mask=umask, other=0).to(tl.int64)
        wp = w_ptr + row[:, None] * D + d[None, :]
        w = tl.load(wp, mask=m2, other=0.0).to(tl.float32)
        if UPDATE == 1:
            w = w - lr * acc
        else:
            st = tl.load(state_ptr + row, mask=umask, other=0.0)
            st = st + tl.sum(acc * acc, axis=1) / D
            tl.store(state_ptr + row, st, mask=umask)
            step = lr / (tl.sqrt(st) + eps)
            w = w - step[:, None] * acc
        tl.store(wp, w.to(w_ptr.dtype.element_ty), mask=m2)


def _fwd_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps): about 2K elements per program."""
    block_d = min(triton.next_power_of_2(max(D, 1)), 256)
    block_b = max(1, min(64, 2048 // block_d))
    return block_b, block_d, 4


def _raise_bad_index(pos: int, table_offsets, indices, offsets) -> None:
    T = table_offsets.numel() - 1
    B = (offsets.numel() - 1) // T
    o = offsets.long().cpu()
    bag = int(torch.searchsorted(o, torch.tensor([pos]), right=True)[0]) - 1
    tofs = table_offsets.long().cpu()
    t = bag // B if B > 0 else 0
    rows = int(tofs[t + 1] - tofs[t])
    value = int(indices[pos])
    raise IndexError(
        f"embedding_bag: indices[{pos}]={value} is out of range for table {t} "
        f"({rows} rows, sample {bag % max(B, 1)})"
    )


def embedding_bag_fwd(
    weights,  # [N_total, D]
    table_offsets,  # [T+1]
    indices,  # [nnz]
    offsets,  # [T*B+1]
    per_sample_weights=None,  # [nnz]
    pooling: int = 0,  # 0 = sum, 1 = mean
    out=None,  # [B, T*D]
    check: bool = True,
    wrap=_identity,
):
    """Pooled lookup -> [B, T*D]. ``check`` reads back the error slot (one device sync) and
    raises IndexError for an id outside its table; without it such ids read as zeros."""
    T = table_offsets.numel() - 1
    B = (offsets.numel() - 1) // T
    D = weights.shape[1]
    weights = weights.contiguous()
    if out is None:
        out = weights.new_empty(B, T * D)
    err = torch.full((1,), _NO_ERROR, dtype=torch.int64, device=weights.device)
    if B == 0 or D == 0:
        return out
    psw = per_sample_weights.contiguous() if per_sample_weights is not None else weights
    block_b, block_d, warps = _fwd_config(D)
    grid = (triton.cdiv(B, block_b), T, triton.cdiv(D, block_d))
    wrap(_embedding_bag_fwd_kernel)[grid](
        weights, table_offsets, indices.contiguous(), offsets, psw, out, err, indices.numel(),
        B, T, D,
        HAS_PSW=per_sample_weights is not None, MEAN=pooling == 1,
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps,
    )
    if check:
        # One read-back for the id check and the offsets' structure.
        o = offsets
        flags = torch.stack([
            err[0], (o[0] != 0).long(), (o[-1] != indices.numel()).long(),
            (o[1:] < o[:-1]).any().long(),
        ]).tolist()
        if flags[1] or flags[2] or flags[3]:
            raise ValueError(
                f"embedding_bag: offsets must start at 0, be non-decreasing and end at "
                f"len(indices)={indices.numel()}; got offsets[0]={int(o[0])}, "
                f"offsets[-1]={int(o[-1])}"
            )
        if flags[0] != _NO_ERROR:
            _raise_bad_index(flags[0], table_offsets, indices, offsets)
    return out


def _sorted_segments(table_offsets, indices, offsets, N: int):
    """Global row of every index, sorted stably: (perm [nnz], seg [U+1], uniq [U] int64,
    bag [nnz]). Raises IndexError for an id outside its table (before any update)."""
    T = table_offsets.numel() - 1
    nnz = indices.numel()
    dev = indices.device
    lengths = offsets[1:].long() - offsets[:-1].long()  # [T*B]
    bag = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=dev), lengths, output_size=nnz
    )  # [nnz]
    B = lengths.numel() // T
    table = bag // max(B, 1)
    tofs = table_offsets.long()
    idx = indices.long()
    rows_t = (tofs[1:] - tofs[:-1])[table]  # [nnz]
    bad = (idx < 0) | (idx >= rows_t)
    if nnz and bool(bad.any()):
        _raise_bad_index(int(bad.nonzero()[0, 0]), table_offsets, indices, offsets)
    grow = tofs[table] + idx  # [nnz]
    # int32 keys halve the radix-sort passes when every row id fits.
    keys = grow.int() if N < 2**31 else grow
    sorted_keys, perm = torch.sort(keys, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    seg = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=seg[1:])
    return perm, seg, uniq.long(), bag


def _bwd_launch(grad_out, weights, state, table_offsets, indices, offsets, psw, pooling,
                update, lr, eps, wrap):
    T = table_offsets.numel() - 1
    B = (offsets.numel() - 1) // T
    N, D = weights.shape
    perm, seg, uniq, bag = _sorted_segments(table_offsets, indices, offsets, N)
    U = uniq.numel()
    row_grads = weights.new_empty(U, D) if update == 0 else weights.new_empty(0, D)
    if U == 0 or D == 0:
        return uniq, weights.new_zeros(U, D)
    grad_out = grad_out.contiguous()
    block_d = triton.next_power_of_2(D)
    block_u = max(1, min(32, 2048 // block_d))
    psw_arg = psw.contiguous() if psw is not None else grad_out
    state_arg = state if state is not None else weights
    wrap(_embedding_bag_bwd_kernel)[(triton.cdiv(U, block_u),)](
        grad_out, perm, seg, bag, offsets, psw_arg, uniq, weights, state_arg, row_grads,
        U, B, T, D, float(lr), float(eps),
        HAS_PSW=psw is not None, MEAN=pooling == 1, UPDATE=update,
        BLOCK_U=block_u, BLOCK_D=block_d, num_warps=4,
    )
    return uniq, row_grads


def embedding_bag_bwd(grad_out, weights, table_offsets, indices, offsets,
                      per_sample_weights=None, pooling: int = 0, wrap=_identity):
    """-> (unique_rows [U] int64 global ids, ascending; row_grads [U, D]). Deterministic."""
    return _bwd_launch(grad_out, weights, None, table_offsets, indices, offsets,
                       per_sample_weights, pooling, 0, 0.0, 0.0, wrap)


def embedding_bag_bwd_update(grad_out, weights, state, table_offsets, indices, offsets,
                             per_sample_weights=None, pooling: int = 0, optimizer: int = 0,
                             lr: float = 0.01, eps: float = 1e-8, wrap=_identity):
    """Backward fused with the update of the touched rows, in place: optimizer 0 = SGD
    (``w -= lr*g``), 1 = row-wise Adagrad (``state += mean(g*g); w -= lr*g/(sqrt(state)+eps)``).
    ``weights`` must be contiguous. Deterministic."""
    if optimizer not in (0, 1):
        raise ValueError(f"embedding_bag_bwd_update: optimizer must be 0 or 1, got {optimizer}")
    if not weights.is_contiguous():
        raise ValueError("embedding_bag_bwd_update: weights must be contiguous (updated in place)")
    _bwd_launch(grad_out, weights, state if optimizer == 1 else None, table_offsets, indices,
                offsets, per_sample_weights, pooling, 1 + optimizer, lr, eps, wrap)
