# SPDX-License-Identifier: Apache-2.0
"""Sharding plan: which rank holds which rows of each embedding table, table-wise (a table on
one rank) or row-wise (a table's rows split in ranges over the ranks).

A table costs its holders memory (its rows) and work plus traffic per step (the ids looked up in
it). The planner gives each table the cost ``rows_t / sum(rows) + access_t / sum(access)`` (its
share of the memory plus its share of the lookups); a fair share for one rank is
``total / world``. A table whose cost exceeds a fair share cannot be balanced by placing it
whole, so it goes row-wise (``row_wise="auto"``, when it has at least ``world`` rows): its rows
are cut into ``world`` ranges of equal cost, counting each row's own lookups when the sample's
per-row counts are given (ids are Zipf-distributed and vocabularies sorted by count, so equal row
counts would put every hot row on rank 0). The other tables are then placed whole, costliest
first, on the rank with the least cost so far, the row-wise ranges included
(longest-processing-time first; ties go to the lower table index and the lower rank, so every
rank computes the same plan).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: ``plan_tables(row_wise=...)``: decide per table, never, always (tables with >= world rows)
ROW_WISE_MODES = ("auto", "never", "always")


@dataclass(frozen=True)
class ShardingPlan:
    """``owner[t]``: the rank that holds table t whole, or -1 when it is split row-wise;
    ``bounds[t]`` (row-wise tables; None else): ``world + 1`` row starts, rank r holding rows
    ``[bounds[t][r], bounds[t][r+1])`` of the table; ``row_share[t]``: the share of table t's
    lookups that lands on each rank (row-wise tables, from the sample; None else). ``rows``,
    ``access``, ``embedding_dim``: the inputs the plan was made from."""

    owner: tuple[int, ...]
    world: int
    rows: tuple[int, ...]
    access: tuple[float, ...]
    embedding_dim: int
    bounds: tuple | None = None
    row_share: tuple | None = None

    def is_row_wise(self, t: int) -> bool:
        return self.bounds is not None and self.bounds[t] is not None

    def blocks_of(self, rank: int) -> list[tuple[int, int, int]]:
        """(table, first row, end row) of every block of rows that ``rank`` holds, in table
        order (a table-wise table is one block of all its rows); empty ranges left out. A rank
        stacks its blocks in this order in its shard."""
        out = []
        for t, n in enumerate(self.rows):
            if self.is_row_wise(t):
                lo, hi = self.bounds[t][rank], self.bounds[t][rank + 1]
                if hi > lo:
                    out.append((t, lo, hi))
            elif self.owner[t] == rank:
                out.append((t, 0, n))
        return out

    def tables_of(self, rank: int) -> list[int]:
        """The tables ``rank`` holds rows of (whole or a row range), in table order."""
        return [t for t, _, _ in self.blocks_of(rank)]

    def lookups_of(self, rank: int) -> float:
        """Expected ids per global step that land on ``rank``'s rows."""
        total = 0.0
        for t, lo, hi in self.blocks_of(rank):
            if self.is_row_wise(t):
                share = (self.row_share[t][rank] if self.row_share and self.row_share[t]
                         else (hi - lo) / self.rows[t])
                total += self.access[t] * share
            else:
                total += self.access[t]
        return total

    def estimate(self) -> list[dict]:
        """Per rank: tables (whole or in part), rows, bytes held (fp32 rows + one float of
        row-wise Adagrad state per row), ids looked up in its rows per global step, the
        planner's cost (1.0 = a fair share), and the bytes the embedding exchange sends and
        receives per step: an upper bound, before de-duplication (int32 ids out, fp32 rows
        back, fp32 row gradients out again; each rank's share of the batch draws its ids like
        the whole batch, so a fraction ``lookups_r / A`` of them is its own)."""
        total_rows = sum(self.rows) or 1
        total_access = sum(self.access) or 1.0
        w, D = self.world, self.embedding_dim
        out = []
        for r in range(w):
            blocks = self.blocks_of(r)
            rows = sum(hi - lo for _, lo, hi in blocks)
            lookups = self.lookups_of(r)
            cost = rows / total_rows + lookups / total_access
            asked = (total_access / w) * (1.0 - lookups / total_access)  # ids r asks others for
            served = lookups * (w - 1) / w  # ids the others ask r for
            out.append({"rank": r, "tables": [t for t, _, _ in blocks],
                        "row_wise": [t for t, _, _ in blocks if self.is_row_wise(t)],
                        "rows": rows, "bytes": rows * (D + 1) * 4, "ids_per_step": lookups,
                        "cost": cost * w / 2,
                        "exchange_sent_bytes": asked * 4 + served * D * 4 + asked * D * 4,
                        "exchange_received_bytes": served * 4 + asked * D * 4 + served * D * 4})
        return out

    def report(self) -> str:
        """The estimate as a few lines of text (what the planner says when a run starts)."""
        row_wise = [t for t in range(len(self.rows)) if self.is_row_wise(t)]
        kind = (f"{len(self.rows) - len(row_wise)} table-wise, {len(row_wise)} row-wise "
                f"{row_wise}" if row_wise else "table-wise")
        lines = [f"sharding plan: {len(self.rows)} tables ({kind}) over {self.world} ranks"]
        for e in self.estimate():
            lines.append(f"  rank {e['rank']}: {len(e['tables'])} tables, {e['rows']:,} rows, "
                         f"{e['bytes'] / 2**20:.1f} MiB, {e['ids_per_step']:,.0f} ids/step, "
                         f"load {e['cost']:.2f} (1.00 = fair share), exchange <= "
                         f"{e['exchange_sent_bytes'] / 2**20:.2f} MiB sent, "
                         f"{e['exchange_received_bytes'] / 2**20:.2f} MiB received per step")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON form (a checkpoint's record of the plan it was saved with)."""
        return {"owner": list(self.owner), "world": self.world,
                "bounds": None if self.bounds is None else
                [None if b is None else list(b) for b in self.bounds]}


def access_from_batch(batch, num_tables: int) -> list[float]:
    """Ids per step of each table, measured on one sample batch (TBE layout: ``offsets``
    [T*B+1]); the planner's usual access estimate."""
    offsets = batch.offsets
    B = (offsets.numel() - 1) // num_tables
    bounds = offsets[torch.arange(0, num_tables * B + 1, B)]  # [T+1] nnz at each table start
    return [float(v) for v in (bounds[1:] - bounds[:-1]).tolist()]


def _split_rows(n: int, world: int, row_cost: torch.Tensor) -> tuple[int, ...]:
    """``world + 1`` row starts that cut rows [0, n) into ranges of equal summed ``row_cost``
    [n] (float64, > 0): range r ends at the first row where the running cost reaches
    (r + 1) / world of the total."""
    c = torch.cumsum(row_cost, 0)  # [n]
    targets = c[-1] * torch.arange(1, world, dtype=torch.float64) / world  # [world - 1]
    cuts = (torch.searchsorted(c, targets) + 1).clamp(max=n).tolist()
    out = [0]
    for x in cuts:
        out.append(max(out[-1], int(x)))
    return tuple(out + [n])


def plan_tables(num_embeddings: Sequence[int], world: int, embedding_dim: int,
                access: Sequence[float] | None = None, *,
                row_access: Sequence | None = None, row_wise="auto") -> ShardingPlan:
    """Place each table on the ``world`` ranks (see the module docstring).

    ``access``: ids looked up per step in each table (``access_from_batch``); None counts every
    table alike. ``row_access``: per table, [rows] ids per row of the sample (or None), which
    places the row-wise cuts; when given and ``access`` is not, ``access`` is its sums.
    ``row_wise``: "auto" (a table above a fair share), "never", "always" (every table with
    >= ``world`` rows), or a list of table indices. A rank may hold nothing when there are
    fewer tables than ranks and none is split.
    """
    rows = tuple(int(n) for n in num_embeddings)
    if not rows:
        raise ValueError("plan_tables: no tables to place")
    if any(n <= 0 for n in rows):
        raise ValueError(f"plan_tables: every table needs >= 1 row, got {list(rows)}")
    if world < 1:
        raise ValueError(f"plan_tables: world must be >= 1, got {world}")
    if row_access is not None:
        if len(row_access) != len(rows):
            raise ValueError(f"plan_tables: row_access has {len(row_access)} entries for "
                             f"{len(rows)} tables")
        row_access = [None if a is None else torch.as_tensor(a, dtype=torch.float64).reshape(-1)
                      for a in row_access]
        for t, a in enumerate(row_access):
            if a is not None and (a.numel() != rows[t] or bool((a < 0).any())):
                raise ValueError(f"plan_tables: row_access[{t}] must hold {rows[t]} counts "
                                 ">= 0")
        if access is None:
            access = [float(a.sum()) if a is not None else 1.0 for a in row_access]
    if access is None:
        access = [1.0] * len(rows)
    access = tuple(float(a) for a in access)
    if len(access) != len(rows):
        raise ValueError(f"plan_tables: access has {len(access)} entries for {len(rows)} tables")
    if any(not a >= 0 for a in access):
        raise ValueError(f"plan_tables: access estimates must be >= 0, got {list(access)}")
    total_rows, total_access = sum(rows), sum(access) or 1.0
    cost = [n / total_rows + a / total_access for n, a in zip(rows, access)]
    fair = sum(cost) / world
    if isinstance(row_wise, str):
        if row_wise not in ROW_WISE_MODES:
            raise ValueError(f"plan_tables: row_wise must be one of {ROW_WISE_MODES} or a list "
                             f"of tables, got {row_wise!r}")
        split = {t for t in range(len(rows)) if world > 1 and rows[t] >= world and
                 (row_wise == "always" or (row_wise == "auto" and cost[t] > fair))}
    else:
        split = {int(t) for t in row_wise}
        bad = sorted(t for t in split if not 0 <= t < len(rows))
        if bad:
            raise ValueError(f"plan_tables: row_wise names tables {bad}; there are {len(rows)}")
    load = [0.0] * world
    owner = [0] * len(rows)
    bounds: list = [None] * len(rows)
    share: list = [None] * len(rows)
    for t in sorted(split):
        ra = row_access[t] if row_access is not None else None
        per_row = torch.full((rows[t],), 1.0 / total_rows, dtype=torch.float64)  # [rows]
        if ra is not None and float(ra.sum()) > 0:
            per_row += ra * (access[t] / float(ra.sum())) / total_access
        else:
            per_row += access[t] / rows[t] / total_access
        b = _split_rows(rows[t], world, per_row)
        bounds[t], owner[t] = b, -1
        if ra is not None and float(ra.sum()) > 0:
            share[t] = tuple(float(ra[b[r]:b[r + 1]].sum() / ra.sum()) for r in range(world))
        for r in range(world):
            load[r] += float(per_row[b[r]:b[r + 1]].sum())
    for t in sorted((t for t in range(len(rows)) if t not in split), key=lambda t: (-cost[t], t)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[t] = r
        load[r] += cost[t]
    return ShardingPlan(tuple(owner), int(world), rows, access, int(embedding_dim),
                        tuple(bounds) if split else None, tuple(share) if split else None)
