# SPDX-License-Identifier: Apache-2.0
"""kernels/dot_interaction.py launchers under TRITON_INTERPRET=1 vs the reference."""
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast import reference as R

from ..conftest import assert_close_verbose

k = pytest.importorskip("adrec_fast.kernels.dot_interaction")
pytestmark = pytest.mark.triton


@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("B,F,D", [(1, 2, 1), (3, 5, 17), (4, 27, 16)])
def test_dot_interaction(B, F, D, self_interaction):
    x = torch.randn(B, F, D)
    xd = x.double().requires_grad_(True)
    truth = R.dot_interaction(xd, self_interaction)
    assert_close_verbose(k.dot_interaction_fwd(x, self_interaction), truth.float().detach())
    g = torch.randn(truth.shape)
    (gt,) = torch.autograd.grad(truth, xd, g.double())
    assert_close_verbose(k.dot_interaction_bwd(g, x, self_interaction), gt.float())


def test_dot_literal():
    x = torch.tensor([[[1.0, 0.0], [2.0, 3.0], [4.0, 5.0]]])
    assert k.dot_interaction_fwd(x, False).tolist() == [[2.0, 4.0, 23.0]]
    assert k.dot_interaction_fwd(x, True).tolist() == [[1.0, 2.0, 4.0, 13.0, 23.0, 41.0]]
