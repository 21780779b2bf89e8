# SPDX-License-Identifier: Apache-2.0
"""sigmoid_bce forward + backward (loss.backward()), B=4096 (see _common_ops). The op is tiny
(~10 us of arithmetic), so each timed round runs 20 steps and the per-step time is reported."""
from __future__ import annotations

import pytest
import torch
from _common_ops import COMPILE_WARNINGS, PROVIDERS, B, run_fwdbwd

from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS


def _cpp(logits, labels):
    return torch.ops.adrec.sigmoid_bce(logits, labels, None)[0]


@pytest.mark.benchmark(group="sigmoid_bce_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_sigmoid_bce_fwdbwd(benchmark, backend):
    logits = (torch.randn(B) * 3).requires_grad_(True)  # [B]
    labels = torch.randint(0, 2, (B,)).float()  # [B]
    run_fwdbwd(benchmark, backend, R.sigmoid_bce, _cpp, (logits, labels), None, iterations=20,
               rtol=1e-5, atol=1e-7)
