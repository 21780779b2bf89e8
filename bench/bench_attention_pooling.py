# SPDX-License-Identifier: Apache-2.0
"""attention_pooling forward + backward, B=4096, D=16, every sequence 50 keys (L_total=204800).

The reference (``adrec_fast.reference.attention_pooling``) is a segment softmax over all samples
at once (index_add / scatter_reduce). Until 2026-11-29 it was a per-sample Python loop: 1.6-1.9 s
per step here, and ``torch.compile`` unrolled the loop (82 s to compile at B=16, 234 s at B=64),
so the compiled baseline could not be timed; the loop-free reference compiles.
"""
from __future__ import annotations

import pytest
import torch
from _common_ops import COMPILE_WARNINGS, PROVIDERS, SEQ_LEN, B, D, run_fwdbwd

from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS


def _cpp(query, keys, offsets):
    return torch.ops.adrec.attention_pooling(query, keys, offsets)[0]


def _inputs():
    query = torch.randn(B, D, requires_grad=True)  # [B, D]
    keys = torch.randn(B * SEQ_LEN, D, requires_grad=True)  # [L_total, D]
    offsets = torch.arange(B + 1) * SEQ_LEN  # [B+1]
    return query, keys, offsets


@pytest.mark.benchmark(group="attention_pooling_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS)
def test_attention_pooling_fwdbwd(benchmark, backend):
    query, keys, offsets = _inputs()
    g = torch.randn(B, D)  # [B, D]
    run_fwdbwd(benchmark, backend, R.attention_pooling, _cpp, (query, keys, offsets), g)
