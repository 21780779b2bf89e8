# SPDX-License-Identifier: Apache-2.0
"""attention_pooling forward + backward, B=4096, D=16, every sequence 50 keys (L_total=204800)
(see _common_ops).

The reference (``adrec_fast.reference.attention_pooling``) is a segment softmax over all samples
at once (index_add / scatter_reduce), with no per-sample loop, so ``torch.compile`` compiles it
in seconds.

    python bench/bench_attention_pooling.py --runs 3     # providers alternating, 3 runs
"""
from __future__ import annotations

import pytest
import torch
from _common_ops import COMPILE_WARNINGS, PROVIDERS, SEQ_LEN, B, D, OpCase, main, run_fwdbwd

from adrec_fast import functional as AF
from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS

_OFFSETS = torch.arange(B + 1) * SEQ_LEN  # [B+1], the same layout in every set


def _make_set(g: torch.Generator):
    query = torch.randn(B, D, generator=g).requires_grad_(True)  # [B, D]
    keys = torch.randn(B * SEQ_LEN, D, generator=g).requires_grad_(True)  # [L_total, D]
    grad = torch.randn(B, D, generator=g)  # [B, D]
    return (query, keys, _OFFSETS), grad


CASE = OpCase("attention_pooling", R.attention_pooling, AF.attention_pooling, _make_set)


@pytest.mark.benchmark(group="attention_pooling_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_attention_pooling_fwdbwd(benchmark, backend):
    run_fwdbwd(benchmark, backend, CASE)


if __name__ == "__main__":
    main([CASE])
