# SPDX-License-Identifier: Apache-2.0
"""fm_interaction forward + backward, B=4096, F=27, D=16 (see _common_ops)."""
from __future__ import annotations

import pytest
import torch
from _common_ops import COMPILE_WARNINGS, PROVIDERS, B, D, F, run_fwdbwd

from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS


def _cpp(emb):
    return torch.ops.adrec.fm_interaction(emb)


@pytest.mark.benchmark(group="fm_interaction_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_fm_interaction_fwdbwd(benchmark, backend):
    emb = torch.randn(B, F, D, requires_grad=True)  # [B, F, D]
    g = torch.randn(B, 1)  # [B, 1]
    benchmark.extra_info["MB"] = 3 * emb.numel() * 4 / 1e6  # read fwd, read + write bwd
    run_fwdbwd(benchmark, backend, R.fm_interaction, _cpp, (emb,), g)
