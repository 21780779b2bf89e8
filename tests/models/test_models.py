# SPDX-License-Identifier: Apache-2.0
"""Every model: forward/backward on a small synthetic batch, the fused embedding update, and the
lookup paths (native multi-table vs global one-table, ragged shared bags)."""
from __future__ import annotations

import math

import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast.data.schema import Schema
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.models.base import SparseLookup
from adrec_fast.models.registry import build_model, model_names

B = 96


@pytest.fixture(scope="module")
def synth():
    gen = SyntheticCTR(n_rows=2000, seed=3, n_sparse=5, n_dense=3, max_len=6,
                       max_cardinality=60, n_users=40, n_items=50)
    schema = gen.schema()
    batch = next(gen.batches(B, n=B))
    return schema, batch


def _touched(lookup: SparseLookup, batch) -> torch.Tensor:
    """[N_total] bool: rows this batch reads through ``lookup``."""
    ebc = lookup.ebc
    n = int(ebc.table_offsets[-1])
    lengths = batch.offsets[1:] - batch.offsets[:-1]
    base = lookup.bag_base.repeat_interleave(batch.batch_size)
    rows = [batch.indices + torch.repeat_interleave(base, lengths)]
    for s, b in zip(lookup.sequences, lookup.seq_base):
        rows.append(batch.seq_indices[s] + b)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.cat(rows)] = True
    return mask


def test_registry_names():
    assert set(model_names()) >= {"lr", "fm", "deepfm", "dcnv2", "dlrm", "din"}


@pytest.mark.parametrize("name", ["lr", "fm", "deepfm", "dcnv2", "dlrm", "din"])
def test_forward_backward(name, synth):
    schema, batch = synth
    model = build_model(name, schema, embedding_dim=8)
    model.train()
    lookups = model.fused_lookups()
    assert lookups, "every model embeds through a fused lookup"
    before = [lk.ebc.weight.clone() for lk in lookups]
    logits = model(batch)
    assert logits.shape == (B,)
    assert torch.isfinite(logits).all()
    loss = model.loss(logits, batch.labels)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    dense = model.dense_parameters()
    assert dense, "every model has dense parameters"
    for p in dense:
        assert p.grad is not None, "a dense parameter got no gradient"
        assert torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in dense)
    for lk, w0 in zip(lookups, before):
        # fused update: the table has no .grad, touched rows move, the others do not
        assert lk.ebc.weight.grad is None
        changed = (lk.ebc.weight != w0).any(dim=1)
        touched = _touched(lk, batch)
        assert not (changed & ~touched).any(), "an untouched row changed"
        assert changed.any(), "no embedding row was updated"
        if lk.ebc.state.numel():
            assert (lk.ebc.state[~touched] == 0).all()
            assert (lk.ebc.state[touched] >= 0).all()


@pytest.mark.parametrize("name", ["fm", "dcnv2", "din"])
def test_predict_eval_mode_and_no_update(name, synth):
    schema, batch = synth
    model = build_model(name, schema, embedding_dim=8)
    model.train()
    w0 = model.lookup.ebc.weight.clone()
    p = model.predict(batch)
    assert model.training, "predict restores the training flag"
    assert p.shape == (B,) and ((p > 0) & (p < 1)).all()
    torch.testing.assert_close(p, torch.sigmoid(model.eval()(batch)))
    assert torch.equal(model.lookup.ebc.weight, w0), "inference must not update embeddings"


def test_config_rebuilds_same_architecture(synth):
    schema, _ = synth
    model = build_model("dcnv2", schema, embedding_dim=4, cross_layers=2, hidden=(16,),
                        structure="stacked")
    cfg = dict(model.config)
    name = cfg.pop("name")
    again = build_model(name, schema, **cfg)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in again.state_dict().items()}


def test_bad_arguments(synth):
    schema, _ = synth
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope", schema)
    with pytest.raises(ValueError, match="structure"):
        build_model("dcnv2", schema, structure="sideways")
    with pytest.raises(TypeError, match="takes no argument"):
        build_model("fm", schema, hidden=(8,))
    with pytest.raises(ValueError, match="embedding_optimizer"):
        build_model("fm", schema, embedding_optimizer="adam")
    flat = Schema([{"name": "a", "type": "categorical", "vocabulary": ["x", "y"]}])
    with pytest.raises(ValueError, match="not a sequence field"):
        build_model("din", flat, sequences=["a"])
    with pytest.raises(ValueError, match="not fitted"):
        build_model("fm", Schema([{"name": "a", "type": "categorical"}]))


def test_global_path_matches_native(synth):
    schema, batch = synth
    lk = SparseLookup(schema, 8).eval()
    assert lk.native
    emb_native, _ = lk(batch)
    lk.native = False
    emb_global, keys = lk(batch)
    torch.testing.assert_close(emb_global, emb_native)
    assert keys == {}


def test_sequence_keys_are_rows_of_the_shared_table(synth):
    schema, batch = synth
    lk = SparseLookup(schema, 8, sequences=["hist"]).eval()
    emb, keys = lk(batch)
    item = schema.table_of("item")
    base = int(lk.ebc.table_offsets[item])
    torch.testing.assert_close(keys["hist"], lk.ebc.weight[batch.seq_indices["hist"] + base])
    assert emb.shape == (B, lk.num_bags, 8)


def test_ragged_shared_bags():
    """A multi-valued field sharing another field's table: global path with ragged bags."""
    schema = Schema([
        {"name": "item", "type": "categorical"},
        {"name": "tags", "type": "multi_categorical", "share_with": "item", "max_len": 4},
        {"name": "x", "type": "dense", "transform": "standardize"},
    ])
    rows = {"item": ["a", "b", "c", "a"], "tags": ["a|b", "", "c|c|b", "b"],
            "x": [1.0, 2.0, 3.0, 4.0], "label": [1, 0, 1, 0]}
    schema.fit(rows)
    batch = schema.encode(rows)
    model = build_model("deepfm", schema, embedding_dim=4, embedding_optimizer="sgd")
    lk = model.lookup
    assert not lk.native
    model.eval()
    emb, _ = lk(batch)  # [4, 2, 4]
    w = lk.ebc.weight
    ids = batch.indices.tolist()
    ofs = batch.offsets.tolist()
    for t in range(2):
        for b in range(4):
            bag = ids[ofs[t * 4 + b]: ofs[t * 4 + b + 1]]
            want = w[bag].mean(0) if bag else torch.zeros(4)
            torch.testing.assert_close(emb[b, t], want)
    model.train()
    before = w.clone()
    model.loss(model(batch), batch.labels).backward()
    changed = (w != before).any(1)
    assert not changed[[i for i in range(w.shape[0]) if i not in set(ids)]].any()


def test_sparse_parameter_mode(synth):
    """embedding_optimizer='none': the table is a Parameter with a sparse gradient."""
    schema, batch = synth
    model = build_model("fm", schema, embedding_dim=8, embedding_optimizer="none")
    sparse = model.sparse_parameters()
    assert len(sparse) == 2
    assert all(id(p) not in {id(q) for q in sparse} for p in model.dense_parameters())
    model.loss(model(batch), batch.labels).backward()
    assert sparse[0].grad is not None and sparse[0].grad.is_sparse


@pytest.mark.parametrize("name", ["lr", "fm", "deepfm", "dcnv2", "dlrm", "din"])
@pytest.mark.parametrize("tower", [{}, {"batch_norm": True, "dropout": 0.2}])
def test_empty_batch_gives_empty_logits(name, tower, synth):
    """A batch of 0 rows (the tail of an exhausted stream, an empty file's predict) runs the
    forward in training and eval mode and gives [0] logits, not a shape error."""
    schema, batch = synth
    kw = tower if name in ("deepfm", "dcnv2", "dlrm", "din") else {}
    torch.manual_seed(0)
    model = build_model(name, schema, embedding_dim=4, **kw)
    empty = batch.slice(7, 7)
    assert empty.batch_size == 0
    out = model(empty)
    assert out.shape == (0,) and out.dtype == torch.float32
    assert model.predict(empty).shape == (0,)
    one = model.predict(batch.slice(7, 8))  # and the rows around it are unaffected
    assert one.shape == (1,) and torch.isfinite(one).all()
