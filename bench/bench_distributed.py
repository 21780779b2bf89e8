# SPDX-License-Identifier: Apache-2.0
"""Distributed training throughput: DLRM on 2 ranks x 1 thread (tables sharded table-wise,
towers under DDP, gloo on localhost, launched by torchrun) against 1 process x 1 thread, on the
DLRM shape of ``bench_train.py`` (B=4096 global, the 26 Criteo Kaggle tables capped at 1e6
rows, D=16, bottom 512-256-64, top 512-256, row-wise Adagrad fused, Adam on the towers).

Per run, each side is its own process(es): it builds the model, takes the batch pool of
``bench_train.make_batches`` (touched rows >= 4x the L3; each rank pre-slices its half of every
global batch, as a rank reading its own data would), warms up, then times ``--steps`` steps.
The two sides alternate, in an order that flips from run to run. Reported per run: samples/s
of each side (global batch / median step), their ratio, and for the 2 ranks the bytes each rank
sends per step (embedding ids, rows and gradients; the dense gradients DDP all-reduces) and the
step split into the embedding exchange (time inside its collectives, waiting on the other rank
included), a standalone all-reduce of the dense gradients (DDP overlaps it with the backward,
so this is an upper bound of its share) and the rest (compute).

    python bench/bench_distributed.py --runs 3            # ~4 min on 2 quiet cores
    python bench/bench_distributed.py --quick             # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _time_steps(step, batches, warmup: int, steps: int, sync=None) -> list[float]:
    for i in range(warmup):
        step(batches[i % len(batches)])
    if sync is not None:
        sync()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[(warmup + i) % len(batches)])
        times.append(time.perf_counter() - t0)
    return times


def worker(kind: str, warmup: int, steps: int, max_batches: int) -> dict:
    """One side of a run (``kind``: "single", or "dist" under torchrun); returns its timings."""
    import torch

    torch.set_num_threads(1)
    import bench_train as bt

    from adrec_fast.models.registry import build_model

    batches = bt.make_batches(max_batches=max_batches)
    torch.manual_seed(0)
    model = build_model("dlrm", bt.criteo_schema(), embedding_dim=bt.D, pooling="sum",
                        **bt.DLRM_KW)
    model.train()
    for c in model.embedding_collections():
        c.optimizer.lr = bt.EMB_LR
    out = {"kind": kind, "B": bt.B, "pool": bt._POOL_INFO}
    if kind == "single":
        opt = torch.optim.Adam(model.dense_parameters(), lr=bt.LR, fused=True)

        def step(batch):
            loss = model.loss(model(batch), batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        out["step_s"] = _time_steps(step, batches, warmup, steps)
        return out

    import torch.distributed as dist

    from adrec_fast import distributed as D

    ctx = D.init_from_env(device="cpu")
    D.check_same_config(ctx, model=model.config, seed=0, global_batch=bt.B)
    exchange = D.Exchange(ctx)
    sharded = D.shard_model(model, ctx, exchange,
                            access={"lookup.ebc": D.access_from_batch(batches[0], bt.T)})
    ddp = D.wrap_ddp(model, ctx)
    opt = torch.optim.Adam(ddp.parameters(), lr=bt.LR, fused=True)
    mine = [D.local_batch(b, ctx) for b in batches]

    def step(batch):
        loss = model.loss(ddp(batch), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        dist.barrier(group=ctx.group)
        exchange.reset_stats()

    out["step_s"] = _time_steps(step, mine, warmup, steps, sync)
    out["exchange"] = exchange.stats()
    out["plan"] = sharded["lookup.ebc"].plan.report()
    n_dense = sum(p.numel() for p in ddp.parameters())
    flat = torch.zeros(n_dense)
    dist.barrier(group=ctx.group)
    t0 = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(flat, group=ctx.group)
    out["allreduce_s"] = (time.perf_counter() - t0) / 10
    out["dense_grad_bytes"] = n_dense * 4
    out["rank"] = ctx.rank
    ctx.destroy()
    return out


def _run_side(kind: str, args) -> dict:
    flags = ["--worker", kind, "--warmup", str(args.warmup), "--steps", str(args.steps),
             "--max-batches", str(args.max_batches)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kind == "single":
        cmd = [sys.executable, str(Path(__file__).resolve()), *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(Path(__file__).resolve()), *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{kind} side failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[0][len("RESULT "):])


def _summary(single: dict, two: dict) -> dict:
    B = single["B"]
    s1 = statistics.median(single["step_s"])
    s2 = statistics.median(two["step_s"])
    steps = len(two["step_s"])
    ex = two["exchange"]
    emb_s = ex["seconds"] / steps
    return {"B": B, "single_sps": B / s1, "two_sps": B / s2, "ratio": s1 / s2, "step2_ms": s2 * 1e3,
            "emb_bytes": ex["bytes_sent"] / steps, "pad_bytes": ex["padding_bytes"] / steps,
            "dense_bytes": two["dense_grad_bytes"], "emb_ms": emb_s * 1e3,
            "allreduce_ms": two["allreduce_s"] * 1e3,
            "compute_ms": (s2 - emb_s - two["allreduce_s"]) * 1e3, "mode": ex["mode"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-batches", type=int, default=128, help="cap on the batch pool")
    ap.add_argument("--quick", action="store_true", help="1 run, 5 steps, a pool of 8")
    ap.add_argument("--worker", choices=["single", "dist"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.steps, args.warmup, args.max_batches = 1, 5, 2, 8
    if min(args.runs, args.steps, args.max_batches) < 1 or args.warmup < 0:
        raise SystemExit("--runs, --steps and --max-batches must be >= 1, --warmup >= 0")
    if args.worker:
        res = worker(args.worker, args.warmup, args.steps, args.max_batches)
        if res.get("rank", 0) == 0:
            print("RESULT " + json.dumps(res), flush=True)
        return
    rows = []
    for run in range(args.runs):
        load0 = os.getloadavg()[0]
        order = ["single", "dist"] if run % 2 == 0 else ["dist", "single"]
        got = {kind: _run_side(kind, args) for kind in order}
        rows.append({**_summary(got["single"], got["dist"]), "load": (load0,
                                                                       os.getloadavg()[0])})
        if run == 0:
            print(got["dist"]["plan"])
            print(f"pool: {got['single']['pool']}")
    print(f"\nDLRM B={rows[0]['B']} global, 1 thread per process, {args.steps} timed "
          f"steps per side per run\n")
    print("| run | 1 rank samples/s | 2 ranks samples/s | ratio | 2-rank step ms | embedding "
          "exchange ms | dense all-reduce ms | compute ms | bytes sent/rank/step (emb + dense) "
          "| load 1-min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {i} | {r['single_sps']:,.0f} | {r['two_sps']:,.0f} | {r['ratio']:.2f}x | "
              f"{r['step2_ms']:.1f} | {r['emb_ms']:.1f} | {r['allreduce_ms']:.1f} | "
              f"{r['compute_ms']:.1f} | {r['emb_bytes'] / 1e6:.2f} MB + "
              f"{r['dense_bytes'] / 1e6:.2f} MB | {r['load'][0]:.1f} -> {r['load'][1]:.1f} |")
    ratios = [r["ratio"] for r in rows]
    print(f"\nratio 2 ranks / 1 rank: median {statistics.median(ratios):.2f}x, spread "
          f"{min(ratios):.2f}-{max(ratios):.2f}x over {len(rows)} runs "
          f"(exchange path: {rows[0]['mode']})")


if __name__ == "__main__":
    main()
