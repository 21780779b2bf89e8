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


def test_gradcheck_float64():
    x, w, b = (t.requires_grad_(True) for t in _inputs(4, 5, 3, torch.float64))
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
