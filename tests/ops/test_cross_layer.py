# SPDX-License-Identifier: Apache-2.0
"""cross_layer: the C++ CPU kernels (BLAS products + fused epilogues) vs the reference."""
from __future__ import annotations

import math

import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R
from adrec_fast.nn import CrossNet

from ..conftest import assert_close_verbose

SHAPES = [(1, 1), (1, 432), (5, 17), (64, 432), (33, 16)]  # (B, K)


def _inputs(B, K, dtype):
    """x0, x [B, K]; weight [K, K] scaled like CrossNet's init; bias [K]."""
    x0 = torch.randn(B, K, dtype=dtype)
    x = torch.randn(B, K, dtype=dtype)
    w = torch.randn(K, K, dtype=dtype) / math.sqrt(K)
    b = torch.randn(K, dtype=dtype)
    return x0, x, w, b


def _truth_and_grads(args, g):
    a = [t.detach().double().requires_grad_(True) for t in args]
    out = R.cross_layer(*a)
    out.backward(g.double())
    return out.detach(), [t.grad for t in a]


@pytest.mark.parametrize("api", ["functional", "ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(api, dtype, shape):
    B, K = shape
    args = _inputs(B, K, dtype)
    g = torch.randn(B, K, dtype=dtype)
    if api == "functional":
        a = [t.clone().requires_grad_(True) for t in args]
        out = F.cross_layer(*a)
        out.backward(g)
        grads = [t.grad for t in a]
    else:
        out, xw = torch.ops.adrec.cross_layer(*args)
        x0, x, w, b = args
        assert_close_verbose(xw, x @ w.t() + b)
        grads = list(torch.ops.adrec.cross_layer_bwd(g, x0, x, w, xw))
    truth, truth_grads = _truth_and_grads(args, g)
    assert out.shape == (B, K) and out.dtype == dtype
    assert_close_verbose(out, truth.to(dtype))
    for got, want in zip(grads, truth_grads):
        assert_close_verbose(got, want.to(dtype))


def test_non_contiguous():
    B, K = 6, 9
    x0 = torch.randn(K, B, dtype=torch.float64).t()
    x = torch.randn(B, 2 * K, dtype=torch.float64)[:, ::2]
    w = torch.randn(K, K, dtype=torch.float64).t()
    b = torch.randn(2 * K, dtype=torch.float64)[::2]
    assert not (x0.is_contiguous() or x.is_contiguous() or b.is_contiguous())
    assert_close_verbose(F.cross_layer(x0, x, w, b), R.cross_layer(x0, x, w, b))
    g = torch.randn(K, B, dtype=torch.float64).t()
    _, xw = torch.ops.adrec.cross_layer(x0, x, w, b)
    _, want = _truth_and_grads((x0, x, w, b), g)
    got = torch.ops.adrec.cross_layer_bwd(g, x0, x, w, xw.t().contiguous().t())
    for a, e in zip(got, want):
        assert_close_verbose(a, e)


def test_empty_batch():
    args = [t.requires_grad_(True) for t in _inputs(0, 17, torch.float32)]
    out = F.cross_layer(*args)
    assert out.shape == (0, 17)
    out.sum().backward()
    assert_close_verbose(args[2].grad, torch.zeros(17, 17))
    assert_close_verbose(args[3].grad, torch.zeros(17))


def test_literal_example():
    # K=2: x @ W.T + b = [1*1 + 2*0, 1*1 + 2*1] + [0.5, -1] = [1.5, 2]; out = x0 * that + x.
    x0 = torch.tensor([[2.0, 3.0]])
    x = torch.tensor([[1.0, 2.0]])
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([0.5, -1.0])
    assert_close_verbose(F.cross_layer(x0, x, w, b), torch.tensor([[4.0, 8.0]]))


def test_gradcheck():
    args = [t.requires_grad_(True) for t in _inputs(3, 5, torch.float64)]
    assert torch.autograd.gradcheck(F.cross_layer, tuple(args))


def test_crossnet_module_matches_reference():
    torch.manual_seed(0)
    net = CrossNet(24, num_layers=3).double()
    x0 = torch.randn(8, 24, dtype=torch.float64)
    x = x0
    for w, b in zip(net.weights, net.biases):
        x = R.cross_layer(x0, x, w, b)
    assert_close_verbose(net(x0), x)


def _net(L, B, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, K, generator=g, dtype=dtype, requires_grad=True)
    ws = [(torch.randn(K, K, generator=g, dtype=dtype) / math.sqrt(max(K, 1))).requires_grad_()
          for _ in range(L)]
    bs = [torch.randn(K, generator=g, dtype=dtype, requires_grad=True) for _ in range(L)]
    return x0, ws, bs, torch.randn(B, K, generator=g, dtype=dtype)


@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (300, 33), (64, 432), (0, 4), (5, 0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_net_matches_the_loop_of_layers(L, shape, dtype):
    """cross_net's values and every gradient equal the reference loop of cross_layer (its one
    backward forms x's gradient in place and sums x0's as it goes)."""
    x0, ws, bs, g = _net(L, *shape, dtype)
    out = F.cross_net(x0, ws, bs)
    got = torch.autograd.grad(out, [x0, *ws, *bs], g)
    x = x0
    for w, b in zip(ws, bs):
        x = R.cross_layer(x0, x, w, b)
    want = torch.autograd.grad(x, [x0, *ws, *bs], g)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(out, x, **tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_cross_net_gradcheck_and_no_layers():
    x0, ws, bs, _ = _net(3, 4, 6, torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda x, *p: F.cross_net(x, p[:3], p[3:]), (x0, *ws, *bs))
    assert F.cross_net(x0, [], []) is x0
    with pytest.raises(ValueError, match="cross_net: 2 weights but 1 biases"):
        F.cross_net(x0, ws[:2], bs[:1])


def test_cross_net_reference_backend(monkeypatch):
    x0, ws, bs, g = _net(2, 9, 7, torch.float64, seed=2)
    fused = torch.autograd.grad(F.cross_net(x0, ws, bs), [x0, *ws, *bs], g)
    monkeypatch.setenv("ADREC_BACKEND", "reference")
    ref = torch.autograd.grad(F.cross_net(x0, ws, bs), [x0, *ws, *bs], g)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_layer_backward_in_place_matches_reference(accumulate, last, dtype):
    """adrec::cross_layer_bwd_ against reference.cross_layer_bwd_: the buffers it writes (g, gx0)
    and what it returns, for each of its modes; its other inputs are left as they were."""
    gen = torch.Generator().manual_seed(3)
    B, K = 70, 24  # more rows than one block of the epilogue
    x0, x, xw, g, gx0 = (torch.randn(B, K, generator=gen).to(dtype) for _ in range(5))
    w = (torch.randn(K, K, generator=gen) / K**0.5).to(dtype)
    keep = [t.clone() for t in (x0, x, xw, w)]
    g1, gx01, g2, gx02 = g.clone(), gx0.clone(), g.clone(), gx0.clone()
    got = torch.ops.adrec.cross_layer_bwd_(g1, gx01, x0, x, w, xw, accumulate, last)
    want = R.cross_layer_bwd_(g2, gx02, x0, x, w, xw, accumulate, last)
    tol = {"float64": {}, "float32": {"rtol": 1e-5, "atol": 1e-5},
           "bfloat16": {"rtol": 2e-2, "atol": 1e-1}}[str(dtype).split(".")[1]]
    for a, b in [(g1, g2), (gx01, gx02), *zip(got, want)]:
        torch.testing.assert_close(a, b, **tol)
    if last:
        assert torch.equal(g1, g)  # the first layer's x gradient goes into gx0 instead
    for a, b in zip((x0, x, xw, w), keep):
        assert torch.equal(a, b)


def test_layer_backward_in_place_bad_input():
    x0, x, xw, g, gx0 = (torch.randn(8, 5) for _ in range(5))
    w = torch.randn(5, 5)
    op = torch.ops.adrec.cross_layer_bwd_
    with pytest.raises(ValueError, match="cross_layer_bwd_: g and gx0 must be contiguous"):
        op(torch.randn(5, 8).t(), gx0, x0, x, w, xw, False, False)
    with pytest.raises(ValueError, match="cross_layer_bwd_: g and gx0 must be different buffers"):
        op(g, g, x0, x, w, xw, False, False)
    with pytest.raises(ValueError, match=r"cross_layer_bwd_: gx0 has shape \[8, 4\]"):
        op(g, torch.randn(8, 4), x0, x, w, xw, False, False)
    with pytest.raises(TypeError, match="cross_layer_bwd_"):
        op(g.double(), gx0, x0, x, w, xw, False, False)


def test_bad_dtype_names_argument():
    x0, x, w, b = _inputs(2, 3, torch.float32)
    with pytest.raises(TypeError, match="weight"):
        torch.ops.adrec.cross_layer(x0, x, w.double(), b)
    with pytest.raises(TypeError, match="bias"):
        torch.ops.adrec.cross_layer(x0, x, w, b.double())
    with pytest.raises(TypeError, match="x"):
        torch.ops.adrec.cross_layer(x0.long(), x.long(), w.long(), b.long())


def test_bad_shape():
    x0, x, w, b = _inputs(2, 3, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.adrec.cross_layer(x0, x, torch.ones(3, 4), b)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.adrec.cross_layer(x0, x, w, torch.ones(4))
    with pytest.raises(ValueError, match="x0"):
        torch.ops.adrec.cross_layer(torch.ones(3, 3), x, w, b)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.adrec.cross_layer_bwd(torch.ones(1, 3), x0, x, w, x)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "aten"])
@pytest.mark.parametrize("shape", [(1, 3), (130, 17), (257, 64), (96, 48)], ids=str)
def test_float32_matrix_paths(onednn, shape):
    """fp32 products go to oneDNN when torch allows it, else to ATen (and the residual product
    of the backward to BLAS at widths that are multiples of 16: (257, 64), (96, 48)); every
    path matches the float64 reference, including row counts that end inside a 64-row epilogue
    block, and strided inputs (a transposed weight, a sliced x)."""
    B, K = shape
    x0, _, _, b = _inputs(B, K, torch.float32)
    x = torch.randn(B, 2 * K)[:, ::2]
    w = (torch.randn(K, K) / math.sqrt(K)).t()
    g = torch.randn(B, K)
    truth, truth_grads = _truth_and_grads((x0, x, w, b), g)
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn  # (flags() also sets allow_tf32, which warns on CPU)
    try:
        a = [t.clone().requires_grad_(True) for t in (x0, x, w, b)]
        out = F.cross_layer(*a)
        out.backward(g)
        _, xw = torch.ops.adrec.cross_layer(x0, x, w, b)
        direct = torch.ops.adrec.cross_layer_bwd(g, x0, x, w, xw)
    finally:
        torch.backends.mkldnn.enabled = before
    assert_close_verbose(out, truth.float())
    tol = dict(rtol=1e-5, atol=2e-6 * B)  # g_w and g_b are fp32 sums over the B rows
    for got, d, want in zip([t.grad for t in a], direct, truth_grads):
        assert_close_verbose(got, want.float(), **tol)
        assert_close_verbose(d, want.float(), **tol)
