# SPDX-License-Identifier: Apache-2.0
"""One rank of the two-rank dynamic-table tests (``python -m tests.distributed._dynamic_worker``,
environment as torchrun sets it), and the loop the single-process reference shares with it.

Per ``--runs`` entry (a data set and an all-to-all path): shard the model (dynamic tables by
key, static ones by the planner), train on every global batch, score the evaluation rows
through the sharded model, save a sharded checkpoint, gather the tables back (``unshard_model``)
and write rank 0's state. Then a model whose dynamic tables have a capacity below the number
of ranks, which sharding must refuse by name. Results go to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from adrec_fast.data.schema import Schema
from adrec_fast.models.registry import build_model

LR = 1e-3
#: the dynamic tables: admission after 2 sightings and a coin of probability 0.7, a TTL of 6
#: steps, a capacity that grows (the sketch wide enough that no two keys of the stream share
#: all of its cells)
DYNAMIC = {"capacity": 64, "min_count": 2, "admit_prob": 0.7, "ttl": 6, "sketch_width": 1 << 16}


def build(schema: Schema, name: str, seed: int, **override):
    torch.manual_seed(seed)
    kw = {"embedding_dim": 8, "hidden": (16,), "dynamic_tables": dict(DYNAMIC), **override}
    return build_model(name, schema, **kw)


def step(model, forward, batch, opt):
    loss = model.loss(forward(batch), batch.labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_single(data) -> tuple[list[float], object]:
    """The reference: one process, whole global batches."""
    schema = Schema.from_dict(data["schema"])
    model = build(schema, data["model"], data["seed"])
    model.train()
    opt = torch.optim.Adam(model.dense_parameters(), lr=LR)
    losses = [float(step(model, model, b, opt)) for b in data["batches"]]
    return losses, model


def run(ctx, data, alltoall: str, out: Path) -> dict:
    from adrec_fast import distributed as D

    schema = Schema.from_dict(data["schema"])
    model = build(schema, data["model"], data["seed"])
    D.check_same_config(ctx, model=model.config, schema=schema.to_dict(), seed=data["seed"])
    exchange = D.Exchange(ctx, alltoall)
    res: dict = {"exchange": exchange.mode}
    sharded = D.shard_model(model, ctx, exchange)
    res["sharded"] = sorted(sharded)
    ddp = D.wrap_ddp(model, ctx)
    model.train()
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    losses = []
    for i, batch in enumerate(data["batches"]):
        with ctx.guard(f"training step {i}"):
            loss = step(model, ddp, D.local_batch(batch, ctx), opt)
            torch.distributed.all_reduce(loss, group=ctx.group)
        losses.append(float(loss) / ctx.world)
    res["losses"] = losses
    res["local_keys"] = {p: m.local.num_keys for p, m in sharded.items() if p.endswith("dyn")}
    probs = model.predict(D.local_batch(data["eval"], ctx))
    everyone = [torch.empty_like(probs) for _ in range(ctx.world)]
    with ctx.guard("gathering predictions"):
        torch.distributed.all_gather(everyone, probs, group=ctx.group)
    res["scores_sharded"] = torch.cat(everyone).tolist()
    ckdir = out.parent / f"ckpt_{data['name']}"
    D.save_sharded(ckdir, ddp, ctx, optimizer=opt)
    # the checkpoint back onto the ranks: each keeps the keys it owns, scores as before
    again, _, _ = D.load_sharded(ckdir, ctx, exchange=exchange)
    probs = again.predict(D.local_batch(data["eval"], ctx))
    with ctx.guard("gathering predictions"):
        torch.distributed.all_gather(everyone, probs, group=ctx.group)
    res["scores_reloaded"] = torch.cat(everyone).tolist()
    D.unshard_model(model)
    if ctx.rank == 0:
        torch.save(model.state_dict(), out.parent / f"state_{data['name']}.pt")
    return res


def run_text(ctx, data, out: Path) -> dict:
    """A model with a text field beside a dynamic table: a few steps, then ``save_sharded``,
    whose directory must carry the text encoder's cache as one process's checkpoint does.
    Every rank encodes all the raw rows (the cache rows of a Batch are the process's own)."""
    from adrec_fast import distributed as D

    schema = Schema.from_dict(data["schema"])
    rows = schema.encode(data["raw"])
    n = data["steps"] * data["batch"]
    model = build(schema, "deepfm", 0)
    D.shard_model(model, ctx)
    ddp = D.wrap_ddp(model, ctx)
    model.train()
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    for i in range(data["steps"]):
        batch = rows.slice(i * data["batch"], (i + 1) * data["batch"])
        with ctx.guard(f"text step {i}"):
            step(model, ddp, D.local_batch(batch, ctx), opt)
    probs = model.predict(D.local_batch(rows.slice(n, rows.batch_size), ctx))
    everyone = [torch.empty_like(probs) for _ in range(ctx.world)]
    with ctx.guard("gathering predictions"):
        torch.distributed.all_gather(everyone, probs, group=ctx.group)
    D.save_sharded(out.parent / "ckpt_text", ddp, ctx)
    return {"scores": torch.cat(everyone).tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", required=True, help="one run per data set:exchange path")
    args = p.parse_args(argv)

    from adrec_fast import distributed as D

    from ._worker import _wait_for_peers

    torch.set_num_threads(1)
    sets = torch.load(args.data, weights_only=False)
    rank = int(os.environ["RANK"])
    out = Path(args.out)
    _wait_for_peers(out.parent, rank, int(os.environ["WORLD_SIZE"]))
    result: dict = {"rank": rank, "runs": {}}
    ctx = D.init_from_env(device="cpu", timeout_s=60.0)
    for spec in args.runs.split(","):
        name, path = spec.split(":")
        result["runs"][spec] = run(ctx, sets[name], path, out)
    if "text" in sets:
        result["text"] = run_text(ctx, sets["text"], out)
    data = next(iter(sets.values()))
    # a full table that evicts: each rank holds capacity / 2 keys and evicts among its own
    lfu = build(Schema.from_dict(data["schema"]), data["model"], 0,
                dynamic_tables={**DYNAMIC, "capacity": 16, "eviction": "lfu"})
    D.shard_model(lfu, ctx)
    ddp = D.wrap_ddp(lfu, ctx)
    lfu.train()
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    losses = []
    for i, batch in enumerate(data["batches"][:5]):
        with ctx.guard(f"lfu step {i}"):
            losses.append(float(step(lfu, ddp, D.local_batch(batch, ctx), opt)))
    result["lfu"] = {"losses": losses, "keys": lfu.lookup.dyn.local.num_keys,
                     "rows": lfu.lookup.dyn.local.num_rows}
    small = build(Schema.from_dict(data["schema"]), data["model"], 0,
                  dynamic_tables={**DYNAMIC, "capacity": 1})
    try:
        D.shard_model(small, ctx)
        result["capacity_error"] = None
    except ValueError as e:
        result["capacity_error"] = str(e)
    ctx.destroy()
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    from tests.distributed import leave

    leave(main())
