# SPDX-License-Identifier: Apache-2.0
"""SparseLookup's pooled rows [B, T, D] against bag-by-bag pooling from the table's rows, for
the layouts it chooses between: one id per bag (row-major ids, contiguous output) and ragged
bags, including ragged bags that hold B ids per table in total (which only a check of every
bag, not of the table boundaries, tells apart from one id per bag)."""
from __future__ import annotations

import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast.data.schema import Schema
from adrec_fast.models.base import SparseLookup, one_id_per_bag
from adrec_fast.optim import FusedRowwiseAdagrad


def _schema(kind: str) -> Schema:
    vocab = ({"vocab": "dynamic"} if kind == "dynamic" else
             {"vocab": "build", "vocabulary": [f"v{i}" for i in range(6)]})
    return Schema([
        {"name": "a", "type": "categorical", **vocab},
        {"name": "tags", "type": "multi_categorical", "max_len": 3, **vocab},
        {"name": "hist", "type": "multi_categorical", "sequence": True, "share_with": "a",
         "max_len": 3},
    ])


def _expected(lookup: SparseLookup, batch) -> torch.Tensor:
    """[B, T, D]: the mean of each bag's rows (zero for an empty bag)."""
    B, T = batch.batch_size, lookup.num_bags
    out = torch.zeros(B, T, lookup.dim)
    ofs = batch.offsets.tolist()
    for t in range(T):
        for b in range(B):
            ids = batch.indices[ofs[t * B + b]:ofs[t * B + b + 1]]
            if not ids.numel():
                continue
            if lookup.dyn is not None:
                rows = lookup.dyn.weight[lookup.dyn.rows(ids)]
            else:
                rows = lookup.ebc.weight[ids + lookup.bag_base[t]]
            out[b, t] = rows.mean(0)
    return out


@pytest.mark.parametrize("kind", ["static", "dynamic"])
@pytest.mark.parametrize("tags", [["v1", "v2", "v3"],            # one id per bag
                                  ["v1|v2", "", "v3"],          # ragged, B ids in total
                                  ["v1|v2|v4", "", "v3|v5"]])   # ragged
def test_pooled_rows_match_bag_by_bag(kind, tags):
    schema = _schema(kind)
    torch.manual_seed(0)
    lk = SparseLookup(schema, 4, FusedRowwiseAdagrad(lr=0.1), "mean", 0.5, ["hist"])
    batch = schema.encode({"a": ["v0", "v1", "v5"], "tags": tags,
                           "hist": ["v1|v2", "", "v0"]})
    if kind == "dynamic":  # give every key a row first (training inserts)
        lk.train()
        lk(batch)[0].sum().backward()
    lk.eval()
    with torch.no_grad():
        emb, keys = lk(batch)
        assert emb.shape == (3, 2, 4) and emb.is_contiguous() == (tags[1] == "v2")
        torch.testing.assert_close(emb, _expected(lk, batch))
        hist = batch.seq_indices["hist"]
        rows = (lk.dyn.weight[lk.dyn.rows(hist)] if kind == "dynamic"
                else lk.ebc.weight[hist + lk.seq_base[0]])
        torch.testing.assert_close(keys["hist"], rows)


def test_one_id_per_bag_check():
    from adrec_fast.models.base import one_id_per_bag

    ids = torch.zeros(6, dtype=torch.long)
    ofs = torch.arange(7)
    assert one_id_per_bag(ids, ofs) and one_id_per_bag(ids, ofs)  # the second from its memo
    assert not one_id_per_bag(ids, torch.tensor([0, 2, 2, 3, 4, 5, 6]))  # ragged, 6 ids
    assert not one_id_per_bag(ids[:5], ofs)
    ofs[1:3] = torch.tensor([2, 2])  # edited in place: checked again
    assert not one_id_per_bag(ids, ofs)


def test_one_id_per_bag_under_inference_mode():
    """Offsets made under ``torch.inference_mode`` (a serving stack's forward) have no version
    counter: the check answers without its memo, and the lookup runs."""
    schema = _schema("static")
    torch.manual_seed(0)
    lk = SparseLookup(schema, 4, FusedRowwiseAdagrad(lr=0.1), "mean", 0.5, ["hist"]).eval()
    cols = {"a": ["v0", "v1", "v5"], "tags": ["v1", "v2", "v3"], "hist": ["v1|v2", "", "v0"]}
    want = lk(schema.encode(cols))[0].detach()
    with torch.inference_mode():
        batch = schema.encode(cols)
        assert one_id_per_bag(batch.indices, batch.offsets)
        assert one_id_per_bag(batch.indices, batch.offsets)  # a second call, same tensors
        got = lk(batch)[0]
    torch.testing.assert_close(got, want)
