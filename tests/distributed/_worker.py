# SPDX-License-Identifier: Apache-2.0
"""One rank of the two-rank tests (``python -m tests.distributed._worker``, environment as
torchrun sets it), and the training loop the single-process reference shares with it.

Modes: ``train`` (first a start-up check in which rank 1 has another seed and model, which
every rank must refuse; then one run per ``--runs`` entry, a data set and an all-to-all path,
each compared with one process by the test), ``kill`` (rank 1 SIGKILLs itself between a
forward and its backward), ``hang`` (rank 1 SIGSTOPs itself there: only the timeout can end
the other rank's wait). The rank writes its result as JSON to ``--out``; a failure of the run
is a result too (``error``, ``error_type``), written before the process exits with code 3.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from adrec_fast.data.metrics import auc
from adrec_fast.data.schema import Schema
from adrec_fast.models.registry import build_model

MODEL_KW = {"embedding_dim": 8, "bottom": (16,), "top": (32, 16)}
LR = 1e-3


def build(schema: Schema, seed: int, **override):
    torch.manual_seed(seed)
    return build_model("dlrm", schema, **{**MODEL_KW, **override})


def step(model, forward, batch, opt, before_backward=None):
    """One synchronous step; returns this process's loss (mean over its rows)."""
    loss = model.loss(forward(batch), batch.labels)
    if before_backward is not None:
        before_backward()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_single(schema: Schema, batches, seed: int) -> tuple[list[float], object]:
    """The reference: one process, whole global batches."""
    model = build(schema, seed)
    model.train()
    opt = torch.optim.Adam(model.dense_parameters(), lr=LR)
    losses = [float(step(model, model, b, opt)) for b in batches]
    return losses, model


def _wait_for_peers(sync_dir: Path, rank: int, world: int, limit_s: float = 120.0) -> None:
    """Start the process group only when every rank has finished importing, so the start-up
    skew of a loaded machine does not eat into the short timeouts the tests use."""
    (sync_dir / f"ready{rank}").touch()
    t0 = time.monotonic()
    while not all((sync_dir / f"ready{r}").exists() for r in range(world)):
        if time.monotonic() - t0 > limit_s:
            raise RuntimeError("peers never became ready")
        time.sleep(0.02)


def run(ctx, data, alltoall: str, out: Path, fault: str | None = None,
        fault_step: int = 5) -> dict:
    """Shard, train on every global batch, evaluate, gather; ``fault`` makes rank 1 die
    (``"kill"``) or stop (``"hang"``) between the forward and backward of ``fault_step``."""
    from adrec_fast import distributed as D

    schema = Schema.from_dict(data["schema"])
    batches, eval_batch, seed = data["batches"], data["eval"], data["seed"]
    res: dict = {}
    model = build(schema, seed)
    D.check_same_config(ctx, model=model.config, schema=schema.to_dict(), seed=seed,
                        global_batch=batches[0].batch_size)
    exchange = D.Exchange(ctx, alltoall)
    res["exchange"] = exchange.mode
    sharded = D.shard_model(model, ctx, exchange)["lookup.ebc"]
    res["plan"] = sharded.plan.report()
    ddp = D.wrap_ddp(model, ctx)
    model.train()
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    losses = []
    for i, batch in enumerate(batches):
        hook = None
        if fault and ctx.rank == 1 and i == fault_step:
            sig = signal.SIGKILL if fault == "kill" else signal.SIGSTOP
            (out.parent / "fault_time").write_text(repr(time.time()))
            hook = lambda: os.kill(os.getpid(), sig)  # noqa: E731
        # DDP's all-reduce fails inside backward: the guard names a lost peer there too
        with ctx.guard(f"training step {i}"):
            loss = step(model, ddp, D.local_batch(batch, ctx), opt, hook)
            torch.distributed.all_reduce(loss, group=ctx.group)
        losses.append(float(loss) / ctx.world)
    res["losses"] = losses
    res["exchange_stats"] = exchange.stats()
    # evaluation through the sharded model: each rank scores its rows
    probs = model.predict(D.local_batch(eval_batch, ctx))
    everyone = [torch.empty_like(probs) for _ in range(ctx.world)]
    with ctx.guard("gathering predictions"):
        torch.distributed.all_gather(everyone, probs, group=ctx.group)
    res["auc_sharded"] = auc(eval_batch.labels.numpy(), torch.cat(everyone).numpy())
    # an id past its table's end is refused on every rank before any exchange
    T = sharded.num_tables
    bad = torch.tensor([sharded.num_embeddings[T - 1]] * 2)
    try:
        sharded(torch.cat([torch.zeros(2 * (T - 1), dtype=torch.long), bad]),
                torch.arange(2 * T + 1))
        res["bad_id_error"] = None
    except IndexError as e:
        res["bad_id_error"] = str(e)
    D.unshard_model(model)
    res["auc"] = auc(eval_batch.labels.numpy(), model.predict(eval_batch).numpy())
    if ctx.rank == 0:
        torch.save(model.state_dict(), out.parent / f"state_{data['name']}_{alltoall}.pt")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="train", choices=["train", "kill", "hang"])
    p.add_argument("--runs", default="plain:auto,plain:scatter,bags:auto",
                   help="one run per data set:exchange path")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)

    from adrec_fast import distributed as D

    torch.set_num_threads(1)
    sets = torch.load(args.data, weights_only=False)
    rank = int(os.environ["RANK"])
    out = Path(args.out)
    _wait_for_peers(out.parent, rank, int(os.environ["WORLD_SIZE"]))
    result: dict = {"rank": rank, "runs": {}}
    try:
        ctx = D.init_from_env(device="cpu", timeout_s=args.timeout)
        if args.mode == "train":
            # rank 1 starts from another seed and model: every rank must refuse to go on
            data = sets["plain"]
            schema = Schema.from_dict(data["schema"])
            seed = data["seed"] + (ctx.rank == 1)
            model = build(schema, seed, **({"top": (32, 8)} if ctx.rank == 1 else {}))
            try:
                D.check_same_config(ctx, model=model.config, schema=data["schema"],
                                    seed=seed, global_batch=data["batches"][0].batch_size)
                result["mismatch_error"] = None
            except D.ConfigMismatch as e:
                result["mismatch_error"] = str(e)
        fault = None if args.mode == "train" else args.mode
        for spec in args.runs.split(","):
            name, path = spec.split(":")
            result["runs"][spec] = run(ctx, sets[name], path, out, fault)
        ctx.destroy()
    except D.PeerFailure as e:
        result.update(error=str(e), error_type=type(e).__name__, error_time=time.time())
        out.write_text(json.dumps(result))
        sys.stderr.write(f"rank {rank}: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        # leave at once: the test must not depend on the teardown of a group whose peer is
        # stopped or gone
        os._exit(3)
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    from tests.distributed import leave

    leave(main())
