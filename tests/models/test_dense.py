# SPDX-License-Identifier: Apache-2.0
"""The model towers' dense products through ``functional.linear`` (oneDNN from 32 rows on the
CPU): IEEE fp32 accuracy against an fp64 truth, and whole models equal with oneDNN switched on
and off (``torch.backends.mkldnn``; the op then takes ATen with K padded)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF

from adrec_fast import functional as F
from adrec_fast.models.base import mlp, run_mlp
from adrec_fast.models.registry import build_model

from ._towers import TOWER_CASES as CASES
from ._towers import tower_batch

B = 67  # odd batch: no multiple-of-16 luck


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _rel(a, b):
    """Relative error in the Frobenius norm."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("K,N", [(13, 512), (33, 17), (432, 64)])
def test_linear_ieee_fp32(relu, K, N):
    """Within 4x of ATen's own fp32 error against fp64: only the summation order differs (a
    bf16 or tf32 math mode would be 100-10000x off)."""
    torch.manual_seed(0)
    x = torch.randn(B, K, requires_grad=True)
    w = (torch.randn(N, K) / K**0.5).requires_grad_(True)
    b = torch.randn(N, requires_grad=True)
    g = torch.randn(B, N)
    out = F.linear(x, w, b, "relu" if relu else "none")
    got = [out, *_grads(out, (x, w, b), g)]
    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = TF.linear(xd, wd, bd)
    ref = ref.relu() if relu else ref
    truth = [ref, *_grads(ref, (xd, wd, bd), g.double())]
    aten = TF.linear(x, w, b)
    aten = aten.relu() if relu else aten
    same = [aten, *_grads(aten, (x, w, b), g)]
    for name, o, t, s in zip(["out", "gx", "gw", "gb"], got, truth, same):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, s, msg=name)
        assert _rel(o, t) <= 4 * _rel(s, t), name


@pytest.mark.parametrize("rows", [1, 31, 32, 67])
@pytest.mark.parametrize("norm", ["none", "batch_norm", "layer_norm"])
def test_run_mlp_equals_the_modules(rows, norm):
    """run_mlp fuses each Linear with its ReLU; the result equals running the modules."""
    torch.manual_seed(0)
    seq, _ = mlp(13, [24, 8], dropout=0.0, batch_norm=norm == "batch_norm",
                 layer_norm=norm == "layer_norm")
    seq.eval()
    x = torch.randn(rows, 13, requires_grad=True)
    out = run_mlp(seq, x)
    ref = seq(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    params = [x, *seq.parameters()]
    for a, e in zip(_grads(out, params, g), _grads(ref, params, g)):
        torch.testing.assert_close(a, e)


@pytest.fixture(scope="module")
def synth():
    return tower_batch()


@pytest.mark.parametrize("key", sorted(CASES))
def test_model_step_same_with_and_without_onednn(synth, key, monkeypatch):
    schema, batch = synth
    name, kw = CASES[key]
    torch.manual_seed(0)
    model = build_model(name, schema, embedding_dim=8, **kw).train()
    ref = copy.deepcopy(model)
    logits = model(batch)
    model.loss(logits, batch.labels).backward()
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    logits_ref = ref(batch)
    ref.loss(logits_ref, batch.labels).backward()
    torch.testing.assert_close(logits, logits_ref)
    named = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if p.grad is None:
            assert named[n].grad is None, n
            continue
        torch.testing.assert_close(p.grad, named[n].grad, msg=n)
    torch.testing.assert_close(model.lookup.ebc.weight, ref.lookup.ebc.weight)
