# SPDX-License-Identifier: Apache-2.0
"""A first-order dynamic table that follows its model's embedding table (``follow``): it takes
the rows of the embedding lookup's call instead of probing the map again, and every answer is
the one its own map gives (logits, first-order values per key, eval reads, checkpoints)."""
from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast.data.schema import Schema
from adrec_fast.models.checkpoint import load_model, save_checkpoint
from adrec_fast.models.registry import build_model
from adrec_fast.nn.dynamic_table import DynamicEmbedding
from adrec_fast.optim import FusedRowwiseAdagrad

ITEMS = [f"i{i}" for i in range(9)]


def _schema(mixed: bool = False) -> Schema:
    user = ({"vocab": "build", "vocabulary": [f"u{i}" for i in range(5)]} if mixed
            else {"vocab": "dynamic"})
    return Schema([
        {"name": "user", "type": "categorical", **user},
        {"name": "item", "type": "categorical", "vocab": "dynamic"},
        {"name": "tags", "type": "multi_categorical", "max_len": 3, "vocab": "dynamic"},
        {"name": "hist", "type": "multi_categorical", "sequence": True, "share_with": "item",
         "max_len": 5},
        {"name": "price", "type": "dense"},
    ])


def _rows(n: int, seed: int, ragged: bool = False, hist_only: str | None = None) -> pa.Table:
    """Few values (duplicate keys in every batch), histories of 0-5 items (empty ones
    included); ``ragged``: multi-valued tags, else one tag per row; ``hist_only``: an item
    that appears in histories only."""
    rng = np.random.default_rng(seed)
    items = [ITEMS[j] for j in rng.integers(0, len(ITEMS), n)]
    hist = ["|".join(ITEMS[j] for j in rng.integers(0, len(ITEMS), int(rng.integers(0, 6))))
            for _ in range(n)]
    if hist_only is not None:
        hist = [h + ("|" if h else "") + hist_only if i % 2 else h for i, h in enumerate(hist)]
    tags = (["|".join(f"t{j}" for j in rng.integers(0, 4, int(rng.integers(0, 4))))
             for _ in range(n)] if ragged else [f"t{j}" for j in rng.integers(0, 4, n)])
    return pa.table({"user": [f"u{j}" for j in rng.integers(0, 5, n)], "item": items,
                     "tags": tags, "hist": hist, "price": rng.normal(size=n),
                     "label": rng.integers(0, 2, n)})


def _models(schema: Schema, **kw):
    """(new: the first-order table follows the embedding table, old: it has its own map),
    the same weights."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model("din", schema, embedding_dim=4, embedding_l2=0.0,
                                  hidden=[8], **kw))
    new, old = models
    old.linear = old._make_linear()  # zero-initialised, no draw: the same start
    return new, old


def _step(model, batch, opt, lr=0.05):
    for c in model.embedding_collections():
        c.optimizer.lr = lr
    model.train()
    opt.zero_grad()
    logits = model(batch)
    model.loss(logits, batch.labels).backward()
    opt.step()
    return logits.detach()


def _first_order(model, keys: torch.Tensor) -> torch.Tensor:
    """[n] the first-order value each key reads (eval: row 0 for a key the table lacks)."""
    d = model.linear.dyn
    return d.weight[d.rows(keys)].view(-1)


def _train_both(new, old, batches):
    on = torch.optim.SGD(new.dense_parameters(), lr=0.05)
    oo = torch.optim.SGD(old.dense_parameters(), lr=0.05)
    for b in batches:
        a, c = _step(new, b, on), _step(old, b, oo)
        assert torch.equal(a, c)


@pytest.mark.parametrize("ragged", [False, True])
def test_follower_answers_as_its_own_map(ragged):
    schema = _schema()
    new, old = _models(schema)
    assert new.linear.dyn._sharing and not old.linear.dyn._sharing
    hist_only = "h-only"  # a history item: the leader's map holds it, the first-order not
    data = [_rows(n, s, ragged, hist_only) for s, n in enumerate([16, 1, 9, 33, 16])]
    batches = [schema.encode(t) for t in data]
    _train_both(new, old, batches)
    assert new.linear.dyn._sharing, "the embedding lookup's rows were taken every step"
    assert new.linear.dyn.num_keys == old.linear.dyn.num_keys
    assert new.lookup.dyn.num_keys > new.linear.dyn.num_keys  # histories hold more keys
    keys = torch.cat([b.indices for b in batches] + [b.seq_indices["hist"] for b in batches])
    keys = torch.cat([keys.unique(), torch.tensor([12345])])  # and a key never seen
    new.eval(), old.eval()
    with torch.no_grad():
        assert torch.equal(_first_order(new, keys), _first_order(old, keys))
        test = schema.encode(_rows(20, 99, ragged, hist_only))
        assert torch.equal(new(test), old(test))
    # its first sighting as a target: a fresh zero row in both, then trained alike
    tail = [schema.encode(_rows(8, 50 + s, ragged).set_column(
        1, "item", pa.array([hist_only] * 8))) for s in range(2)]
    _train_both(new, old, tail)
    new.eval(), old.eval()
    with torch.no_grad():
        assert torch.equal(_first_order(new, keys), _first_order(old, keys))
        assert torch.equal(new(test), old(test))


def test_history_only_key_reads_row_zero():
    schema = _schema()
    new, old = _models(schema)
    b = schema.encode(_rows(8, 1, hist_only="h-only"))
    _train_both(new, old, [b])
    key = schema.encode(_rows(1, 0).set_column(1, "item", pa.array(["h-only"]))).indices
    item_key = key[1:2]  # bags are table-major: user, item, tags
    assert int(new.lookup.dyn.rows(item_key)) > 0  # the embedding table holds it
    assert int(new.linear.dyn.rows(item_key)) == 0  # the first-order table does not
    assert int(old.linear.dyn.rows(item_key)) == 0


def test_checkpoint_and_copy_keep_following(tmp_path):
    schema = _schema()
    new, old = _models(schema)
    _train_both(new, old, [schema.encode(_rows(16, s, hist_only="h")) for s in range(3)])
    save_checkpoint(tmp_path / "new", new)
    save_checkpoint(tmp_path / "old", old)
    a, _, _ = load_model(tmp_path / "new")
    # an own-map checkpoint loads into a follower (which shares only if its rows agree)
    b, _, _ = load_model(tmp_path / "old")
    c = copy.deepcopy(new)
    assert a.linear.dyn._sharing and c.linear.dyn._sharing
    assert c.linear.dyn._lead is c.lookup.dyn and c.linear.dyn._map is c.lookup.dyn._map
    assert c.linear.dyn._map is not new.linear.dyn._map
    # the follower's checkpoint lists its own keys only
    st = new.linear.dyn.state_tensors()
    assert int((st["row_counts"] > 0).sum()) == old.linear.dyn.num_keys
    more = [schema.encode(_rows(16, s, hist_only="h")) for s in (7, 8)]
    for m in (a, b, c):  # each trains on exactly as the own-map model
        _train_both(m, copy.deepcopy(old), more)
    assert a.linear.dyn._sharing and c.linear.dyn._sharing


def test_other_keys_or_options_give_an_own_map():
    schema = _schema()
    new, old = _models(schema)
    b0 = schema.encode(_rows(16, 0))
    _train_both(new, old, [b0])
    # the first-order lookup alone, on a batch the embedding lookup did not see: its own map
    b1 = schema.encode(_rows(16, 1, hist_only="z"))
    for m in (new, old):
        m.train()
        lin, _ = m.linear(b1)
        lin.sum().backward()
    assert not new.linear.dyn._sharing
    _train_both(new, old, [schema.encode(_rows(16, s)) for s in (2, 3)])
    # admission after several sightings: the tables would differ, so nothing is shared
    n2, _ = _models(schema, dynamic_tables={"min_count": 2})
    assert not n2.linear.dyn._sharing
    t = DynamicEmbedding(2, 16, init_std=0.0, optimizer=FusedRowwiseAdagrad(lr=0.1))
    with pytest.raises(TypeError, match="leader"):
        t.follow(t)


def test_mixed_schema_follows():
    schema = _schema(mixed=True)
    new, old = _models(schema)
    assert new.linear.dyn._sharing
    batches = [schema.encode(_rows(n, s, ragged=s % 2 == 1)) for s, n in enumerate([16, 5, 9])]
    _train_both(new, old, batches)
    assert new.linear.dyn._sharing


@pytest.mark.parametrize("name,kw", [("fm", {}), ("deepfm", {"hidden": [8]}),
                                     ("dcnv2", {"hidden": [8], "linear": True})])
@pytest.mark.parametrize("ragged", [False, True])
def test_first_order_models_follow_their_lookup(name, kw, ragged):
    """FM, DeepFM and DCN-v2 call their embedding lookup before the first-order one on the
    same bags: the first-order table follows it, with the answers of a map of its own."""
    schema = _schema()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(name, schema, embedding_dim=4, embedding_l2=0.0, **kw))
    new, old = models
    old.linear = old._make_linear()  # zero-initialised, no draw: the same start
    assert new.linear.dyn._sharing and not old.linear.dyn._sharing
    batches = [schema.encode(_rows(n, s, ragged)) for s, n in enumerate([16, 1, 9, 33])]
    _train_both(new, old, batches)
    assert new.linear.dyn._sharing, "the embedding lookup's rows were taken every step"
    assert new.linear.dyn.num_keys == old.linear.dyn.num_keys
    keys = torch.cat([torch.cat([b.indices for b in batches]).unique(), torch.tensor([12345])])
    new.eval(), old.eval()
    with torch.no_grad():
        assert torch.equal(_first_order(new, keys), _first_order(old, keys))
        test = schema.encode(_rows(20, 99, ragged))
        assert torch.equal(new(test), old(test))
