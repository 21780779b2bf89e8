# SPDX-License-Identifier: Apache-2.0
"""kernels/cross_layer.py launchers (torch GEMM + Triton epilogue) under TRITON_INTERPRET=1."""
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast import reference as R

from ..conftest import assert_close_verbose

k = pytest.importorskip("adrec_fast.kernels.cross_layer")
pytestmark = pytest.mark.triton


@pytest.mark.parametrize("B,K", [(1, 1), (5, 17), (64, 33)])
def test_cross_layer(B, K):
    x0, x, w, b = torch.randn(B, K), torch.randn(B, K), torch.randn(K, K), torch.randn(K)
    ins = [t.double().requires_grad_(True) for t in (x0, x, w, b)]
    truth = R.cross_layer(*ins)
    out, xw = k.cross_layer_fwd(x0, x, w, b)
    assert_close_verbose(out, truth.float().detach())
    assert_close_verbose(xw, torch.nn.functional.linear(x, w, b))
    g = torch.randn(B, K)
    want = torch.autograd.grad(truth, ins, g.double())
    for got, exp in zip(k.cross_layer_bwd(g, x0, x, w, xw), want):
        assert_close_verbose(got, exp.float())
