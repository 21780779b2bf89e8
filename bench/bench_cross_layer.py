# SPDX-License-Identifier: Apache-2.0
"""cross_layer forward + backward, B=4096, K=F*D=432 (see _common_ops). Three [4096 x 432 x 432]
matrix products per step (one forward, two backward) dominate; the kernels fuse the rest.

    python bench/bench_cross_layer.py --runs 3           # providers alternating, 3 runs
"""
from __future__ import annotations

import pytest
import torch
from _common_ops import (
    COMPILE_WARNINGS,
    PROVIDERS,
    B,
    K,
    OpCase,
    cross_weight,
    main,
    run_fwdbwd,
)

from adrec_fast import functional as AF
from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS

# The layer's parameters: one pair shared by every input set, as across training steps.
_W, _B = cross_weight(K)


def _make_set(g: torch.Generator):
    x0 = torch.randn(B, K, generator=g).requires_grad_(True)  # [B, K]
    x = torch.randn(B, K, generator=g).requires_grad_(True)  # [B, K]
    grad = torch.randn(B, K, generator=g)  # [B, K]
    return (x0, x, _W, _B), grad


CASE = OpCase("cross_layer", R.cross_layer, AF.cross_layer, _make_set,
              check={"rtol": 1e-3, "atol": 1e-3})


@pytest.mark.benchmark(group="cross_layer_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_cross_layer_fwdbwd(benchmark, backend):
    benchmark.extra_info["GFLOP"] = 3 * 2 * B * K * K / 1e9
    run_fwdbwd(benchmark, backend, CASE)


if __name__ == "__main__":
    main([CASE])
