# SPDX-License-Identifier: Apache-2.0
"""fm_interaction: the C++ CPU kernels vs the reference (forward and backward)."""
from __future__ import annotations

import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R

from ..conftest import assert_close_verbose, assert_no_worse_than_torch

SHAPES = [(1, 1, 1), (1, 27, 16), (3, 26, 17), (5, 1, 17), (64, 27, 16), (7, 39, 64), (4, 3, 33)]


def _truth_and_grad(emb: torch.Tensor, g: torch.Tensor):
    """Reference output [B, 1] and d/d emb in float64."""
    e = emb.detach().double().requires_grad_(True)
    out = R.fm_interaction(e)
    out.backward(g.double())
    return out.detach(), e.grad


@pytest.mark.parametrize("api", ["functional", "ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(api, dtype, shape):
    emb = torch.randn(*shape, dtype=dtype, requires_grad=True)
    g = torch.randn(shape[0], 1, dtype=dtype)
    if api == "functional":
        out = F.fm_interaction(emb)
        out.backward(g)
        grad = emb.grad
    else:
        out = torch.ops.adrec.fm_interaction(emb.detach())
        grad = torch.ops.adrec.fm_interaction_bwd(g, emb.detach())
    truth, truth_grad = _truth_and_grad(emb, g)
    assert out.shape == (shape[0], 1) and out.dtype == dtype
    # float32 accumulates in double, so it is held to float32 rounding of the float64 truth.
    assert_close_verbose(out, truth.to(dtype))
    assert_close_verbose(grad, truth_grad.to(dtype))


def test_bfloat16_no_worse_than_torch():
    emb = torch.randn(32, 27, 16).to(torch.bfloat16)
    truth = R.fm_interaction(emb.double())
    assert_no_worse_than_torch(F.fm_interaction(emb), truth, R.fm_interaction(emb))
    g = torch.randn(32, 1).to(torch.bfloat16)
    e64 = emb.double().requires_grad_(True)
    R.fm_interaction(e64).backward(g.double())
    e16 = emb.clone().requires_grad_(True)
    R.fm_interaction(e16).backward(g)
    assert_no_worse_than_torch(torch.ops.adrec.fm_interaction_bwd(g, emb), e64.grad, e16.grad)


def test_non_contiguous():
    base = torch.randn(16, 5, 27, dtype=torch.float64)
    emb = base.transpose(1, 2)  # [B=16, F=27, D=5], non-contiguous
    assert not emb.is_contiguous()
    assert_close_verbose(F.fm_interaction(emb), R.fm_interaction(emb))
    g = torch.randn(16, 1, dtype=torch.float64).expand(16, 1)
    e = emb.clone().requires_grad_(True)
    R.fm_interaction(e).backward(g)
    assert_close_verbose(torch.ops.adrec.fm_interaction_bwd(g, emb), e.grad)


def test_empty_batch():
    emb = torch.randn(0, 27, 16, requires_grad=True)
    out = F.fm_interaction(emb)
    assert out.shape == (0, 1)
    out.sum().backward()
    assert emb.grad.shape == (0, 27, 16)


def test_literal_example():
    # One sample, F=2, D=2: e0 = [1, 2], e1 = [3, 4] -> e0 . e1 = 3 + 8 = 11.
    emb = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)
    out = F.fm_interaction(emb)
    assert_close_verbose(out, torch.tensor([[11.0]]))
    out.backward(torch.tensor([[2.0]]))
    # d/d e_f = g * (sum_f' e_f' - e_f) = g * e_other.
    assert_close_verbose(emb.grad, torch.tensor([[[6.0, 8.0], [2.0, 4.0]]]))


def test_gradcheck():
    emb = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(F.fm_interaction, (emb,))


def test_bad_dtype_names_argument():
    with pytest.raises(TypeError, match="emb"):
        torch.ops.adrec.fm_interaction(torch.ones(2, 3, 4, dtype=torch.int64))


def test_bad_shape():
    with pytest.raises(ValueError, match="emb"):
        torch.ops.adrec.fm_interaction(torch.ones(2, 3))
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.adrec.fm_interaction_bwd(torch.ones(3, 1), torch.ones(2, 3, 4))
    with pytest.raises(TypeError, match="grad_out"):
        torch.ops.adrec.fm_interaction_bwd(torch.ones(2, 1, dtype=torch.float64), torch.ones(2, 3, 4))
