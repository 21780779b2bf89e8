# SPDX-License-Identifier: Apache-2.0
"""kernels/sigmoid_bce.py launchers under TRITON_INTERPRET=1 vs the reference."""
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast import reference as R

from ..conftest import assert_close_verbose

k = pytest.importorskip("adrec_fast.kernels.sigmoid_bce")
pytestmark = pytest.mark.triton


@pytest.mark.parametrize("B", [1, 17, 3000])
@pytest.mark.parametrize("weighted", [False, True])
def test_sigmoid_bce(B, weighted):
    z = torch.randn(B) * 8  # saturated logits too
    y = (torch.rand(B) > 0.5).float()
    w = torch.rand(B) if weighted else None
    zd = z.double().requires_grad_(True)
    truth = R.sigmoid_bce(zd, y.double(), w.double() if weighted else None)
    (gt,) = torch.autograd.grad(truth, zd)
    loss, grad = k.sigmoid_bce_fwd(z, y, w)
    assert_close_verbose(loss, truth.float().detach())
    assert_close_verbose(grad, gt.float())
    assert torch.equal(k.sigmoid_bce_fwd(z, y, w)[0], loss)  # fixed-order reduction


def test_sigmoid_bce_literal():
    loss, grad = k.sigmoid_bce_fwd(torch.zeros(2), torch.tensor([0.0, 1.0]))
    assert_close_verbose(loss, torch.tensor(0.6931471805599453, dtype=torch.float32))
    assert grad.tolist() == [0.25, -0.25]


@pytest.mark.parametrize("B,K", [(1, 1), (70, 200), (5, 17)])
def test_score(B, K):
    x, w, b = torch.randn(B, K), torch.randn(K), torch.tensor(0.3)
    assert_close_verbose(k.score_fwd(x, w, b), R.score(x.double(), w.double(), b.double()).float())
    xt = torch.randn(K, B).t()  # non-contiguous
    assert_close_verbose(k.score_fwd(xt, w, b), R.score(xt.double(), w.double(), b.double()).float())
