# SPDX-License-Identifier: Apache-2.0
"""GEMM-width padding inside DCN-v2 and DLRM (``models.base.gemm_pad``): the padded forward and
backward equal the unpadded model, the pad columns stay exactly zero, and the parameters and
state dict keep their natural (unpadded) shapes."""
from __future__ import annotations

import copy

import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast.models.base import gemm_pad, run_mlp
from adrec_fast.models.registry import build_model
from adrec_fast.nn import CrossNet

from ._towers import TOWER_CASES as CASES
from ._towers import tower_batch

B = 64

@pytest.fixture(scope="module")
def synth():
    return tower_batch()


def test_gemm_pad():
    assert [gemm_pad(k) for k in (1, 15, 16, 17, 367, 368, 429, 432)] == [15, 1, 0, 15, 1, 0, 3, 0]


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


def test_run_mlp_padded():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(13, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(B, 13)
    torch.testing.assert_close(run_mlp(seq, torch.cat([x, torch.zeros(B, 3)], 1), 3), seq(x))


@pytest.mark.parametrize("key", sorted(CASES))
def test_padded_model_matches_unpadded(synth, key):
    """One training step of the padded model equals the same model with padding switched off:
    logits, loss, every dense gradient and the fused embedding update."""
    schema, batch = synth
    name, kw = CASES[key]
    torch.manual_seed(0)
    model = build_model(name, schema, embedding_dim=8, **kw)
    assert model.pad > 0, "the fixture must exercise the padded path"
    ref = copy.deepcopy(model)
    ref.pad = 0
    model.train()
    ref.train()
    logits, logits_ref = model(batch), ref(batch)
    torch.testing.assert_close(logits, logits_ref)
    model.loss(logits, batch.labels).backward()
    ref.loss(logits_ref, batch.labels).backward()
    named_ref = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        q = named_ref[n]
        assert p.shape == q.shape, n
        if p.grad is None:
            assert q.grad is None, n
            continue
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=n: f"{n}: {m}")
    torch.testing.assert_close(model.lookup.ebc.weight, ref.lookup.ebc.weight)
    torch.testing.assert_close(model.lookup.ebc.state, ref.lookup.ebc.state)


@pytest.mark.parametrize("key", sorted(CASES))
def test_padding_invisible_in_state_dict(synth, key):
    schema, batch = synth
    name, kw = CASES[key]
    model = build_model(name, schema, embedding_dim=8, **kw)
    sd = model.state_dict()
    if name == "dcnv2":
        k = model.k
        assert k % 16 != 0
        for i in range(len(model.cross.weights)):
            assert sd[f"cross.weights.{i}"].shape == (k, k)
            assert sd[f"cross.biases.{i}"].shape == (k,)
        assert sd["deep.0.weight"].shape[1] == k
    else:
        assert sd["top.0.weight"].shape[1] == model.embedding_dim + 15  # D + 6*5/2 pairs
    again = build_model(name, schema, embedding_dim=8, **kw)
    again.load_state_dict(sd)
    torch.testing.assert_close(again.eval()(batch), model.eval()(batch))


@pytest.mark.parametrize("key", sorted(CASES))
def test_small_batches_skip_the_padding(synth, key, monkeypatch):
    """Below PAD_MIN_ROWS rows the models do not pad (the per-forward weight copies would cost
    more than they save); the result equals the padded forward, logits and gradients."""
    from adrec_fast.models import base

    schema, _ = synth
    gen_batch = next(iter(_small_batches(schema)))
    name, kw = CASES[key]
    torch.manual_seed(0)
    model = build_model(name, schema, embedding_dim=8, **kw)
    assert model.pad > 0 and gen_batch.batch_size < base.PAD_MIN_ROWS
    assert base.pad_for(model.pad, gen_batch.batch_size) == 0
    padded = copy.deepcopy(model)
    outs = []
    for m, min_rows in ((model, base.PAD_MIN_ROWS), (padded, 1)):
        monkeypatch.setattr(base, "PAD_MIN_ROWS", min_rows)
        m.train()
        logits = m(gen_batch)
        m.loss(logits, gen_batch.labels).backward()
        outs.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for n, g in outs[0][1].items():
        h = outs[1][1][n]
        assert (g is None) == (h is None), n
        if g is not None:
            torch.testing.assert_close(g, h, msg=lambda m, n=n: f"{n}: {m}")


def _small_batches(schema):
    from adrec_fast.data.synthetic import SyntheticCTR

    gen = SyntheticCTR(n_rows=1000, seed=5, n_sparse=5, n_dense=3, max_len=4,
                       max_cardinality=50, n_users=30, n_items=40)
    assert gen.schema().sparse_fields() == schema.sparse_fields()
    return gen.batches(7, n=7)
