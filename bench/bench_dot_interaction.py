# SPDX-License-Identifier: Apache-2.0
"""dot_interaction forward + backward, B=4096, F=27, D=16, P=351 pairs (see _common_ops).

    python bench/bench_dot_interaction.py --runs 3       # providers alternating, 3 runs
"""
from __future__ import annotations

import pytest
import torch
from _common_ops import COMPILE_WARNINGS, PROVIDERS, B, D, F, OpCase, main, run_fwdbwd

from adrec_fast import functional as AF
from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS


def _ref(emb):
    return R.dot_interaction(emb, False)


def _adrec(emb):
    return AF.dot_interaction(emb, False)


def _make_set(g: torch.Generator):
    emb = torch.randn(B, F, D, generator=g).requires_grad_(True)  # [B, F, D]
    grad = torch.randn(B, F * (F - 1) // 2, generator=g)  # [B, P]
    return (emb,), grad


CASE = OpCase("dot_interaction", _ref, _adrec, _make_set)


@pytest.mark.benchmark(group="dot_interaction_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_dot_interaction_fwdbwd(benchmark, backend):
    run_fwdbwd(benchmark, backend, CASE)


if __name__ == "__main__":
    main([CASE])
