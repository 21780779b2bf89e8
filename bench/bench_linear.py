# SPDX-License-Identifier: Apache-2.0
"""linear forward + backward, B=4096: DLRM's first top layer, [4096, 367] x [367, 512] + bias +
ReLU (K = D + 27*26/2, not a multiple of 16). Three matrix products per step (one forward, two
backward); the op fuses bias and ReLU into the forward's product.

    python bench/bench_linear.py --runs 3                # providers alternating, 3 runs
"""
from __future__ import annotations

import math

import pytest
import torch
from _common_ops import COMPILE_WARNINGS, PROVIDERS, B, OpCase, main, run_fwdbwd

from adrec_fast import functional as AF
from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS

K, N = 16 + 27 * 26 // 2, 512

# The layer's parameters: one pair shared by every input set, as across training steps.
_g = torch.Generator().manual_seed(1)
_W = (torch.randn(N, K, generator=_g) / math.sqrt(K)).requires_grad_(True)  # [N, K]
_B = torch.zeros(N, requires_grad=True)  # [N]


def _make_set(g: torch.Generator):
    x = torch.randn(B, K, generator=g).requires_grad_(True)  # [B, K]
    grad = torch.randn(B, N, generator=g)  # [B, N]
    return (x, _W, _B), grad


def _ref(x, w, b):
    return R.linear(x, w, b, "relu")


def _adrec(x, w, b):
    return AF.linear(x, w, b, "relu")


CASE = OpCase("linear", _ref, _adrec, _make_set, check={"rtol": 1e-3, "atol": 1e-3})


@pytest.mark.benchmark(group="linear_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_linear_fwdbwd(benchmark, backend):
    benchmark.extra_info["GFLOP"] = 3 * 2 * B * K * N / 1e9
    run_fwdbwd(benchmark, backend, CASE)


if __name__ == "__main__":
    main([CASE])
