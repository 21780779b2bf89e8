# SPDX-License-Identifier: Apache-2.0
"""attention_pooling forward + backward, B=4096, D=16, every sequence 50 keys (L_total=204800).

The reference is a per-sample Python loop. ``reference_compiled`` is skipped at this B: dynamo
unrolls the loop, so compiling takes minutes already at B=16-64 (82 s at B=16, 234 s at B=64
on this machine) and grows with B. As a stronger torch baseline, ``torch_vectorized`` (a
segment softmax written with index_add / scatter_reduce over all samples at once) and its
``torch.compile`` are timed as well.
"""
from __future__ import annotations

import math

import pytest
import torch
from _common_ops import (
    COMPILE_WARNINGS,
    PROVIDERS,
    SEQ_LEN,
    B,
    D,
    check_once,
    compiled,
    fwdbwd_step,
)

from adrec_fast import reference as R

pytestmark = COMPILE_WARNINGS

EXTRA = ("torch_vectorized", "torch_vectorized_compiled")


def _cpp(query, keys, offsets):
    return torch.ops.adrec.attention_pooling(query, keys, offsets)[0]


def attention_vectorized(query, keys, seg):
    """query [B, D], keys [L, D], seg [L] (sample of each key) -> [B, D]; same math as the
    reference, all samples at once."""
    Bq, Dq = query.shape
    s = (keys * query[seg]).sum(-1) / math.sqrt(Dq)  # [L]
    m = torch.full((Bq,), -math.inf, dtype=s.dtype).scatter_reduce(
        0, seg, s.detach(), "amax", include_self=True
    )  # [B]; the softmax does not depend on the shift, so it carries no gradient
    p = torch.exp(s - m[seg])  # [L]
    z = torch.zeros(Bq, dtype=s.dtype).index_add(0, seg, p)  # [B]
    p = p / z[seg]
    return torch.zeros(Bq, Dq, dtype=keys.dtype).index_add(0, seg, p[:, None] * keys)


def _inputs():
    query = torch.randn(B, D, requires_grad=True)  # [B, D]
    keys = torch.randn(B * SEQ_LEN, D, requires_grad=True)  # [L_total, D]
    offsets = torch.arange(B + 1) * SEQ_LEN  # [B+1]
    return query, keys, offsets


@pytest.mark.benchmark(group="attention_pooling_fwdbwd")
@pytest.mark.parametrize("backend", PROVIDERS + EXTRA)
def test_attention_pooling_fwdbwd(benchmark, backend):
    if backend == "reference_compiled":
        pytest.skip("torch.compile unrolls the reference's per-sample loop: minutes at B=64, "
                    "impractical at B=4096 (see the module docstring)")
    query, keys, offsets = _inputs()
    g = torch.randn(B, D)  # [B, D]
    if backend in EXTRA:
        seg = torch.repeat_interleave(torch.arange(B), offsets[1:] - offsets[:-1])  # [L]
        fn = attention_vectorized if backend == "torch_vectorized" else compiled(attention_vectorized)
        inputs = (query, keys, seg)
    else:
        fn = R.attention_pooling if backend == "reference" else _cpp
        inputs = (query, keys, offsets)
    step = fwdbwd_step(fn, inputs, g)
    check_once(step, lambda q, k, _: R.attention_pooling(q, k, offsets), inputs, g)
    benchmark.extra_info["provider"] = backend
    benchmark.pedantic(step, warmup_rounds=3, rounds=20)
