# SPDX-License-Identifier: Apache-2.0
"""Widths that are not a multiple of 16 in DCN-v2 and DLRM. Parameters and the state dict keep
their natural shapes. DCN-v2 stores x0 at ``functional.gemm_width`` (zero columns appended, for
float32 batches from 32 rows); ``CrossNet``, ``run_mlp`` and the head take such input with
zero-padded weights, and the pad columns stay zero. ``adrec::linear`` pads K itself where its
engine needs it (ATen)."""
from __future__ import annotations

import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast import functional as AF
from adrec_fast.models.registry import build_model
from adrec_fast.nn import CrossNet

from ._towers import TOWER_CASES as CASES
from ._towers import tower_batch

B = 64


@pytest.fixture(scope="module")
def synth():
    return tower_batch()


def test_crossnet_padded_input():
    torch.manual_seed(0)
    K, P = 29, 3
    net = CrossNet(K, num_layers=3)
    with torch.no_grad():
        for b in net.biases:
            b.normal_()
    x0 = torch.randn(B, K, requires_grad=True)
    out = net(x0)  # [B, K]
    xp = torch.cat([x0, torch.zeros(B, P)], dim=1)  # [B, K + P]
    out_p = net(xp)
    assert out_p.shape == (B, K + P)
    assert torch.equal(out_p[:, K:], torch.zeros(B, P)), "pad columns must stay exactly zero"
    torch.testing.assert_close(out_p[:, :K], out)
    g = torch.randn(B, K)
    (gx,) = torch.autograd.grad(out, x0, g)
    (gx_p,) = torch.autograd.grad(out_p, x0, torch.cat([g, torch.randn(B, P)], dim=1))
    # the pad columns' incoming gradient cannot reach x0: they are products with zeros
    torch.testing.assert_close(gx_p, gx)
    with pytest.raises(ValueError, match="columns"):
        net(torch.randn(B, K - 1))


@pytest.mark.parametrize("key", sorted(CASES))
def test_state_dict_has_natural_shapes(synth, key):
    schema, batch = synth
    name, kw = CASES[key]
    model = build_model(name, schema, embedding_dim=8, **kw)
    sd = model.state_dict()
    if name == "dcnv2":
        k = model.k
        assert k % 16 != 0, "the fixture must use a width that is not a multiple of 16"
        for i in range(len(model.cross.weights)):
            assert sd[f"cross.weights.{i}"].shape == (k, k)
            assert sd[f"cross.biases.{i}"].shape == (k,)
        assert sd["deep.0.weight"].shape[1] == k
    else:
        assert sd["top.0.weight"].shape[1] == model.embedding_dim + 15  # D + 6*5/2 pairs
    again = build_model(name, schema, embedding_dim=8, **kw)
    again.load_state_dict(sd)
    torch.testing.assert_close(again.eval()(batch), model.eval()(batch))


def test_gemm_width_policy():
    """float32 from 32 rows: rounded up to a multiple of 16; other dtypes, fewer rows, widths
    already aligned and empty widths: unchanged."""
    f32 = torch.float32
    assert [AF.gemm_width(k, f32, 4096) for k in (1, 15, 16, 17, 429, 432)] == \
        [16, 16, 16, 32, 432, 432]
    assert AF.gemm_width(429, f32, 31) == 429
    assert AF.gemm_width(429, f32, 32) == 432
    assert AF.gemm_width(429, torch.bfloat16, 4096) == 429
    assert AF.gemm_width(429, torch.float64, 4096) == 429
    assert AF.gemm_width(0, f32, 4096) == 0


@pytest.mark.parametrize("key", ["dcnv2", "dcnv2_stacked", "dcnv2_bn"])
def test_dcnv2_padded_x0_matches_natural_width(synth, key, monkeypatch):
    """A DCN-v2 training step on a batch of 64 (x0 padded from 43 to 48 columns) gives the
    logits and every parameter gradient of the same step with x0 at its natural width."""
    from adrec_fast.models import zoo

    schema, batch = synth
    name, kw = CASES[key]

    def step():
        torch.manual_seed(3)
        model = build_model(name, schema, embedding_dim=8, embedding_optimizer=None, **kw)
        with torch.no_grad():
            for b in model.cross.biases:
                b.normal_()
        logits = model(batch)
        model.loss(logits, batch.labels).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                 if p.grad is not None}

    k = 5 * 8 + 3
    assert AF.gemm_width(k, torch.float32, batch.batch_size) == 48
    padded, padded_grads = step()
    monkeypatch.setattr(zoo.F, "gemm_width", lambda k, dtype, rows: k)
    natural, natural_grads = step()
    torch.testing.assert_close(padded, natural, rtol=1e-5, atol=1e-5)
    assert padded_grads.keys() == natural_grads.keys()
    assert "cross.weights.0" in padded_grads and "deep.0.weight" in padded_grads
    for n, g in natural_grads.items():
        assert padded_grads[n].shape == g.shape, n
        torch.testing.assert_close(padded_grads[n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_run_mlp_wider_input_pads_first_weight():
    """run_mlp on x with zero columns appended equals run_mlp on x; the first layer's weight
    gradient keeps its natural shape and values (float64)."""
    from adrec_fast.models.base import mlp, run_mlp

    torch.manual_seed(1)
    seq, _ = mlp(13, (7, 5))
    seq = seq.double()
    x = torch.randn(40, 13, dtype=torch.float64)
    xp = torch.cat([x, torch.zeros(40, 3, dtype=torch.float64)], dim=1)
    out = run_mlp(seq, x)
    (gw,) = torch.autograd.grad(out.sum(), seq[0].weight)
    out_p = run_mlp(seq, xp)
    (gw_p,) = torch.autograd.grad(out_p.sum(), seq[0].weight)
    torch.testing.assert_close(out_p, out)
    assert gw_p.shape == (7, 13)
    torch.testing.assert_close(gw_p, gw)
