# SPDX-License-Identifier: Apache-2.0
"""One rank of the row-wise sharding test (``torchrun --nproc-per-node 2 -m
tests.distributed._rowwise_worker OUTDIR``).

Part 1, the collection: tables split row-wise (one with uneven cuts, one cut so that a rank
holds none of its rows) beside a table-wise one, against a full copy of the same collection in
this process that runs the whole global batch. Seeded ragged bags with empty bags, repeated ids
and every table's largest id; sum pooling with per-sample weights and row-wise Adagrad, mean
pooling with SGD. Per step: this rank's rows of the output, then after the fused updates the
gathered tables and optimizer state. The row gradients go to the owners unscaled
(``grad_scale=1``), since the loss here is a plain sum over the global batch.

Part 2, checkpoints: a small DLRM whose two big tables are row-wise trains a few steps, is
saved with ``save_sharded``, and loaded back onto the two ranks table-wise and row-wise; the
gathered tables must equal the saved ones. Rank 0 leaves the gathered tables in OUTDIR for the
test to compare with ``load_model`` and a one-rank ``load_sharded`` in one process.
Part 3, ``GlobalBatchNorm``: its forward on this rank's rows, the gradients of its input and
(summed over the ranks, as DDP sums them before averaging) of its weight and bias, and its
running statistics against ``nn.BatchNorm1d`` on the whole global batch in float64.
Every mismatch is written to OUTDIR/rank<r>.json as text; an empty list is a pass.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from adrec_fast import distributed as D
from adrec_fast.models.base import fused_optimizer
from adrec_fast.nn import EmbeddingBagCollection

ROWS = [9, 40, 3, 17]
DIM = 5  # odd on purpose
B_PER_RANK = 6
STEPS = 3


def global_bags(rows, B, seed):
    """indices [nnz], offsets [T*B+1], per-sample weights [nnz] of B bags per table: lengths
    0-4 (empty bags), ids drawn from a few values (repeats), each table's largest id in its
    first bag."""
    g = torch.Generator().manual_seed(seed)
    T = len(rows)
    lengths = torch.randint(0, 5, (T * B,), generator=g)
    lengths[::B] = lengths[::B].clamp(min=1)  # the first bag of each table holds its last id
    ids = []
    for t in range(T):
        for b in range(B):
            n = int(lengths[t * B + b])
            x = torch.randint(0, rows[t], (n,), generator=g)
            if b == 0:
                x[0] = rows[t] - 1
            if n > 2:
                x[1] = x[0]  # a repeat inside one bag
            ids.append(x)
    offsets = torch.zeros(T * B + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    indices = torch.cat(ids)
    return indices, offsets, torch.rand(indices.numel(), generator=g) + 0.5


def local_bags(indices, offsets, psw, T, B, lo, hi):
    """Bags [lo, hi) of every table (TBE layout) of a global batch of B bags per table."""
    parts, wparts, lengths = [], [], []
    for t in range(T):
        a, b = int(offsets[t * B + lo]), int(offsets[t * B + hi])
        parts.append(indices[a:b])
        wparts.append(psw[a:b])
        lengths.append(offsets[t * B + lo + 1:t * B + hi + 1] - offsets[t * B + lo:t * B + hi])
    lengths = torch.cat(lengths)
    ofs = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=ofs[1:])
    return torch.cat(parts), ofs, torch.cat(wparts)


def part_collection(ctx, errors: list) -> None:
    world, T = ctx.world, len(ROWS)
    B = B_PER_RANK * world
    lo, hi = ctx.rank * B_PER_RANK, (ctx.rank + 1) * B_PER_RANK
    for pooling, opt_name, weighted in (("sum", "rowwise_adagrad", True), ("mean", "sgd", False)):
        torch.manual_seed(0)
        ebc = EmbeddingBagCollection(ROWS, DIM, pooling=pooling,
                                     optimizer=fused_optimizer(opt_name, lr=0.3))
        ref = copy.deepcopy(ebc)
        # table 0 cut unevenly, table 1 cut so that rank 1 holds none of it, table 3 even;
        # table 2 whole on rank 1
        bounds = ((0, 2, 9), (0, 40, 40), None, (0, 8, 17))
        plan = D.ShardingPlan(owner=(-1, -1, 1, -1), world=world, rows=tuple(ROWS),
                              access=(1.0,) * T, embedding_dim=DIM, bounds=bounds)
        sharded = D.ShardedEmbeddingBagCollection(ebc, ctx, plan, grad_scale=1.0)
        for step in range(STEPS):
            idx, ofs, psw = global_bags(ROWS, B, seed=100 + step)
            g = torch.randn(B, T * DIM, generator=torch.Generator().manual_seed(7 + step))
            want = ref(idx, ofs, psw if weighted else None)  # [B, T*D]
            (want * g).sum().backward()
            li, lo_ofs, lw = local_bags(idx, ofs, psw, T, B, lo, hi)
            got = sharded(li, lo_ofs, lw if weighted else None)  # [B/world, T*D]
            (got * g[lo:hi]).sum().backward()
            tag = f"{pooling}/{opt_name} step {step}"
            _check(errors, f"{tag}: output", got.detach(), want.detach()[lo:hi])
            weight, state = sharded.gather()
            ref.flush_l2()
            _check(errors, f"{tag}: tables", weight, ref.weight)
            _check(errors, f"{tag}: optimizer state", state, ref.state)


def part_checkpoint(ctx, out: Path, errors: list) -> None:
    from adrec_fast.data.synthetic import SyntheticCTR
    from adrec_fast.models.registry import build_model

    gen = SyntheticCTR(n_rows=2048, seed=0)
    schema = gen.schema()
    from adrec_fast.data.batch import Batch

    rows = Batch.concat(list(gen.batches(4 * 256, schema=schema)))
    torch.manual_seed(0)
    model = build_model("dlrm", schema, embedding_dim=8, bottom=(16,), top=(16,))
    ebc = model.lookup.ebc
    sizes = ebc.num_embeddings
    big = sorted(range(len(sizes)), key=lambda t: -sizes[t])[:2]
    plan = D.plan_tables(sizes, ctx.world, ebc.embedding_dim, row_wise=big)
    D.shard_model(model, ctx, plans={"lookup.ebc": plan})
    ddp = D.wrap_ddp(model, ctx)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    model.train()
    for s in range(4):
        part = D.local_batch(rows.slice(s * 256, (s + 1) * 256), ctx)
        loss = model.loss(ddp(part), part.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = out / "ckpt"
    D.save_sharded(path, ddp, ctx, optimizer=opt)
    weight, state = model.lookup.ebc.gather()
    if ctx.rank == 0:
        torch.save({"weight": weight, "state": state, "row_wise": big,
                    "bounds": [plan.bounds[t] for t in big]}, out / "saved_tables.pt")
    for tag, plans in (("table-wise", {"lookup.ebc": D.plan_tables(sizes, ctx.world, 8,
                                                                   row_wise="never")}),
                       ("row-wise, every table", {"lookup.ebc": D.plan_tables(
                           sizes, ctx.world, 8, row_wise="always")})):
        loaded, _, _ = D.load_sharded(path, ctx, plans=plans)
        w, s = loaded.lookup.ebc.gather()
        _check(errors, f"load_sharded {tag}: tables", w, weight)
        _check(errors, f"load_sharded {tag}: optimizer state", s, state)


def part_batch_norm(ctx, errors: list) -> None:
    B, C = 5, 7  # rows per rank, features (odd)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B * ctx.world, C, generator=g, dtype=torch.float64) * 3 + 1
    up = torch.randn(B * ctx.world, C, generator=g, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(C, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-0.5, 0.5, generator=g)
    gbn = D.GlobalBatchNorm(copy.deepcopy(ref), ctx, ctx.group)
    lo, hi = ctx.rank * B, (ctx.rank + 1) * B
    xr = x.clone().requires_grad_(True)
    xl = x[lo:hi].clone().requires_grad_(True)
    for step in range(2):
        want = ref(xr)
        (want * up).sum().backward()
        got = gbn(xl)
        (got * up[lo:hi]).sum().backward()
        _check(errors, f"batch norm step {step}: output", got, want[lo:hi])
    _check(errors, "batch norm: input gradient", xl.grad, xr.grad[lo:hi])
    for name in ("weight", "bias"):
        grad = getattr(gbn, name).grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        _check(errors, f"batch norm: {name} gradient", grad, getattr(ref, name).grad)
    _check(errors, "batch norm: running mean", gbn.running_mean, ref.running_mean)
    _check(errors, "batch norm: running var", gbn.running_var, ref.running_var)
    gbn.eval()
    ref.eval()
    _check(errors, "batch norm: eval", gbn(x[lo:hi]), ref(x[lo:hi]))


def _check(errors: list, what: str, got, want) -> None:
    try:
        torch.testing.assert_close(got, want)
    except AssertionError as e:
        errors.append(f"{what}: {str(e).splitlines()[0]} {str(e).splitlines()[1:4]}")


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    torch.set_num_threads(1)
    ctx = D.init_from_env(device="cpu", timeout_s=60)
    errors: list = []
    part_collection(ctx, errors)
    part_checkpoint(ctx, out, errors)
    part_batch_norm(ctx, errors)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps({"errors": errors}))
    ctx.destroy()
    return 0


if __name__ == "__main__":
    from tests.distributed import leave

    leave(main())
