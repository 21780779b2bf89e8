# SPDX-License-Identifier: Apache-2.0
"""linear: the C++ CPU kernel (small-batch kernel below 32 rows, oneDNN from 32 rows, ATen with K
padded when oneDNN is off) and its backward vs the reference, fp64 truth and hand values."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R

from ..conftest import assert_close_verbose, assert_no_worse_than_torch, rerun_in_child

# (M, K, N): one row; the small-batch kernel (M < 32) with K tails; the oneDNN row minimum and
# one below it; odd widths; the DLRM top / DCN-v2 widths (K not a multiple of 16)
SHAPES = [(1, 1, 1), (1, 17, 33), (5, 13, 512), (31, 33, 17), (32, 33, 17), (67, 432, 64),
          (64, 367, 40), (40, 429, 429),
          (5, 33, 1), (32, 33, 1), (96, 257, 1)]  # one output (a head): the mv rule


def _inputs(M, K, N, dtype, bias=True):
    x = torch.randn(M, K, dtype=dtype)
    w = torch.randn(N, K, dtype=dtype) / math.sqrt(max(K, 1))
    b = torch.randn(N, dtype=dtype) if bias else None
    return x, w, b


def _run(fn, args, g):
    """fn(*args) and the gradients of <out, g> with respect to every tensor argument."""
    a = [t.detach().clone().requires_grad_(True) if t is not None else None for t in args]
    out = fn(*a)
    out.backward(g)
    return out.detach(), [t.grad if t is not None else None for t in a]


def _truth(args, g, activation):
    a = [t.double() if t is not None else None for t in args]
    return _run(lambda x, w, b: R.linear(x, w, b, activation), a, g.double())


@pytest.mark.parametrize("api", ["functional", "ops"])
@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(api, activation, bias, dtype, shape):
    M, K, N = shape
    args = _inputs(M, K, N, dtype, bias)
    g = torch.randn(M, N, dtype=dtype)
    truth, truth_grads = _truth(args, g, activation)
    if api == "functional":
        out, grads = _run(lambda x, w, b: F.linear(x, w, b, activation), args, g)
    else:
        x, w, b = args
        out = torch.ops.adrec.linear(x, w, b, activation)
        res = out if activation == "relu" else None
        grads = list(torch.ops.adrec.linear_bwd(g, x, w, res, activation, [True, True, bias]))
        if not bias:
            assert grads[2].numel() == 0  # not requested: empty
            grads[2] = None
    assert out.shape == (M, N) and out.dtype == dtype
    assert_close_verbose(out, truth.to(dtype))
    for got, want in zip(grads, truth_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == dtype
            assert_close_verbose(got, want.to(dtype))


def test_hand_computed():
    x = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]])
    b = torch.tensor([0.5, -1.0, 0.0])
    want = torch.tensor([[-0.5, 3.5, 2.0], [-3.0, -1.5, 0.5]])
    assert_close_verbose(F.linear(x, w, b), want)
    assert_close_verbose(F.linear(x, w, b, "relu"), want.clamp_min(0))
    # the ReLU's gradient is zero where the output is; ones flowing back give column sums
    x.requires_grad_(True)
    F.linear(x, w, b, "relu").sum().backward()
    assert_close_verbose(x.grad, torch.tensor([[0.5, 3.0], [0.0, 1.0]]))


@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("shape", [(3, 17, 33), (64, 367, 40), (48, 64, 256)], ids=str)
def test_bfloat16(activation, shape):
    """bf16 operands (oneDNN from 32 rows, ATen below): error against fp64 no worse than 2x
    the reference's own in bf16, output and gradients."""
    M, K, N = shape
    args = [t.bfloat16() for t in _inputs(M, K, N, torch.float32)]
    g = torch.randn(M, N).bfloat16()
    out, grads = _run(lambda x, w, b: F.linear(x, w, b, activation), args, g)
    same, same_grads = _run(lambda x, w, b: R.linear(x, w, b, activation), args, g)
    truth, truth_grads = _truth(args, g, activation)
    assert out.dtype == torch.bfloat16
    assert_no_worse_than_torch(out, truth, same)
    for got, want, s in zip(grads, truth_grads, same_grads):
        assert got.dtype == torch.bfloat16
        assert_no_worse_than_torch(got, want, s)


def test_autocast_runs_in_bfloat16():
    """Under torch.autocast the operands are cast like F.linear's, gradients reach fp32 params."""
    x, w, b = _inputs(40, 33, 24, torch.float32)
    w.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.linear(x, w, b, "relu")
        ref = torch.nn.functional.linear(x, w, b).relu()
    assert out.dtype == ref.dtype == torch.bfloat16
    truth = R.linear(x.double(), w.double(), b.double(), "relu")
    assert_no_worse_than_torch(out, truth, ref)
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


@pytest.mark.parametrize("shape", [(40, 13, 512), (64, 367, 40), (33, 429, 429)], ids=str)
def test_aten_path_with_padding(shape, monkeypatch):
    """With oneDNN off (torch.backends.mkldnn), float32 products of at least 32 rows go to ATen
    with K padded to a multiple of 16; the padding must not change any value."""
    M, K, N = shape
    args = _inputs(M, K, N, torch.float32)
    g = torch.randn(M, N)
    truth, truth_grads = _truth(args, g, "relu")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    out, grads = _run(lambda x, w, b: F.linear(x, w, b, "relu"), args, g)
    assert_close_verbose(out, truth.float())
    for got, want in zip(grads, truth_grads):
        assert_close_verbose(got, want.float())


@pytest.mark.parametrize("M", [3, 40])
def test_non_contiguous(M):
    x = torch.randn(M, 40)[:, ::2]  # [M, 20], rows strided
    w_full = torch.randn(30, 24)
    w = w_full[:, :20]  # a strided view, as slicing produces
    wt = torch.randn(20, 30).t()  # a transposed weight
    b = torch.randn(60)[::2]
    g = torch.randn(30, M).t()
    for weight in (w, wt):
        assert not (x.is_contiguous() or weight.is_contiguous() or b.is_contiguous())
        truth, truth_grads = _truth((x, weight, b), g.contiguous(), "relu")
        out, grads = _run(lambda x_, w_, b_: F.linear(x_, w_, b_, "relu"), (x, weight, b), g)
        assert_close_verbose(out, truth.float())
        for got, want in zip(grads, truth_grads):
            assert_close_verbose(got, want.float())


@pytest.mark.parametrize("shape", [(0, 17, 5), (40, 0, 5), (3, 0, 5), (4, 6, 0)], ids=str)
def test_empty(shape):
    M, K, N = shape
    x, w, b = (t.requires_grad_(True) for t in _inputs(M, K, N, torch.float32))
    out = F.linear(x, w, b, "relu")
    assert out.shape == (M, N)
    assert_close_verbose(out, R.linear(x, w, b, "relu"))
    out.sum().backward()
    assert x.grad.shape == (M, K) and w.grad.shape == (N, K) and b.grad.shape == (N,)
    assert_close_verbose(w.grad, torch.zeros(N, K))


# (M, K, N) for the backward's fused elementwise pass (mask, bias sums and the transposed g by
# blocks of 64 rows): below and above one block, a partial last block, g.T chosen (N <= K) and
# x.T chosen (N > K), odd widths, one row
BWD_SHAPES = [(1, 7, 5), (33, 5, 40), (64, 48, 16), (65, 17, 33), (130, 100, 37), (200, 13, 70),
              (97, 367, 512), (4, 9, 2)]


@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, True), (True, False, False),
                                  (False, True, False), (False, False, True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=str)
def test_backward_output_mask(activation, mask, dtype, shape):
    """linear_bwd with every combination the autograd formula asks for (the first layer of a
    tower needs no input gradient; a layer without bias no bias gradient): the requested
    gradients match float64 truth and the others come back empty."""
    M, K, N = shape
    x, w, b = _inputs(M, K, N, dtype)
    out = torch.ops.adrec.linear(x, w, b, activation)
    g = torch.randn(M, N, dtype=dtype)
    res = out if activation == "relu" else None
    got = torch.ops.adrec.linear_bwd(g, x, w, res, activation, list(mask))
    gd = g.double() * (out.double() > 0) if activation == "relu" else g.double()
    want = (gd @ w.double(), gd.t() @ x.double(), gd.sum(0))
    for i, (gr, wt) in enumerate(zip(got, want)):
        if mask[i]:
            assert gr.dtype == dtype and gr.shape == wt.shape
            assert_close_verbose(gr, wt.to(dtype))
        else:
            assert gr.numel() == 0


def test_backward_relu_mask_follows_threshold_backward():
    """The ReLU's gradient passes where the output is > 0 and where it is NaN (as torch's
    threshold_backward), and is zero where the output is 0 or negative."""
    M, N, K = 70, 20, 9  # oneDNN rows, one full block and a tail
    x, w, _ = _inputs(M, K, N, torch.float32)
    out = torch.randn(M, N)
    out[0, 0], out[1, 1], out[2, 2] = float("nan"), 0.0, -0.0
    g = torch.randn(M, N)
    gx, gw, gb = torch.ops.adrec.linear_bwd(g, x, w, out, "relu", [True, True, True])
    gm = torch.ops.aten.threshold_backward(g, out, 0)
    assert gm[0, 0] == g[0, 0] and gm[1, 1] == 0 and gm[2, 2] == 0
    assert_close_verbose(gb, gm.sum(0))
    assert_close_verbose(gx, gm @ w)
    assert_close_verbose(gw, gm.t() @ x)


def test_backward_independent_of_threads():
    """The bias gradient is summed per block of rows, then over blocks in order: the same bits
    with 1 thread and with 2."""
    x, w, b = _inputs(300, 40, 24, torch.float32)
    out = torch.ops.adrec.linear(x, w, b, "relu")
    g = torch.randn(300, 24)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.adrec.linear_bwd(g, x, w, out, "relu", [True, True, True])
        torch.set_num_threads(2)
        two = torch.ops.adrec.linear_bwd(g, x, w, out, "relu", [True, True, True])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[2], two[2])


@pytest.mark.parametrize("M", [4, 70])  # one block of the backward's pass, two with a tail
def test_gradcheck_float64(M):
    x, w, b = (t.requires_grad_(True) for t in _inputs(M, 3, 2, torch.float64))
    for act in ("none", "relu"):
        assert torch.autograd.gradcheck(lambda *a: torch.ops.adrec.linear(*a, act), (x, w, b))
        assert torch.autograd.gradcheck(lambda *a: torch.ops.adrec.linear(*a, act), (x, w, None))


def test_bad_input():
    x, w, b = _inputs(4, 5, 3, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.adrec.linear(x, w, b, "gelu")
    with pytest.raises(ValueError, match="weight"):
        torch.ops.adrec.linear(x, w[:, :4], b, "none")
    with pytest.raises(ValueError, match="bias"):
        torch.ops.adrec.linear(x, w, b[:2], "none")
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.adrec.linear(x[0], w, b, "none")
    with pytest.raises(TypeError, match="weight has dtype"):
        torch.ops.adrec.linear(x, w.double(), b, "none")
    with pytest.raises(TypeError, match="floating"):
        torch.ops.adrec.linear(x.long(), w.long(), None, "none")
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.adrec.linear_bwd(torch.randn(4, 2), x, w, None, "none", [True, True, True])
    with pytest.raises(ValueError, match="result"):
        torch.ops.adrec.linear_bwd(torch.randn(4, 3), x, w, None, "relu", [True, True, True])
    with pytest.raises(ValueError, match="activation"):
        R.linear(x, w, b, "gelu")


def test_aten_setting_in_child():
    """ADREC_DENSE=aten (read once per process) sends every product to ATen: same results."""
    rerun_in_child(__file__, "(matches_reference and float32) or hand_computed",
                   ADREC_DENSE="aten")


def test_bad_dense_setting_is_named():
    code = ("import torch, adrec_fast; "
            "torch.ops.adrec.linear(torch.randn(40, 8), torch.randn(4, 8), None, 'none')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "ADREC_DENSE": "mkl"})
    assert res.returncode != 0
    assert "ADREC_DENSE must be 'onednn' or 'aten', got 'mkl'" in res.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 17, 33), (64, 432, 48), (70, 13, 257)], ids=str)
def test_linear_relu_dropout_matches_unfused(dtype, bias, shape):
    """linear_relu_dropout = dropout(linear(..., "relu")) with the same seed drawn from the
    same generator state: equal outputs, and gradients of x, weight and bias equal to rounding
    (the dropout's scale moves into the products)."""
    M, K, N = shape
    x, w, b = _inputs(M, K, N, dtype, bias)
    g = torch.randn(M, N, dtype=dtype)

    def unfused(x, w, b):
        return F.dropout(F.linear(x, w, b, "relu"), 0.3)

    torch.manual_seed(7)
    want, want_grads = _run(unfused, (x, w, b), g)
    torch.manual_seed(7)
    got, got_grads = _run(lambda x, w, b: F.linear_relu_dropout(x, w, b, 0.3), (x, w, b), g)
    assert torch.equal(got, want)
    assert (got == 0).any() and (got != 0).any()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, a, e in zip(("x", "weight", "bias"), got_grads, want_grads):
        if e is None:
            assert a is None
            continue
        assert_close_verbose(a, e, msg=name, **tol)


def test_linear_relu_dropout_gradcheck_float64():
    x, w, b = (t.requires_grad_(True) for t in _inputs(9, 6, 5, torch.float64))
    torch.autograd.gradcheck(lambda x, w, b: F.linear_relu_dropout(x, w, b, 0.4, seed=11),
                             (x, w, b))


def test_linear_relu_dropout_edges():
    """Eval and p = 0: the plain layer (no draw from the generator); p = 1: all zeros with zero
    gradients; offset places the rows in a larger mask as dropout's does; p outside [0, 1]."""
    x, w, b = _inputs(40, 12, 24, torch.float32)
    plain = F.linear(x, w, b, "relu")
    state = torch.get_rng_state()
    assert torch.equal(F.linear_relu_dropout(x, w, b, 0.5, training=False), plain)
    assert torch.equal(F.linear_relu_dropout(x, w, b, 0.0), plain)
    assert torch.equal(torch.get_rng_state(), state)
    a = [t.clone().requires_grad_(True) for t in (x, w, b)]
    out = F.linear_relu_dropout(*a, 1.0)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in a)
    whole = F.dropout(F.linear(torch.cat([x, x]), w, b, "relu"), 0.5, seed=3)
    second = F.linear_relu_dropout(x, w, b, 0.5, seed=3, offset=x.shape[0] * w.shape[0])
    assert torch.equal(second, whole[x.shape[0]:])
    with pytest.raises(ValueError, match="p must be in"):
        F.linear_relu_dropout(x, w, b, 1.5)


def test_mlp_runs_dropout_fused_with_same_result():
    """run_mlp fuses a Dropout that follows Linear + ReLU: the same output and gradients as
    running the modules one by one (the Sequential itself), seeded alike."""
    from adrec_fast.models.base import mlp, run_mlp

    torch.manual_seed(0)
    seq, _ = mlp(20, (16, 8), dropout=0.25)
    x = torch.randn(50, 20)
    outs, grads = [], []
    for fn in (run_mlp, lambda s, x: s(x)):
        seq.zero_grad()
        torch.manual_seed(5)
        out = fn(seq, x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in seq.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    assert (outs[0] == 0).any()
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
