# SPDX-License-Identifier: Apache-2.0
"""attention_pooling on CUDA tensors (Triton backend) vs the reference."""
import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R

from ._common import check_against_reference

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("lengths,D", [([3], 1), ([0, 5, 1, 70], 17), ([50] * 64, 16)])
def test_attention_pooling(monkeypatch, lengths, D):
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    B = len(lengths)
    monkeypatch.setenv("ADREC_BACKEND", "triton")

    def fn(q, k):
        return F.attention_pooling(q, k, offsets.cuda())

    def ref(q, k):
        return R.attention_pooling(q, k, offsets)

    check_against_reference(monkeypatch, "triton", fn, ref,
                            [torch.randn(B, D), torch.randn(sum(lengths), D)], [0, 1])
