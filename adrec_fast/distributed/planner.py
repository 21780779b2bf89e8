# SPDX-License-Identifier: Apache-2.0
"""Table-wise sharding plan: which rank owns each embedding table.

A table costs its owner memory (its rows) and work plus traffic per step (the ids looked up in
it). The planner gives each table the cost ``rows_t / sum(rows) + access_t / sum(access)`` (its
share of the memory plus its share of the lookups) and assigns tables greedily, costliest first,
to the rank with the least cost so far (longest-processing-time first; ties go to the lower
table index and the lower rank, so every rank computes the same plan).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardingPlan:
    """``owner[t]``: the rank that holds table t; the inputs the plan was made from."""

    owner: tuple[int, ...]
    world: int
    rows: tuple[int, ...]
    access: tuple[float, ...]
    embedding_dim: int

    def tables_of(self, rank: int) -> list[int]:
        """The tables rank ``rank`` owns, in table order."""
        return [t for t, r in enumerate(self.owner) if r == rank]

    def estimate(self) -> list[dict]:
        """Per rank: tables, rows, bytes held (fp32 rows + one float of row-wise Adagrad state
        per row), ids looked up per step, and the planner's cost (1.0 = a fair share)."""
        total_rows = sum(self.rows) or 1
        total_access = sum(self.access) or 1.0
        out = []
        for r in range(self.world):
            ts = self.tables_of(r)
            rows = sum(self.rows[t] for t in ts)
            access = sum(self.access[t] for t in ts)
            cost = rows / total_rows + access / total_access
            out.append({"rank": r, "tables": ts, "rows": rows,
                        "bytes": rows * (self.embedding_dim + 1) * 4,
                        "ids_per_step": access, "cost": cost * self.world / 2})
        return out

    def report(self) -> str:
        """The estimate as a few lines of text (what the planner says when a run starts)."""
        lines = [f"sharding plan: {len(self.owner)} tables table-wise over {self.world} ranks"]
        for e in self.estimate():
            lines.append(f"  rank {e['rank']}: {len(e['tables'])} tables, {e['rows']:,} rows, "
                         f"{e['bytes'] / 2**20:.1f} MiB, {e['ids_per_step']:,.0f} ids/step, "
                         f"load {e['cost']:.2f} (1.00 = fair share)")
        return "\n".join(lines)


def access_from_batch(batch, num_tables: int) -> list[float]:
    """Ids per step of each table, measured on one sample batch (TBE layout: ``offsets``
    [T*B+1]); the planner's usual access estimate."""
    offsets = batch.offsets
    B = (offsets.numel() - 1) // num_tables
    bounds = offsets[torch.arange(0, num_tables * B + 1, B)]  # [T+1] nnz at each table start
    return [float(v) for v in (bounds[1:] - bounds[:-1]).tolist()]


def plan_tables(num_embeddings: Sequence[int], world: int, embedding_dim: int,
                access: Sequence[float] | None = None) -> ShardingPlan:
    """Assign each table to one of ``world`` ranks (see the module docstring).

    ``access``: ids looked up per step in each table (``access_from_batch``); None counts every
    table alike. A rank may get no table when there are fewer tables than ranks.
    """
    rows = tuple(int(n) for n in num_embeddings)
    if not rows:
        raise ValueError("plan_tables: no tables to place")
    if any(n <= 0 for n in rows):
        raise ValueError(f"plan_tables: every table needs >= 1 row, got {list(rows)}")
    if world < 1:
        raise ValueError(f"plan_tables: world must be >= 1, got {world}")
    if access is None:
        access = [1.0] * len(rows)
    access = tuple(float(a) for a in access)
    if len(access) != len(rows):
        raise ValueError(f"plan_tables: access has {len(access)} entries for {len(rows)} tables")
    if any(not a >= 0 for a in access):
        raise ValueError(f"plan_tables: access estimates must be >= 0, got {list(access)}")
    total_rows, total_access = sum(rows), sum(access) or 1.0
    cost = [n / total_rows + a / total_access for n, a in zip(rows, access)]
    load = [0.0] * world
    owner = [0] * len(rows)
    for t in sorted(range(len(rows)), key=lambda t: (-cost[t], t)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[t] = r
        load[r] += cost[t]
    return ShardingPlan(tuple(owner), int(world), rows, access, int(embedding_dim))
