# SPDX-License-Identifier: Apache-2.0
"""attention_pooling: the C++ CPU kernels vs the reference (forward, probs, backward)."""
from __future__ import annotations

import math

import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R

from ..conftest import assert_close_verbose


def _seqs(B, D, max_len, dtype, index_dtype=torch.int64, min_len=0):
    """query [B, D], keys [L_total, D], offsets [B+1] with random lengths (empty ones included)."""
    lengths = torch.randint(min_len, max_len + 1, (B,))
    if B > 1 and min_len == 0:
        lengths[0] = 0  # always one empty sequence
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(index_dtype)
    q = torch.randn(B, D, dtype=dtype)
    k = torch.randn(int(lengths.sum()), D, dtype=dtype)
    return q, k, offsets


def _truth_and_grads(q, k, offsets, g):
    q64 = q.detach().double().requires_grad_(True)
    k64 = k.detach().double().requires_grad_(True)
    out = R.attention_pooling(q64, k64, offsets)
    if not out.requires_grad:  # every sequence empty: the reference's zeros have no graph
        return out, torch.zeros_like(q64), torch.zeros_like(k64)
    out.backward(g.double())
    return out.detach(), q64.grad, k64.grad


def _probs(q, k, offsets):
    o = offsets.tolist()
    parts = [
        torch.softmax(k[o[b] : o[b + 1]] @ q[b] / math.sqrt(q.size(1)), dim=0)
        for b in range(q.size(0))
    ]
    return torch.cat(parts) if parts else k.new_zeros(0)


SHAPES = [(1, 16, 1), (1, 17, 50), (5, 1, 4), (16, 16, 50), (9, 33, 7), (4, 8, 0)]  # (B, D, max L)


def _per_sample(q, k, offsets):
    """The definition, one sample at a time (the reference computes it for all samples at once)."""
    B, D = q.shape
    o = offsets.tolist()
    rows = []
    for b in range(B):
        kb = k[o[b] : o[b + 1]]  # [L_b, D]
        if kb.size(0) == 0:
            rows.append(q.new_zeros(D) + 0 * k.sum())  # zeros, still in the graph of k
            continue
        rows.append(torch.softmax(kb @ q[b] / math.sqrt(D), dim=0) @ kb)
    return torch.stack(rows) if rows else q.new_zeros(0, D)


@pytest.mark.parametrize("shape", SHAPES + [(7, 5, 1), (3, 4, 200)], ids=str)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_reference_matches_per_sample_definition(shape, scale):
    """The segment-softmax reference against a per-sample loop, forward and gradients in float64
    (scale 30: scores in the hundreds, where an unshifted exp would overflow)."""
    B, D, max_len = shape
    q, k, offsets = _seqs(B, D, max_len, torch.float64)
    q, k = q * scale, k.clone()
    g = torch.randn(B, D, dtype=torch.float64)
    outs, grads = [], []
    for fn in (R.attention_pooling, _per_sample):
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        out = fn(qq, kk, offsets)
        (out * g).sum().backward()
        outs.append(out.detach())
        grads.append((qq.grad, kk.grad))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1])
    for a, b, t in zip(grads[0], grads[1], (q, k)):  # no gradient at all = zeros (empty input)
        torch.testing.assert_close(torch.zeros_like(t) if a is None else a,
                                   torch.zeros_like(t) if b is None else b)


@pytest.mark.parametrize("api", ["functional", "ops"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(api, index_dtype, dtype, shape):
    B, D, max_len = shape
    q, k, offsets = _seqs(B, D, max_len, dtype, index_dtype)
    g = torch.randn(B, D, dtype=dtype)
    if api == "functional":
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        out = F.attention_pooling(qq, kk, offsets)
        out.backward(g)
        gq, gk = qq.grad, kk.grad
    else:
        out, probs = torch.ops.adrec.attention_pooling(q, k, offsets)
        assert_close_verbose(probs, _probs(q.double(), k.double(), offsets).to(dtype))
        gq, gk = torch.ops.adrec.attention_pooling_bwd(g, q, k, offsets, probs)
    truth, tq, tk = _truth_and_grads(q, k, offsets, g)
    assert out.shape == (B, D) and out.dtype == dtype
    assert_close_verbose(out, truth.to(dtype))
    assert_close_verbose(gq, tq.to(dtype))
    assert_close_verbose(gk, tk.to(dtype))


def test_empty_sequences_give_zeros():
    q = torch.randn(3, 4, requires_grad=True)
    k = torch.randn(2, 4, requires_grad=True)
    offsets = torch.tensor([0, 0, 2, 2])  # samples 0 and 2 have no history
    out = F.attention_pooling(q, k, offsets)
    assert_close_verbose(out[0], torch.zeros(4))
    assert_close_verbose(out[2], torch.zeros(4))
    out.sum().backward()
    assert_close_verbose(q.grad[0], torch.zeros(4))
    assert_close_verbose(q.grad[2], torch.zeros(4))


def test_empty_batch():
    q = torch.randn(0, 16, requires_grad=True)
    k = torch.randn(0, 16, requires_grad=True)
    out = F.attention_pooling(q, k, torch.zeros(1, dtype=torch.long))
    assert out.shape == (0, 16)
    out.sum().backward()
    assert q.grad.shape == (0, 16) and k.grad.shape == (0, 16)


def test_non_contiguous():
    q = torch.randn(6, 3, dtype=torch.float64).t()  # [3, 6]
    k = torch.randn(10, 12, dtype=torch.float64)[:, ::2]  # [10, 6]
    offsets = torch.tensor([0, 4, 4, 10])
    assert not (q.is_contiguous() or k.is_contiguous())
    assert_close_verbose(F.attention_pooling(q, k, offsets), R.attention_pooling(q, k, offsets))


def test_literal_example():
    # D=4 (sqrt(D)=2). Sample 0: keys k0 = [2,0,0,0], k1 = [0,0,0,0], q = [ln 3, 0, 0, 0]:
    # scores [ln 3, 0] -> softmax [3/4, 1/4] -> out = 3/4 * k0 = [1.5, 0, 0, 0].
    # Sample 1: one key -> weight 1 -> out = that key.
    q = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    k = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 3.0, 0.5]])
    offsets = torch.tensor([0, 2, 3])
    out, probs = torch.ops.adrec.attention_pooling(q, k, offsets)
    assert_close_verbose(out, torch.tensor([[1.5, 0.0, 0.0, 0.0], [1.0, -2.0, 3.0, 0.5]]))
    assert_close_verbose(probs, torch.tensor([0.75, 0.25, 1.0]))


def test_gradcheck():
    q, k, offsets = _seqs(4, 3, 3, torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: F.attention_pooling(a, b, offsets), (q, k))


def test_large_scores_are_stable():
    q = torch.full((1, 4), 1e3, dtype=torch.float32)
    k = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    out = F.attention_pooling(q, k, torch.tensor([0, 2]))
    assert_close_verbose(out, torch.tensor([[1.0, 1.0, 1.0, 1.0]]))


def test_bad_dtype_names_argument():
    q, k, offsets = _seqs(3, 4, 3, torch.float32, min_len=1)
    with pytest.raises(TypeError, match="offsets"):
        torch.ops.adrec.attention_pooling(q, k, offsets.float())
    with pytest.raises(TypeError, match="keys"):
        torch.ops.adrec.attention_pooling(q, k.double(), offsets)
    with pytest.raises(TypeError, match="query"):
        torch.ops.adrec.attention_pooling(q.long(), k.long(), offsets)


def test_bad_shape():
    q, k, offsets = _seqs(3, 4, 3, torch.float32, min_len=1)
    with pytest.raises(ValueError, match="D"):
        torch.ops.adrec.attention_pooling(q, k[:, :3], offsets)
    with pytest.raises(ValueError, match="query"):
        torch.ops.adrec.attention_pooling(q[0], k, offsets)


@pytest.mark.parametrize(
    "offsets,msg",
    [
        ([0, 2, 3], "B\\+1"),  # wrong length
        ([1, 2, 3, 6], "offsets\\[0\\]"),  # does not start at 0
        ([0, 3, 2, 6], "non-decreasing"),  # not monotonic
        ([0, 2, 3, 5], "offsets\\[-1\\]"),  # does not end at L_total
        ([0, 2, 3, 7], "offsets\\[-1\\]"),  # past the end
    ],
)
def test_malformed_offsets(offsets, msg):
    q = torch.randn(3, 4)
    k = torch.randn(6, 4)
    with pytest.raises(ValueError, match=msg):
        F.attention_pooling(q, k, torch.tensor(offsets))


def test_probs_output_carries_no_gradient():
    q, k, offsets = _seqs(3, 4, 3, torch.float64)
    out, probs = torch.ops.adrec.attention_pooling(
        q.requires_grad_(True), k.requires_grad_(True), offsets
    )
    assert out.requires_grad and not probs.requires_grad
