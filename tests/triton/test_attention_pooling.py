# SPDX-License-Identifier: Apache-2.0
"""kernels/attention_pooling.py launchers under TRITON_INTERPRET=1 vs the reference."""
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast import reference as R

from ..conftest import assert_close_verbose

k = pytest.importorskip("adrec_fast.kernels.attention_pooling")
pytestmark = pytest.mark.triton


@pytest.mark.parametrize("lengths,D", [([3], 1), ([0, 5, 1, 70], 17), ([2, 0, 50], 16)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_attention_pooling(lengths, D, index_dtype):
    B = len(lengths)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=index_dtype)
    q, keys = torch.randn(B, D), torch.randn(sum(lengths), D)
    qd, kd = q.double().requires_grad_(True), keys.double().requires_grad_(True)
    truth = R.attention_pooling(qd, kd, offsets)
    out, probs = k.attention_pooling_fwd(q, keys, offsets)
    assert_close_verbose(out, truth.float().detach())
    g = torch.randn(B, D)
    gq, gk = torch.autograd.grad(truth, (qd, kd), g.double())
    mq, mk = k.attention_pooling_bwd(g, q, keys, offsets, probs)
    assert_close_verbose(mq, gq.float())
    assert_close_verbose(mk, gk.float())
