# SPDX-License-Identifier: Apache-2.0
"""cross_layer forward + backward, B=4096, K=F*D=432 (see _common_ops). Three [4096 x 432 x 432]
matrix products per step (one forward, two backward) dominate; the kernels fuse the rest."""
from __future__ import annotations

import math

import pytest
import torch
from _common_ops import COMPILE_WARNINGS, PROVIDERS, B, K, run_fwdbwd

from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS


def _cpp(x0, x, weight, bias):
    return torch.ops.adrec.cross_layer(x0, x, weight, bias)[0]


@pytest.mark.benchmark(group="cross_layer_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_cross_layer_fwdbwd(benchmark, backend):
    x0 = torch.randn(B, K, requires_grad=True)  # [B, K]
    x = torch.randn(B, K, requires_grad=True)  # [B, K]
    w = (torch.randn(K, K) / math.sqrt(K)).requires_grad_(True)  # [K, K], CrossNet-like scale
    b = torch.zeros(K, requires_grad=True)  # [K]
    g = torch.randn(B, K)  # [B, K]
    benchmark.extra_info["GFLOP"] = 3 * 2 * B * K * K / 1e9
    run_fwdbwd(benchmark, backend, R.cross_layer, _cpp, (x0, x, w, b), g, rtol=1e-3, atol=1e-3)
