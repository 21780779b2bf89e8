# SPDX-License-Identifier: Apache-2.0
"""Widths that are not a multiple of 16 in DCN-v2 and DLRM. The models pass natural widths;
``adrec::linear`` pads K itself where its engine needs it (ATen), so parameters and the state
dict keep their natural shapes. ``CrossNet`` still accepts an input with trailing zero columns,
and those stay zero."""
from __future__ import annotations

import pytest
import torch

import adrec_fast  # noqa: F401
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
