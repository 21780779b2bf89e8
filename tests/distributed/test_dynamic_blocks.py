# SPDX-License-Identifier: Apache-2.0
"""The sharded dynamic table orders each rank's keys by the blocks SparseLookup passes its
dynamic table; ``dynamic_blocks`` must name the same blocks as the lookup's own layout check,
ragged bags that hold B ids per table in total included (no ranks needed)."""
from __future__ import annotations

import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast.data.schema import Schema
from adrec_fast.distributed.dynamic import dynamic_blocks
from adrec_fast.models.base import SparseLookup
from adrec_fast.optim import FusedRowwiseAdagrad


def _lookup():
    schema = Schema([
        {"name": "a", "type": "categorical", "vocab": "dynamic"},
        {"name": "tags", "type": "multi_categorical", "max_len": 3, "vocab": "dynamic"},
        {"name": "hist", "type": "multi_categorical", "sequence": True, "share_with": "a",
         "max_len": 3},
    ])
    return schema, SparseLookup(schema, 4, FusedRowwiseAdagrad(lr=0.1), "mean", 0.5, ["hist"])


@pytest.mark.parametrize("tags,want", [
    (["v1", "v2", "v3"], [6, 3]),          # one id per bag: all bags row by row, then history
    (["v1|v2", "", "v3"], [3, 3, 3]),      # ragged, 3 ids in total: per table, then history
    (["v1|v2|v4", "", "v3|v5"], [3, 5, 3]),
])
def test_blocks_follow_the_lookup_layout(tags, want):
    schema, lk = _lookup()
    batch = schema.encode({"a": ["v0", "v1", "v5"], "tags": tags, "hist": ["v1|v2", "", "v0"]})
    calls = []
    real = lk.dyn.forward

    def spy(keys, *args, **kw):  # the lengths of the key blocks the lookup passes
        calls.append(int(keys.numel()))
        return real(keys, *args, **kw)

    lk.dyn.forward = spy
    lk.train()
    lk(batch)
    assert dynamic_blocks(lk, batch) == want
    assert sum(want) == sum(calls)
