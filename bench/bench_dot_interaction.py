# SPDX-License-Identifier: Apache-2.0
"""dot_interaction forward + backward, B=4096, F=27, D=16, P=351 pairs (see _common_ops)."""
from __future__ import annotations

import pytest
import torch
from _common_ops import COMPILE_WARNINGS, PROVIDERS, B, D, F, run_fwdbwd

from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS


def _ref(emb):
    return R.dot_interaction(emb, False)


def _cpp(emb):
    return torch.ops.adrec.dot_interaction(emb, False)


@pytest.mark.benchmark(group="dot_interaction_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_dot_interaction_fwdbwd(benchmark, backend):
    emb = torch.randn(B, F, D, requires_grad=True)  # [B, F, D]
    g = torch.randn(B, F * (F - 1) // 2)  # [B, P]
    run_fwdbwd(benchmark, backend, _ref, _cpp, (emb,), g)
