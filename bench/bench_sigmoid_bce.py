# SPDX-License-Identifier: Apache-2.0
"""sigmoid_bce forward + backward (loss.backward()), B=4096 (see _common_ops). The op is tiny
(~10 us of arithmetic), so each timed round runs 20 steps, each on its own input set, and the
per-step time is reported.

    python bench/bench_sigmoid_bce.py --runs 3           # providers alternating, 3 runs
"""
from __future__ import annotations

import pytest
import torch
from _common_ops import COMPILE_WARNINGS, PROVIDERS, B, OpCase, main, run_fwdbwd

from adrec_fast import functional as AF
from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS


def _make_set(g: torch.Generator):
    logits = (torch.randn(B, generator=g) * 3).requires_grad_(True)  # [B]
    labels = torch.randint(0, 2, (B,), generator=g).float()  # [B]
    return (logits, labels), None


CASE = OpCase("sigmoid_bce", R.sigmoid_bce, AF.sigmoid_bce, _make_set, inner=20,
              check={"rtol": 1e-5, "atol": 1e-7})


@pytest.mark.benchmark(group="sigmoid_bce_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_sigmoid_bce_fwdbwd(benchmark, backend):
    benchmark.extra_info["per_step_divisor"] = CASE.inner
    run_fwdbwd(benchmark, backend, CASE)


if __name__ == "__main__":
    main([CASE])
