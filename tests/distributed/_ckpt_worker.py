# SPDX-License-Identifier: Apache-2.0
"""One rank of the sharded-checkpoint test (``python -m tests.distributed._ckpt_worker``, with
torchrun's environment): train ``--before`` steps on the planner's placement, save, go on
``--after`` steps without a reload (the reference), then load the checkpoint twice with the
table placement reversed, once with the dense optimizer's state and once without, and train
the same ``--after`` steps on each. Last, a save in which rank 1 cannot write must fail on
every rank and leave the first checkpoint as it was. Results go to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from adrec_fast.data.schema import Schema

from ._worker import LR, _wait_for_peers, build, step


def _gathered_probs(model, batch, ctx) -> list[float]:
    from adrec_fast import distributed as D

    probs = model.predict(D.local_batch(batch, ctx))
    everyone = [torch.empty_like(probs) for _ in range(ctx.world)]
    torch.distributed.all_gather(everyone, probs, group=ctx.group)
    return torch.cat(everyone).tolist()


def _train(model, ddp, opt, batches, ctx) -> list[float]:
    from adrec_fast import distributed as D

    model.train()
    losses = []
    for b in batches:
        loss = step(model, ddp, D.local_batch(b, ctx), opt)
        torch.distributed.all_reduce(loss, group=ctx.group)
        losses.append(float(loss) / ctx.world)
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--before", type=int, required=True)
    p.add_argument("--after", type=int, required=True)
    args = p.parse_args(argv)

    from adrec_fast import distributed as D
    from adrec_fast.distributed import checkpoint as dckpt

    torch.set_num_threads(1)
    data = torch.load(args.data, weights_only=False)["plain"]
    rank = int(os.environ["RANK"])
    out = Path(args.out)
    _wait_for_peers(out.parent, rank, int(os.environ["WORLD_SIZE"]))
    ctx = D.init_from_env(device="cpu", timeout_s=60)
    schema = Schema.from_dict(data["schema"])
    batches, eval_batch = data["batches"], data["eval"]
    first, then = batches[:args.before], batches[args.before:args.before + args.after]
    res: dict = {"rank": rank}

    model = build(schema, data["seed"])
    sharded = D.shard_model(model, ctx)["lookup.ebc"]
    res["saved_plan"] = list(sharded.plan.owner)
    ddp = D.wrap_ddp(model, ctx)
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    _train(model, ddp, opt, first, ctx)
    res["probs_saved"] = _gathered_probs(model, eval_batch, ctx)
    D.save_sharded(args.ckpt, ddp, ctx, optimizer=opt, meta={"global_step": args.before})
    res["losses_no_reload"] = _train(model, ddp, opt, then, ctx)

    # another placement: every table on the other rank
    other = dataclasses.replace(sharded.plan, owner=tuple(1 - o for o in sharded.plan.owner))
    for with_opt in (True, False):
        loaded, _, doc = D.load_sharded(args.ckpt, ctx, plans={"lookup.ebc": other})
        tag = "loaded" if with_opt else "fresh_optimizer"
        res[f"plan_{tag}"] = list(loaded.lookup.ebc.plan.owner)
        res[f"probs_{tag}"] = _gathered_probs(loaded, eval_batch, ctx)
        ddp2 = D.wrap_ddp(loaded, ctx)
        opt2 = torch.optim.Adam(ddp2.parameters(), lr=LR)
        if with_opt:
            D.load_optimizer(opt2, args.ckpt)
        res[f"losses_{tag}"] = _train(loaded, ddp2, opt2, then, ctx)
    res["global_step"] = doc["global_step"]

    # rank 1 cannot write its shard: the save fails everywhere, the old checkpoint stays
    if rank == 1:
        dckpt._shard_file = lambda r, w: f"no-such-dir/shard-{r}-of-{w}.safetensors"
    try:
        D.save_sharded(args.ckpt, ddp, ctx, optimizer=opt)
        res["failed_save_error"] = None
    except RuntimeError as e:
        res["failed_save_error"] = str(e)
    ctx.destroy()
    out.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    from tests.distributed import leave

    leave(main())
