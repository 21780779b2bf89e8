# SPDX-License-Identifier: Apache-2.0
"""Embedding L2 through the fused sparse optimizers (lazy catch-up decay), dense-tower options
(dropout, batch/layer norm, init), and their bad values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast import reference
from adrec_fast.data.schema import Schema
from adrec_fast.models.registry import build_model
from adrec_fast.nn import EmbeddingBagCollection
from adrec_fast.optim import FusedRowwiseAdagrad, FusedSGD

TABLES = [6, 9, 4]
D = 3


def _steps(seed=0, n=12):
    """Batches (indices, offsets) over three tables with gaps: table rows that no batch touches
    for several steps, a multi-id bag, an empty bag and repeated rows; a varying lr per step."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(n):
        B = 3
        lens = torch.randint(0, 3, (len(TABLES) * B,), generator=g)
        lens[0] = 2
        idx = []
        for k, L in enumerate(lens.tolist()):
            t = k // B
            hi = TABLES[t] if s % 4 == 0 else max(TABLES[t] // 2, 1)  # upper rows: gaps
            idx += torch.randint(0, hi, (L,), generator=g).tolist()
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        grad = torch.randn(B, len(TABLES) * D, generator=g)
        lr = 0.05 * (1 + 0.5 * math.sin(s))  # a schedule
        out.append((torch.tensor(idx, dtype=torch.long), offsets, grad, lr))
    return out


def _tofs():
    return torch.tensor([0] + np.cumsum(TABLES).tolist(), dtype=torch.long)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("renorm", [1e-4, 0.9])
def test_lazy_decay_equals_dense_l2_for_sgd(pooling, renorm, monkeypatch):
    """Lazy decay == dense SGD on loss + lambda/2 ||W||^2 (the regulariser's gradient taken by
    autograd over the whole table), step by step, with rows untouched for several steps and a
    varying lr; renorm=0.9 folds the scale into the table every few steps."""
    from adrec_fast.nn import embedding_bag as ebm

    monkeypatch.setattr(ebm, "L2_RENORM", renorm)
    lam = 0.7
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(TABLES, D, pooling=pooling, optimizer=FusedSGD(lr=0.05),
                                 init_std=0.5, l2=lam)
    W = ebc.weight.detach().clone().double().requires_grad_(True)
    tofs = _tofs()
    for s, (idx, ofs, grad, lr) in enumerate(_steps()):
        ebc.optimizer.lr = lr
        out = ebc(idx, ofs)  # the rows it reads are caught up first
        ref = reference.embedding_bag(W, tofs, idx, ofs, None, pooling)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        (out * grad).sum().backward()
        loss = (ref * grad.double()).sum() + lam / 2 * W.pow(2).sum()
        (gW,) = torch.autograd.grad(loss, W)
        with torch.no_grad():
            W -= lr * gW
        if s == 5:  # a state_dict mid-run flushes; training continues exactly after it
            sd = ebc.state_dict()
            torch.testing.assert_close(sd["weight"].double(), W.detach(), rtol=1e-5, atol=1e-6)
    ebc.eval()  # an eval-mode lookup sees every row up to date
    idx = torch.arange(sum(TABLES)) - torch.repeat_interleave(tofs[:-1], torch.tensor(TABLES))
    ofs = torch.tensor([0] + np.cumsum(TABLES).tolist())  # one bag per table: all its rows
    torch.testing.assert_close(ebc(idx, ofs).double(),
                               reference.embedding_bag(W.detach(), tofs, idx, ofs, None, pooling),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ebc.weight.double(), W.detach(), rtol=1e-5, atol=1e-6)


def test_lazy_decay_rowwise_adagrad_is_decoupled_decay():
    """Row-wise Adagrad with lazy L2: every row is multiplied by (1 - lr*lambda) every step and
    the touched ones take the Adagrad step of the loss gradient (state without the L2 term)."""
    lam, eps = 0.4, 1e-8
    torch.manual_seed(1)
    ebc = EmbeddingBagCollection(TABLES, D, optimizer=FusedRowwiseAdagrad(lr=0.05, eps=eps),
                                 init_std=0.5, l2=lam)
    W = ebc.weight.clone().double()
    state = torch.zeros(W.size(0), dtype=torch.float64)
    tofs = _tofs()
    for idx, ofs, grad, lr in _steps(3):
        ebc.optimizer.lr = lr
        Wg = W.clone().requires_grad_(True)
        ref = reference.embedding_bag(Wg, tofs, idx, ofs, None, "sum")
        (gW,) = torch.autograd.grad((ref * grad.double()).sum(), Wg)
        ebc(idx, ofs).mul(grad).sum().backward()
        touched = gW.abs().sum(1) > 0
        state[touched] += gW[touched].pow(2).mean(1)
        step = torch.zeros_like(W)
        step[touched] = gW[touched] / (state[touched].sqrt() + eps)[:, None]
        W = (1 - lr * lam) * W - lr * step
    torch.testing.assert_close(ebc.state_dict()["weight"].double(), W, rtol=1e-5, atol=1e-6)


def test_touched_mode_decays_only_looked_up_rows():
    lam = 0.5
    torch.manual_seed(2)
    ebc = EmbeddingBagCollection([5], 2, optimizer=FusedSGD(lr=0.1), init_std=1.0, l2=lam,
                                 l2_mode="touched")
    before = ebc.weight.clone()
    idx, ofs = torch.tensor([1, 3]), torch.tensor([0, 1, 2])
    out = ebc(idx, ofs)
    torch.testing.assert_close(out, before[[1, 3]] * (1 - 0.1 * lam))  # decayed, then read
    g = torch.randn(2, 2)
    (out * g).sum().backward()
    want = before.clone()
    want[[1, 3]] = before[[1, 3]] * (1 - 0.1 * lam) - 0.1 * g
    torch.testing.assert_close(ebc.weight, want)
    untouched = [0, 2, 4]
    torch.testing.assert_close(ebc.state_dict()["weight"][untouched], before[untouched])


def test_model_embedding_l2_on_global_path_and_linear(synth_schema):
    """A model with a shared-table schema (global lookup path) and first-order weights: every
    table gets the L2; a checkpoint round trip keeps the decayed weights."""
    schema, batch = synth_schema
    torch.manual_seed(0)
    m = build_model("deepfm", schema, embedding_dim=4, hidden=(8,), embedding_l2=0.3)
    ebcs = m.embedding_collections()
    assert len(ebcs) == 2 and all(c.l2 == 0.3 for c in ebcs)
    assert m.config["embedding_l2"] == 0.3
    m.train()
    m.loss(m(batch), batch.labels).backward()
    assert all(c.l2_scale < 1 for c in ebcs)  # the step's decay is pending in the scale
    sd = m.state_dict()
    assert all(c.l2_scale == 1 for c in ebcs)
    m2 = build_model(**m.config, schema=schema)
    m2.load_state_dict(sd)
    torch.testing.assert_close(m2.eval()(batch), m.eval()(batch))


@pytest.fixture(scope="module")
def synth_schema():
    from adrec_fast.data.synthetic import SyntheticCTR

    gen = SyntheticCTR(n_rows=512, seed=3, n_sparse=4, n_dense=2, max_len=5,
                       max_cardinality=50, n_users=30, n_items=40)
    schema = gen.schema()
    d = schema.to_dict()
    for f in d["fields"]:
        if f["name"] == "hist":
            f["sequence"] = False  # a pooled multi-valued field sharing the item table
    schema = Schema.from_dict(d)
    return schema, schema.encode(gen.generate(256))


@pytest.mark.parametrize("name,kw", [
    ("deepfm", {"dropout": 0.5, "batch_norm": True}),
    ("dcnv2", {"dropout": 0.5, "layer_norm": True}),
    ("dlrm", {"dropout": 0.5, "batch_norm": True}),
    ("din", {"dropout": 0.5}),
])
def test_dropout_off_in_eval(synth_schema, name, kw):
    """Train mode: dropout makes two forwards differ; eval mode / predict: deterministic and
    equal to the forward with the dropout layers removed."""
    schema, batch = synth_schema
    torch.manual_seed(0)
    m = build_model(name, schema, embedding_dim=4, **({"hidden": (16, 8)} if name != "dlrm"
                                                       else {"top": (16, 8)}), **kw,
                    embedding_optimizer="sgd")
    m.train()
    with torch.no_grad():
        a, b = m(batch), m(batch)
    assert not torch.equal(a, b)
    p1, p2 = m.predict(batch), m.predict(batch)
    assert torch.equal(p1, p2) and m.training  # predict switches back to train mode
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    m.eval()
    torch.testing.assert_close(torch.sigmoid(m(batch)), p1)


def test_dropout_off_in_scorer(tmp_path):
    """A model trained with dropout scores through the Scorer exactly as its eval forward."""
    from adrec_fast.serving import Scorer
    from adrec_fast.models.checkpoint import save_checkpoint

    rng = np.random.default_rng(0)
    n = 400
    raw = {"user": [f"u{i}" for i in rng.integers(0, 30, n)],
           "item": [f"i{i}" for i in rng.integers(0, 50, n)],
           "price": rng.random(n).tolist(), "label": rng.integers(0, 2, n).tolist()}
    schema = Schema([{"name": "user", "type": "categorical"},
                     {"name": "item", "type": "categorical"},
                     {"name": "price", "type": "dense", "transform": "standardize"}]).fit(raw)
    for name, kw in (("deepfm", {"hidden": (16,)}), ("dcnv2", {"hidden": (16,)}),
                     ("dlrm", {"top": (16,)})):
        torch.manual_seed(0)
        m = build_model(name, schema, embedding_dim=4, dropout=0.5, init_std=0.5, **kw)
        save_checkpoint(tmp_path / name, m.eval(), rng=False)
        sc = Scorer.load(tmp_path / name)
        user = {"user": "u1"}
        cands = {"item": ["i1", "i2", "i3"], "price": [0.1, 0.5, 0.9]}
        got = sc.score(user, cands)
        batch = schema.encode({"user": ["u1"] * 3, **cands, "label": [0, 0, 0]})
        want = m.predict(batch).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got, sc.score(user, cands))


def test_dense_init_xavier(synth_schema):
    schema, _ = synth_schema
    torch.manual_seed(0)
    m = build_model("dcnv2", schema, embedding_dim=4, hidden=(64,), dense_init="xavier",
                    init_std=1e-4)
    lin = m.deep[0]
    want = math.sqrt(2.0 / (lin.in_features + lin.out_features))
    assert lin.weight.std().item() == pytest.approx(want, rel=0.1)
    assert torch.count_nonzero(lin.bias) == 0
    assert m.config["dense_init"] == "xavier"
    emb = m.embedding_collections()[0].weight
    assert emb.std().item() == pytest.approx(1e-4, rel=0.1)


@pytest.mark.parametrize("kw,match", [
    ({"embedding_l2": -0.1}, "embedding_l2"),
    ({"embedding_l2": float("nan")}, "embedding_l2"),
    ({"embedding_l2": 0.1, "embedding_optimizer": "none"}, "fused"),
    ({"embedding_l2_mode": "eager"}, "embedding_l2_mode"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.2}, "dropout"),
    ({"batch_norm": True, "layer_norm": True}, "batch_norm or layer_norm"),
    ({"dense_init": "he"}, "dense_init"),
    ({"init_std": -1.0}, "init_std"),
])
def test_bad_options(synth_schema, kw, match):
    schema, _ = synth_schema
    with pytest.raises(ValueError, match=match):
        build_model("deepfm", schema, embedding_dim=4, hidden=(8,), **kw)


def test_lr_times_l2_too_large(synth_schema):
    ebc = EmbeddingBagCollection([4], 2, optimizer=FusedSGD(lr=2.0), l2=0.6)
    with pytest.raises(ValueError, match="lr \\* l2 must be < 1"):
        ebc(torch.tensor([0]), torch.tensor([0, 1]))


def test_din_without_sequence_is_its_fm_mlp_part(synth_schema):
    """On a schema without a behaviour sequence DIN has no attention: first order + FM + MLP,
    the same logits as DeepFM built with the same weights."""
    schema, batch = synth_schema
    torch.manual_seed(0)
    din = build_model("din", schema, embedding_dim=4, hidden=(8,))
    torch.manual_seed(0)
    dfm = build_model("deepfm", schema, embedding_dim=4, hidden=(8,))
    assert din.sequences == []
    sd = {k: v for k, v in dfm.state_dict().items() if not k.startswith("dense_linear")}
    din.load_state_dict(sd, strict=False)
    din.eval(), dfm.eval()
    with torch.no_grad():
        dfm.dense_linear.weight.zero_()
        torch.testing.assert_close(din(batch), dfm(batch))


def test_global_path_ragged_bags_summing_to_one_per_bag(synth_schema):
    """A batch whose bags are ragged but hold T*B ids in total (an empty bag in one table, two
    ids in a bag of another) is looked up by table, not as if every bag held one id."""
    from adrec_fast.data.batch import Batch

    schema, batch = synth_schema
    torch.manual_seed(0)
    m = build_model("fm", schema, embedding_dim=4, init_std=0.5).eval()
    B = 4
    small = batch.slice(0, B)
    T = small.num_bags
    lens = torch.ones(T * B, dtype=torch.long)
    t_hist = [n for n, _ in schema.sparse_fields()].index("hist")
    t_other = 0 if t_hist else 1
    lens[t_other * B] = 0  # an empty bag in one table ...
    lens[t_hist * B + 1] = 2  # ... two history items in another: still T*B ids in all
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.randint(0, c, (int(lens[t * B:(t + 1) * B].sum()),), generator=g)
                     for t, (_, c) in enumerate((n, schema.cardinality(n))
                                                for n, _ in schema.sparse_fields())])
    ragged = Batch(indices=idx, offsets=offsets, dense=small.dense, labels=small.labels,
                   vectors=small.vectors, num_bags=T)
    ebc = m.lookup.ebc
    emb, _ = m.lookup(ragged)  # [B, T, D]
    tofs = ebc.table_offsets
    bag_t = torch.tensor([t for _, t in schema.sparse_fields()])
    for t in range(T):
        for b in range(B):
            lo, hi = int(offsets[t * B + b]), int(offsets[t * B + b + 1])
            rows = idx[lo:hi] + tofs[bag_t[t]]
            want = ebc.weight[rows].mean(0) if hi > lo else torch.zeros(4)
            torch.testing.assert_close(emb[b, t], want)
