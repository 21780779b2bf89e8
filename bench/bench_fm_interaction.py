# SPDX-License-Identifier: Apache-2.0
"""fm_interaction forward + backward, B=4096, F=27, D=16 (see _common_ops).

    python bench/bench_fm_interaction.py --runs 3        # providers alternating, 3 runs
"""
from __future__ import annotations

import pytest
import torch
from _common_ops import COMPILE_WARNINGS, PROVIDERS, B, D, F, OpCase, main, run_fwdbwd

from adrec_fast import functional as AF
from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS


def _make_set(g: torch.Generator):
    emb = torch.randn(B, F, D, generator=g).requires_grad_(True)  # [B, F, D]
    grad = torch.randn(B, 1, generator=g)  # [B, 1]
    return (emb,), grad


CASE = OpCase("fm_interaction", R.fm_interaction, AF.fm_interaction, _make_set)


@pytest.mark.benchmark(group="fm_interaction_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_fm_interaction_fwdbwd(benchmark, backend):
    benchmark.extra_info["MB"] = 3 * B * F * D * 4 / 1e6  # read fwd, read + write bwd
    run_fwdbwd(benchmark, backend, CASE)


if __name__ == "__main__":
    main([CASE])
