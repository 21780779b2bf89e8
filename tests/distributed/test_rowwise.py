# SPDX-License-Identifier: Apache-2.0
"""Row-wise sharding: the planner's choice and cuts, and two gloo ranks against one process
(``_rowwise_worker``: the collection's outputs, tables and optimizer state step by step; a
row-wise checkpoint reloaded onto two ranks table-wise and row-wise; ``GlobalBatchNorm`` in the
same launch), then the same checkpoint in this one process with ``load_model`` and a one-rank
``load_sharded``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adrec_fast.distributed import plan_tables

from .test_two_ranks import _free_port, one_rank  # noqa: F401 - one_rank is a fixture

REPO = Path(__file__).resolve().parents[2]


def test_planner_splits_a_table_above_a_fair_share_at_equal_cost():
    rows = [10_000, 50, 50, 50]
    hot = torch.zeros(10_000, dtype=torch.float64)
    hot[:100] = 100.0  # Zipf-like: the first rows (the most frequent values) take the lookups
    hot[100:] = 0.1
    row_access = [hot, torch.ones(50), torch.ones(50), torch.ones(50)]
    plan = plan_tables(rows, 2, 8, row_access=row_access)
    assert plan == plan_tables(rows, 2, 8, row_access=row_access)  # deterministic
    assert plan.is_row_wise(0) and plan.owner[0] == -1
    assert not any(plan.is_row_wise(t) for t in (1, 2, 3))
    b = plan.bounds[0]
    assert b[0] == 0 and b[-1] == 10_000 and b[0] <= b[1] <= b[2]
    # equal cost, not equal rows: the cut moves towards the hot rows, so rank 0 holds fewer
    # rows than rank 1 but about as many lookups
    assert b[1] < 5_000
    est = plan.estimate()
    assert sum(e["rows"] for e in est) == sum(rows)
    assert sum(e["ids_per_step"] for e in est) == pytest.approx(sum(plan.access))
    assert all(abs(e["cost"] - 1.0) < 0.05 for e in est), est
    assert all(e["exchange_sent_bytes"] > 0 and e["exchange_received_bytes"] > 0 for e in est)
    assert "row-wise [0]" in plan.report() and "exchange <=" in plan.report()
    # every row is held exactly once
    held = sorted((t, lo, hi) for r in range(2) for t, lo, hi in plan.blocks_of(r))
    assert [(t, lo, hi) for t, lo, hi in held if t == 0] == [(0, 0, b[1]), (0, b[1], 10_000)]
    assert plan.to_dict()["bounds"][0] == list(b)


def test_planner_modes():
    rows = [1000, 1000, 10, 10, 10, 10]
    assert plan_tables(rows, 2, 4).bounds is None  # no table above a fair share: table-wise
    always = plan_tables(rows, 2, 4, row_wise="always")
    assert all(always.is_row_wise(t) for t in range(6))
    assert plan_tables([5], 3, 4, row_wise="never").tables_of(0) == [0]
    assert plan_tables([2], 3, 4, row_wise="auto").bounds is None  # fewer rows than ranks
    assert plan_tables(rows, 1, 4, row_wise="auto").bounds is None  # one rank
    forced = plan_tables(rows, 2, 4, row_wise=[2])
    assert forced.is_row_wise(2) and not forced.is_row_wise(0)
    with pytest.raises(ValueError, match="row_wise must be one of"):
        plan_tables(rows, 2, 4, row_wise="sometimes")
    with pytest.raises(ValueError, match="names tables"):
        plan_tables(rows, 2, 4, row_wise=[6])
    with pytest.raises(ValueError, match="row_access\\[1\\] must hold 1000 counts"):
        plan_tables(rows, 2, 4, row_access=[None, torch.ones(3), None, None, None, None])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("rowwise")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         "-m", "tests.distributed._rowwise_worker", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_rowwise_equals_one_process_and_round_trips_on_two_ranks(ranks):
    _, results = ranks
    for r, res in enumerate(results):
        assert res["errors"] == [], f"rank {r}: {res['errors']}"


def test_rowwise_checkpoint_loads_in_one_process(ranks, one_rank):  # noqa: F811
    from adrec_fast.distributed import load_sharded
    from adrec_fast.models.checkpoint import load_model

    out, _ = ranks
    saved = torch.load(out / "saved_tables.pt")
    doc = json.loads((out / "ckpt" / "checkpoint.json").read_text())
    bounds = doc["distributed"]["plans"]["lookup.ebc"]["bounds"]
    assert [tuple(bounds[t]) for t in saved["row_wise"]] == [tuple(b) for b in saved["bounds"]]
    model, _, _ = load_model(out / "ckpt")
    torch.testing.assert_close(model.lookup.ebc.weight, saved["weight"])
    torch.testing.assert_close(model.lookup.ebc.state, saved["state"])
    resharded, _, _ = load_sharded(out / "ckpt", one_rank)
    weight, state = resharded.lookup.ebc.gather()
    torch.testing.assert_close(weight, saved["weight"])
    torch.testing.assert_close(state, saved["state"])
