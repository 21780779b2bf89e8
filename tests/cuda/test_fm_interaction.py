# SPDX-License-Identifier: Apache-2.0
"""fm_interaction on CUDA tensors (Triton backend) vs the reference."""
import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R

from ._common import check_against_reference

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("B,F_,D", [(1, 1, 1), (3, 26, 17), (2048, 39, 64)])
def test_fm_interaction(monkeypatch, B, F_, D):
    check_against_reference(monkeypatch, "triton", F.fm_interaction, R.fm_interaction,
                            [torch.randn(B, F_, D)], [0])
