# SPDX-License-Identifier: Apache-2.0
"""``precision="bf16"`` (DCN-v2, DLRM): the dense tower in bf16 with fp32 parameters.

Tolerance (STYLE.md §5, flash-attn's rule): with the fp32 model as the truth, our bf16 logits
are no further off (max abs error) than 2x a plain-PyTorch twin of the same architecture run
in bf16 (same parameters and embeddings, cast) and than 2x the twin under
``torch.autocast(bfloat16)``; each dense-parameter gradient is within 2x (relative norm
error) of the worse of those two plain bf16 runs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF

import adrec_fast  # noqa: F401
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.models.registry import build_model
from adrec_fast.models import checkpoint as ckpt

B = 256

CASES = {
    "dcnv2": ("dcnv2", {"hidden": (64, 32)}),
    "dcnv2_stacked": ("dcnv2", {"hidden": (64, 32), "structure": "stacked"}),
    "dlrm": ("dlrm", {"bottom": (32,), "top": (64, 32)}),
}


@pytest.fixture(scope="module")
def synth():
    gen = SyntheticCTR(n_rows=2000, seed=7, n_sparse=6, n_dense=4, max_len=4,
                       max_cardinality=80, n_users=30, n_items=40)
    schema = gen.schema()
    return schema, next(gen.batches(B, n=B))


def _plain_mlp(seq, x):
    for m in seq:
        x = m(x)
    return x


def _plain_forward(model, emb, dense):
    """The architecture in plain PyTorch (no adrec op, no padding): DCN-v2 / DLRM logits [B]."""
    Bn = emb.shape[0]
    if model.model_name == "dcnv2":
        x0 = torch.cat([emb.reshape(Bn, -1), dense], dim=1)  # [B, K]
        x = x0
        for w, b in zip(model.cross.weights, model.cross.biases):
            x = x0 * TF.linear(x, w, b) + x
        if model.structure == "parallel":
            h = torch.cat([x, _plain_mlp(model.deep, x0)], dim=1)
        else:
            h = _plain_mlp(model.deep, x)
    else:
        d = _plain_mlp(model.bottom, dense)  # [B, D]
        fields = torch.cat([d.unsqueeze(1), emb], dim=1)  # [B, F, D]
        F_ = fields.shape[1]
        i, j = torch.triu_indices(F_, F_, offset=1)
        z = torch.bmm(fields, fields.transpose(1, 2))[:, i, j]  # [B, P]
        h = _plain_mlp(model.top, torch.cat([d, z], dim=1))
    head = model.head.head
    return (torch.matmul(h, head.weight) + head.bias).float()


def _dense_grads(model, logits, labels):
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    loss = TF.binary_cross_entropy_with_logits(logits, labels)
    return torch.autograd.grad(loss, params, allow_unused=True)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _rel(a, b):
    """Relative error in the Frobenius norm, ``|a - b| / |b|``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("key", sorted(CASES))
def test_bf16_within_twice_plain_bf16_error(synth, key):
    schema, batch = synth
    name, kw = CASES[key]
    torch.manual_seed(0)
    m32 = build_model(name, schema, embedding_dim=8, embedding_optimizer="none", **kw)
    with torch.no_grad():  # non-zero biases, so their bf16 rounding is exercised too
        for n, p in m32.named_parameters():
            if "bias" in n:
                p.normal_(0, 0.1)
    m16 = copy.deepcopy(m32)
    m16.precision = "bf16"
    plain16 = copy.deepcopy(m32).to(torch.bfloat16)  # the plain twin, every tensor in bf16
    emb, _ = m32.lookup(batch)
    emb = emb.detach()
    dense = m32.dense_input(batch)
    truth = m32(batch)  # fp32 model, adrec ops
    torch.testing.assert_close(_plain_forward(m32, emb, dense), truth)  # the plain twin is exact

    ours = m16(batch)
    assert ours.dtype == torch.float32
    plain = _plain_forward(plain16, emb.bfloat16(), dense.bfloat16())
    err, err_plain = _err(ours, truth), _err(plain, truth)
    assert err > 0, "precision='bf16' did not change the computation"
    assert err <= 2 * err_plain, (err, err_plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and no worse than 2x plain autocast
        err_autocast = _err(_plain_forward(m32, emb, dense), truth)
    assert err <= 2 * err_autocast, (err, err_autocast)

    g_truth = _dense_grads(m32, truth, batch.labels)
    g_ours = _dense_grads(m16, ours, batch.labels)
    g_plain = _dense_grads(plain16, plain, batch.labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_auto = _dense_grads(m32, _plain_forward(m32, emb, dense), batch.labels)
    names = [n for n, p in m32.named_parameters() if p.requires_grad]
    checked = 0
    for n, gt, go, gp, ga in zip(names, g_truth, g_ours, g_plain, g_auto):
        if "ebc" in n:
            continue  # sparse table gradients in this mode; the tower is what differs
        assert go.dtype == torch.float32, f"{n}: gradients of fp32 parameters stay fp32"
        # the two plain bf16 runs round differently (in stacked DCN-v2 either one can be 2-3x
        # the other on a cross weight), so the bound is 2x the worse of them, in relative norm
        worst = max(_rel(gp, gt), _rel(ga, gt))
        assert 0 < _rel(go, gt) <= 2 * worst, (n, _rel(go, gt), worst)
        checked += 1
    assert checked >= 6


def test_bf16_params_and_embeddings_stay_fp32_and_train(synth):
    schema, batch = synth
    torch.manual_seed(0)
    model = build_model("dcnv2", schema, embedding_dim=8, hidden=(32,), precision="bf16")
    opt = torch.optim.Adam(model.dense_parameters(), lr=1e-2)
    w0 = model.lookup.ebc.weight.clone()
    losses = []
    for _ in range(20):
        loss = model.loss(model(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lookup.ebc.weight.dtype == torch.float32
    assert not torch.equal(model.lookup.ebc.weight, w0), "the fused embedding update ran"
    assert losses[-1] < 0.8 * losses[0], losses


def test_precision_argument_and_checkpoint(synth, tmp_path):
    schema, batch = synth
    with pytest.raises(ValueError, match="precision must be one of"):
        build_model("dcnv2", schema, precision="fp16")
    with pytest.raises(ValueError, match="supports precision='fp32' only"):
        build_model("deepfm", schema, precision="bf16")
    assert "precision" not in build_model("dlrm", schema).config  # fp32 configs unchanged
    torch.manual_seed(0)
    model = build_model("dlrm", schema, embedding_dim=8, bottom=(16,), top=(32,),
                        precision="bf16")
    assert model.config["precision"] == "bf16"
    ckpt.save_checkpoint(tmp_path / "m", model)
    again, _, config = ckpt.load_model(tmp_path / "m")
    assert again.precision == "bf16" and config["precision"] == "bf16"
    torch.testing.assert_close(again.predict(batch), model.predict(batch))
