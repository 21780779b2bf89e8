# SPDX-License-Identifier: Apache-2.0
"""kernels/fm_interaction.py launchers under TRITON_INTERPRET=1 vs the reference."""
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast import reference as R

from ..conftest import assert_close_verbose

k = pytest.importorskip("adrec_fast.kernels.fm_interaction")
pytestmark = pytest.mark.triton


@pytest.mark.parametrize("B,F,D", [(1, 1, 1), (3, 5, 17), (9, 27, 16)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_fm_interaction(B, F, D, contiguous):
    x = torch.randn(B, D, F).transpose(1, 2) if not contiguous else torch.randn(B, F, D)
    xd = x.double().requires_grad_(True)
    truth = R.fm_interaction(xd)
    assert_close_verbose(k.fm_interaction_fwd(x), truth.float().detach())
    g = torch.randn(B, 1)
    (gt,) = torch.autograd.grad(truth, xd, g.double())
    assert_close_verbose(k.fm_interaction_bwd(g, x), gt.float())


def test_fm_literal():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # 0.5*((4^2-1-9) + (6^2-4-16)) = 11
    assert k.fm_interaction_fwd(x).tolist() == [[11.0]]
