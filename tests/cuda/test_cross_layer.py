# SPDX-License-Identifier: Apache-2.0
"""cross_layer on CUDA tensors (Triton epilogue) vs the reference."""
import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R

from ._common import check_against_reference

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("B,K", [(1, 1), (5, 17), (4096, 429)])
def test_cross_layer(monkeypatch, B, K):
    # The GEMMs run in full fp32 so that the comparison is against fp32 arithmetic.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ins = [torch.randn(B, K), torch.randn(B, K), torch.randn(K, K) / K**0.5, torch.randn(K)]
    check_against_reference(monkeypatch, "triton", F.cross_layer, R.cross_layer, ins, [0, 1, 2, 3])
