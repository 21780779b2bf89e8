# SPDX-License-Identifier: Apache-2.0
"""dot_interaction: the C++ CPU kernels vs the reference (forward and backward)."""
from __future__ import annotations

import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R

from ..conftest import assert_close_verbose, assert_no_worse_than_torch

SHAPES = [(1, 1, 1), (1, 27, 16), (3, 26, 17), (5, 1, 17), (64, 27, 16), (7, 39, 64), (4, 17, 33)]


def _truth_and_grad(emb, g, self_interaction):
    e = emb.detach().double().requires_grad_(True)
    out = R.dot_interaction(e, self_interaction)
    out.backward(g.double())
    return out.detach(), e.grad


@pytest.mark.parametrize("api", ["functional", "ops"])
@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(api, self_interaction, dtype, shape):
    B, F_, _ = shape
    P = F_ * (F_ + 1) // 2 if self_interaction else F_ * (F_ - 1) // 2
    emb = torch.randn(*shape, dtype=dtype, requires_grad=True)
    g = torch.randn(B, P, dtype=dtype)
    if api == "functional":
        out = F.dot_interaction(emb, self_interaction)
        out.backward(g)
        grad = emb.grad
    else:
        out = torch.ops.adrec.dot_interaction(emb.detach(), self_interaction)
        grad = torch.ops.adrec.dot_interaction_bwd(g, emb.detach(), self_interaction)
    truth, truth_grad = _truth_and_grad(emb, g, self_interaction)
    assert out.shape == (B, P) and out.dtype == dtype
    assert_close_verbose(out, truth.to(dtype))
    assert_close_verbose(grad, truth_grad.to(dtype))


def test_bfloat16_no_worse_than_torch():
    emb = torch.randn(16, 27, 16).to(torch.bfloat16)
    assert_no_worse_than_torch(
        F.dot_interaction(emb), R.dot_interaction(emb.double()), R.dot_interaction(emb)
    )


def test_non_contiguous():
    emb = torch.randn(9, 17, 6, dtype=torch.float64).transpose(1, 2)  # [9, 6, 17]
    assert not emb.is_contiguous()
    assert_close_verbose(F.dot_interaction(emb), R.dot_interaction(emb))
    g = torch.randn(9, 15, dtype=torch.float64).t().contiguous().t()  # column-major [9, 15]
    e = emb.clone().requires_grad_(True)
    R.dot_interaction(e).backward(g)
    assert_close_verbose(torch.ops.adrec.dot_interaction_bwd(g, emb, False), e.grad)


@pytest.mark.parametrize("B", [1, 5, 40])
def test_backward_reads_strided_rows(B):
    """A grad_out whose rows are a column slice (the gradient of the pairs inside a concatenated
    [dense, pairs] input) is read in place: the same values as from a contiguous copy."""
    emb = torch.randn(B, 27, 16)
    wide = torch.randn(B, 16 + 351)
    g = wide[:, 16:]  # [B, 351], row stride 367
    assert not g.is_contiguous() or B == 1
    want = torch.ops.adrec.dot_interaction_bwd(g.contiguous(), emb, False)
    assert torch.equal(torch.ops.adrec.dot_interaction_bwd(g, emb, False), want)
    e = emb.double().requires_grad_(True)
    R.dot_interaction(e).backward(g.double())
    assert_close_verbose(want, e.grad.float())
    # the model's composition: cat([dense, pairs]) -> gradient slice -> the kernel
    emb.requires_grad_(True)
    d = torch.randn(B, 16)
    torch.cat([d, F.dot_interaction(emb)], dim=1).backward(wide)
    assert torch.equal(emb.grad, want)


def test_empty_batch():
    emb = torch.randn(0, 27, 16, requires_grad=True)
    out = F.dot_interaction(emb)
    assert out.shape == (0, 351)
    out.sum().backward()
    assert emb.grad.shape == (0, 27, 16)


def test_single_field_has_no_pairs():
    emb = torch.randn(4, 1, 8, requires_grad=True)
    out = F.dot_interaction(emb)
    assert out.shape == (4, 0)
    out.sum().backward()
    assert_close_verbose(emb.grad, torch.zeros(4, 1, 8))


def test_literal_example():
    # F=3, D=2: e0 = [1, 0], e1 = [2, 3], e2 = [0, 1]; pairs (0,1), (0,2), (1,2) = 2, 0, 3.
    emb = torch.tensor([[[1.0, 0.0], [2.0, 3.0], [0.0, 1.0]]], requires_grad=True)
    assert_close_verbose(F.dot_interaction(emb), torch.tensor([[2.0, 0.0, 3.0]]))
    # With self: (0,0), (0,1), (0,2), (1,1), (1,2), (2,2).
    assert_close_verbose(
        F.dot_interaction(emb, True), torch.tensor([[1.0, 2.0, 0.0, 13.0, 3.0, 1.0]])
    )
    F.dot_interaction(emb).backward(torch.tensor([[1.0, 0.0, 0.0]]))
    # Only pair (0, 1) has a gradient: d/d e0 = e1, d/d e1 = e0.
    assert_close_verbose(emb.grad, torch.tensor([[[2.0, 3.0], [1.0, 0.0], [0.0, 0.0]]]))


@pytest.mark.parametrize("self_interaction", [False, True])
def test_gradcheck(self_interaction):
    emb = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: F.dot_interaction(e, self_interaction), (emb,))


def test_bad_dtype_names_argument():
    with pytest.raises(TypeError, match="emb"):
        torch.ops.adrec.dot_interaction(torch.ones(2, 3, 4, dtype=torch.int32), False)


def test_bad_shape():
    with pytest.raises(ValueError, match="emb"):
        torch.ops.adrec.dot_interaction(torch.ones(2, 3), False)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.adrec.dot_interaction_bwd(torch.ones(2, 6), torch.ones(2, 3, 4), False)
