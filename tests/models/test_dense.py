# SPDX-License-Identifier: Apache-2.0
"""The oneDNN fp32 path of the model towers (``models._dense``) against ATen and an fp64 truth:
same math, IEEE fp32 accuracy (no reduced-precision mode), and whole models equal with the path
switched on and off."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF

from adrec_fast.models import _dense
from adrec_fast.models.registry import build_model

from ._towers import TOWER_CASES as CASES
from ._towers import tower_batch

pytestmark = pytest.mark.skipif(_dense._LP is None or not torch.backends.mkldnn.is_available(),
                                reason="torch built without oneDNN")

B = 67  # odd batch: no multiple-of-16 luck


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _rel(a, b):
    """Relative error in the Frobenius norm."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("K,N", [(13, 512), (33, 17), (432, 64)])
def test_linear_matches_fp64(relu, K, N):
    torch.manual_seed(0)
    x = torch.randn(B, K, requires_grad=True)
    w = (torch.randn(N, K) / K**0.5).requires_grad_(True)
    b = torch.randn(N, requires_grad=True)
    g = torch.randn(B, N)
    assert _dense.enabled(x)
    out = _dense.linear(x, w, b, relu)
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
        # IEEE fp32: within 4x of ATen's own fp32 error against fp64 (only the summation order
        # differs; a bf16 or tf32 math mode would be 100-10000x off)
        assert _rel(o, t) <= 4 * _rel(s, t), name


def test_linear_without_bias_and_strided_weight():
    torch.manual_seed(0)
    x = torch.randn(B, 20, requires_grad=True)
    w_full = torch.randn(30, 24, requires_grad=True)
    w = w_full[:, :20]  # a strided view, as padding/slicing produce
    out = _dense.linear(x, w, None)
    torch.testing.assert_close(out, x @ w.t())
    gx, gw = _grads(out, (x, w_full), torch.ones(B, 30))
    ex, ew = _grads(x @ w.t(), (x, w_full), torch.ones(B, 30))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)


def test_enabled_only_for_fp32_cpu_batches():
    x = torch.randn(_dense.MIN_ROWS, 8)
    assert _dense.enabled(x)
    assert not _dense.enabled(x.double())
    assert not _dense.enabled(x.bfloat16())
    assert not _dense.enabled(torch.randn(0, 8))
    # small batches (one serving request) stay on ATen, where oneDNN's per-call cost dominates
    assert not _dense.enabled(torch.randn(1, 8))
    assert not _dense.enabled(torch.randn(_dense.MIN_ROWS - 1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _dense.enabled(x)


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
    monkeypatch.setattr(_dense, "ONEDNN", False)
    logits_ref = ref(batch)
    torch.testing.assert_close(logits, logits_ref)
    ref.loss(logits_ref, batch.labels).backward()
    monkeypatch.setattr(_dense, "ONEDNN", True)
    model.loss(logits, batch.labels).backward()
    named = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if p.grad is None:
            assert named[n].grad is None, n
            continue
        torch.testing.assert_close(p.grad, named[n].grad, msg=n)
    torch.testing.assert_close(model.lookup.ebc.weight, ref.lookup.ebc.weight)
