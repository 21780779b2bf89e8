# SPDX-License-Identifier: Apache-2.0
"""dot_interaction on CUDA tensors (Triton backend) vs the reference."""
import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R

from ._common import check_against_reference

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("B,F_,D", [(1, 2, 1), (3, 27, 17), (2048, 27, 64)])
def test_dot_interaction(monkeypatch, B, F_, D, self_interaction):
    check_against_reference(monkeypatch, "triton", F.dot_interaction, R.dot_interaction,
                            [torch.randn(B, F_, D)], [0], self_interaction)
