# SPDX-License-Identifier: Apache-2.0
"""dropout: the C++ CPU kernel vs the reference's counter-based mask, its gradient, its rate,
the global-batch offset, and the module in the models' towers."""
from __future__ import annotations

import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R
from adrec_fast.nn import Dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (4096, 17), (2, 3, 7), (0, 4)])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.999])
def test_matches_reference(dtype, shape, p):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    for seed, offset in ((0, 0), (123456789, 7), (2**62 - 1, 2**32 - 5), (-3, 0)):
        got = torch.ops.adrec.dropout(x, p, seed, offset)
        want = R.dropout(x, p, seed, offset)
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (4096, 17), (2, 3, 7), (0, 4)])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_in_place_is_the_same_mask(dtype, shape, p):
    from adrec_fast.ops import dropout as D

    torch.manual_seed(1)
    x = torch.randn(shape).to(dtype)
    for seed, offset in ((0, 0), (2**62 - 1, 2**32 - 5), (-3, 11)):
        want = R.dropout(x, p, seed, offset)
        y = x.clone()
        torch.ops.adrec.dropout_(y, p, seed, offset)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        y = x.clone()
        assert D.dropout_(y, p, seed, offset) is y
        torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_in_place_non_contiguous_and_bad_input(monkeypatch):
    from adrec_fast.ops import dropout as D

    x = torch.randn(6, 8)
    want = R.dropout(x.t().contiguous(), 0.3, 9, 0)
    y = x.clone().t()  # a view: the op layer writes the out-of-place result back into it
    assert D.dropout_(y, 0.3, 9, 0) is y
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout_: x must be contiguous"):
        torch.ops.adrec.dropout_(x.clone().t(), 0.3, 9, 0)
    with pytest.raises(ValueError, match=r"dropout_: p must be in \[0, 1\], got 1.5"):
        torch.ops.adrec.dropout_(x.clone(), 1.5, 9, 0)
    with pytest.raises(ValueError, match="dropout_: offset must be >= 0"):
        torch.ops.adrec.dropout_(x.clone(), 0.5, 9, -1)
    monkeypatch.setenv("ADREC_BACKEND", "reference")
    y = x.clone()
    D.dropout_(y, 0.3, 4, 2)
    torch.testing.assert_close(y, R.dropout(x, 0.3, 4, 2), rtol=0, atol=0)


def test_p_one_and_non_contiguous():
    x = torch.randn(6, 8)
    assert torch.equal(torch.ops.adrec.dropout(x, 1.0, 5, 0), torch.zeros(6, 8))
    xt = x.t()  # the mask follows the row-major index of the tensor as it is shaped
    torch.testing.assert_close(torch.ops.adrec.dropout(xt, 0.3, 9, 0),
                               R.dropout(xt.contiguous(), 0.3, 9, 0), rtol=0, atol=0)


def test_gradient_float64_is_the_same_mask():
    x = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: torch.ops.adrec.dropout(t, 0.4, 77, 3), (x,))
    y = F.dropout(x, 0.4, seed=77, offset=3)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, R.dropout(g, 0.4, 77, 3), rtol=0, atol=0)
    # the gradient is zero exactly where the output was dropped, whatever x was there
    assert torch.equal(x.grad == 0, y.detach() == 0)


def test_rate_scale_and_independence():
    x = torch.ones(1 << 21)
    for p in (0.1, 0.2, 0.5):
        y = torch.ops.adrec.dropout(x, p, 11, 0)
        kept = y != 0
        rate = 1 - kept.float().mean().item()
        assert abs(rate - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
        assert torch.allclose(y[kept], torch.full((int(kept.sum()),), 1 / (1 - p)))
        # neighbours are independent: P(both kept) = (1 - p)^2
        both = (kept[1:] & kept[:-1]).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 0.003
    a = torch.ops.adrec.dropout(x, 0.5, 1, 0) != 0
    b = torch.ops.adrec.dropout(x, 0.5, 2, 0) != 0
    assert abs((a & b).float().mean().item() - 0.25) < 0.003  # seeds give unrelated masks


def test_offset_cuts_a_larger_mask():
    """Rank r of a global batch (its rows at offset r * n * H) drops what one process drops."""
    x = torch.randn(8, 6)
    whole = torch.ops.adrec.dropout(x, 0.3, 42, 0)
    parts = [torch.ops.adrec.dropout(x[r * 2:(r + 1) * 2], 0.3, 42, r * 2 * 6) for r in range(4)]
    assert torch.equal(torch.cat(parts), whole)


def test_functional_and_module():
    x = torch.randn(64, 32)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    torch.manual_seed(3)
    a = F.dropout(x, 0.5)
    torch.manual_seed(3)
    b = F.dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, x)  # torch.manual_seed fixes the mask
    m = Dropout(0.5)
    assert isinstance(m, torch.nn.Dropout)
    m.eval()
    assert torch.equal(m(x), x)
    m.train()
    torch.manual_seed(3)
    assert torch.equal(m(x), a)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p must be in"):
            F.dropout(x, bad)
    with pytest.raises(ValueError, match="p must be in"):
        torch.ops.adrec.dropout(x, 2.0, 0, 0)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        torch.ops.adrec.dropout(x, 0.5, 0, -1)
    with pytest.raises(ValueError, match="inplace"):
        Dropout(0.5, inplace=True)(x)
