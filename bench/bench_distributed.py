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

``--dynamic``: the same with every table dynamic (``vocab: dynamic``, each id a 64-bit key,
capacity 2^22 keys so that no table grows while timed; on 2 ranks sharded by key). The ids are
uniform, so most lookups of the first pass over the pool insert a new key.

    python bench/bench_distributed.py --dynamic --runs 3

``--frappe``: quality instead of speed. DLRM with its default recipe's model settings
(``training/recipes.py``; ``--dropout`` overrides the tower's) trains on the shared Frappe file
(``../shared/data/frappe``, split 70/10/20 into train, valid and test rows by ``valid_mask``
with the seed) in the same row order, at the same global batch and seed, with the recipe's
Adam lr, gradient clipping, lr decay after an epoch without a better valid AUC and early
stopping (at most ``--epochs``), once in 1 process and once on 2 ranks under torchrun.
Compared: the test AUC at the epoch of the best valid AUC (the epoch the trainer restores),
target within 0.002. The 2 ranks draw the dropout masks of the whole global batch and keep
their halves (``global_batch_dropout``), so the two runs differ only in summation order;
``--local-dropout`` lets each rank draw its own masks instead (two samples of training, not one
run twice). The 2-rank side saves its last epoch with
``save_sharded``; the parent scores the test rows again from that directory with
``load_model`` on one process (no merge step). Each run takes the next seed.

    python bench/bench_distributed.py --frappe --runs 3   # seeds 0-2; ~2 min per run, 2 cores

``--frappe-cli``: the same question asked of the command line, as a user runs it. The Frappe
file is split 80/10/10 as ``bench/frappe_models.py`` splits it (``split_frappe``: fit,
early-stop, test rows) into three CSV files in a temporary directory; then
``adrec-fast train fit.csv --valid stop.csv --model MODEL --seed S`` runs once in one process
and once with ``--nproc 2`` (every other setting the model's recipe), and
``adrec-fast eval RUN test.csv`` scores each run directory in one process. Printed: both test
AUCs and their difference (target within 0.002). Run i takes seed ``--seed`` + i.

    nice python bench/bench_distributed.py --frappe-cli --model deepfm --runs 3

``--scaling``: the scaling model. One 2-rank run of the DLRM shape above (``--steps`` timed
steps) measures the bytes each rank sends per step, by kind (ids, rows, gradients; DDP's dense
gradients), and the step's split into exchange, all-reduce and compute; the model below then
projects the step to N machines (one rank each, the per-rank batch held at B/2) on 25 and
100 Gb/s networks, for the Criteo Kaggle and 1TB table sizes at D=16:

    embedding bytes sent per rank per step  E(N) = u * b * T * (N-1)/N * (4 + 2 * 4 * D)
    dense all-reduce bytes (ring)           A(N) = 2 * (N-1)/N * 4 * P
    latency                                 L(N) = alpha * (4 + 2) * (N-1)
    step                                    t(N) = t_c + (E + A) / bandwidth + L

with b the per-rank batch, T = 26 ids per row, u the share of a rank's remote ids left after its
de-duplication (measured), P the dense parameters, t_c the measured per-rank compute, alpha a
per-message cost (``--alpha-us``; 4 pairwise all-to-alls and a ring all-reduce of 2(N-1) steps
per step). ``--compute-ms`` replaces the measured compute (a quiet machine's figure), and
``--speedup`` adds a machine that computes that many times faster than one rank here.

    python bench/bench_distributed.py --scaling --compute-ms 81
"""
from __future__ import annotations

import argparse
import dataclasses
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


#: ``--dynamic``: the tables' capacity (keys), large enough that no table grows while timed
DYNAMIC_CAPACITY = 1 << 22


def _dynamic_shape(batches):
    """(schema, batches) of ``--dynamic``: the DLRM shape with every table dynamic, each id a
    64-bit key (table number in the high bits, so no two tables share a key)."""
    import torch
    import bench_train as bt

    from adrec_fast.data.schema import Schema

    spec = bt.criteo_schema().to_dict()
    for f in spec["fields"]:
        if f["type"] == "categorical":
            f["vocab"] = "dynamic"
            f.pop("hash_size", None)
    salt = (torch.arange(bt.T, dtype=torch.long) + 1).repeat_interleave(bt.B) << 40  # [T*B]
    return Schema.from_dict(spec), [dataclasses.replace(b, indices=b.indices + salt)
                                    for b in batches]


def worker(kind: str, warmup: int, steps: int, max_batches: int, dynamic: bool = False) -> dict:
    """One side of a run (``kind``: "single", or "dist" under torchrun); returns its timings."""
    import torch

    torch.set_num_threads(1)
    import bench_train as bt

    from adrec_fast.models.registry import build_model

    batches = bt.make_batches(max_batches=max_batches)
    schema, extra = bt.criteo_schema(), {}
    if dynamic:
        schema, batches = _dynamic_shape(batches)
        extra = {"dynamic_tables": {"capacity": DYNAMIC_CAPACITY}}
    torch.manual_seed(0)
    model = build_model("dlrm", schema, embedding_dim=bt.D, pooling="sum",
                        **bt.DLRM_KW, **extra)
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
    out["plan"] = (sharded["lookup.ebc"].plan.report() if "lookup.ebc" in sharded
                   else "every table dynamic, sharded by key: rank 0 holds "
                   f"{sharded['lookup.dyn'].local.num_keys:,} keys after the timed steps")
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


#: the shared Frappe file (never copied into the repository)
FRAPPE = HERE.parents[1] / "shared" / "data" / "frappe" / "valid.csv.gz"
FRAPPE_TEST_FRACTION = 0.2
#: of the rows left after the test rows: 10% of the file, for picking the epoch
FRAPPE_VALID_FRACTION = 0.125


def frappe_data(seed: int):
    """(schema, train, valid, test rows) of the Frappe file: 70/10/20, by ``valid_mask`` with
    the seed (the split depends on the seed only)."""
    import torch

    from adrec_fast.data.pipeline import infer_schema, load_all
    from adrec_fast.data.stream import valid_mask

    schema = infer_schema(FRAPPE)
    rows = load_all(FRAPPE, schema)
    n = rows.batch_size
    test = torch.from_numpy(valid_mask(0, n, n, FRAPPE_TEST_FRACTION, seed))
    rest = rows.take(torch.nonzero(~test).squeeze(1))
    m = rest.batch_size
    valid = torch.from_numpy(valid_mask(0, m, m, FRAPPE_VALID_FRACTION, seed + 1))
    return (schema, rest.take(torch.nonzero(~valid).squeeze(1)),
            rest.take(torch.nonzero(valid).squeeze(1)), rows.take(torch.nonzero(test).squeeze(1)))


def _probs(model, batch, ctx):
    """[B] probabilities of every row of ``batch``: in one process, or through the sharded
    tables, each rank scoring its share (a collective)."""
    import torch

    if ctx is None:
        return model.predict(batch)
    from adrec_fast import distributed as D

    share = batch.batch_size // ctx.world * ctx.world
    probs = model.predict(D.local_batch(batch.slice(0, share), ctx))
    everyone = [torch.empty_like(probs) for _ in range(ctx.world)]
    torch.distributed.all_gather(everyone, probs, group=ctx.group)
    rest = batch.slice(share, batch.batch_size)
    if rest.batch_size:  # the rows that do not split evenly: every rank scores them all
        everyone.append(model.predict(rest))
    return torch.cat(everyone)


def frappe_worker(kind: str, epochs: int, batch_size: int, seed: int, dropout: float | None,
                  local_dropout: bool, save: str | None) -> dict:
    """Train DLRM on Frappe in one process ("single") or as one rank ("dist"); returns per
    epoch the mean training loss and the valid and test AUC, and the time."""
    import torch

    from adrec_fast.data.metrics import auc
    from adrec_fast.data.stream import epoch_permutation
    from adrec_fast.models.registry import build_model
    from adrec_fast.training import recipes

    torch.set_num_threads(1)
    schema, train, valid, test = frappe_data(seed)
    rec = recipes.recipe("dlrm")
    if dropout is not None:
        rec.model["dropout"] = dropout
    torch.manual_seed(seed)
    model = build_model("dlrm", schema, **rec.model)
    lr, clip = rec.trainer["lr"], rec.trainer["clip_grad_norm"]
    factor, patience = rec.trainer["plateau_factor"], rec.trainer["patience"]
    ctx = ddp = None
    forward, params = model, model.dense_parameters()
    if kind == "dist":
        from adrec_fast import distributed as D

        ctx = D.init_from_env(device="cpu")
        D.check_same_config(ctx, model=model.config, schema=schema.to_dict(), seed=seed,
                            global_batch=batch_size)
        D.shard_model(model, ctx)
        if not local_dropout:
            D.global_batch_dropout(model, ctx)
        ddp = D.wrap_ddp(model, ctx)
        forward, params = ddp, list(ddp.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    n = train.batch_size
    out = {"kind": kind, "losses": [], "valid_auc": [], "test_auc": [], "train_rows": n,
           "valid_rows": valid.batch_size, "test_rows": test.batch_size, "model": rec.model}
    seconds = 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = epoch_permutation(n, seed, epoch)
        total, steps = 0.0, 0
        for start in range(0, n - batch_size + 1, batch_size):  # the last partial batch dropped
            batch = train.take(order[start:start + batch_size])
            if ctx is not None:
                batch = D.local_batch(batch, ctx)
            loss = model.loss(forward(batch), batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            loss = loss.detach()
            if ctx is not None:
                torch.distributed.all_reduce(loss, group=ctx.group)
                loss /= ctx.world
            total, steps = total + float(loss), steps + 1
        seconds += time.perf_counter() - t0
        out["losses"].append(total / steps)
        for name, rows in (("valid_auc", valid), ("test_auc", test)):
            out[name].append(auc(rows.labels.numpy(), _probs(model, rows, ctx).numpy()))
        # the recipe's schedule: every learning rate x plateau_factor after an epoch without a
        # better valid AUC, stop after `patience` such epochs (the trainer's early stopping)
        if out["valid_auc"][-1] < max(out["valid_auc"]):
            for g in opt.param_groups:
                g["lr"] *= factor
            for c in model.embedding_collections():
                c.optimizer.lr *= factor
        best = max(range(len(out["valid_auc"])), key=out["valid_auc"].__getitem__)
        if epoch - best >= patience:
            break
    out["seconds"] = seconds
    if ctx is not None:
        if save:
            D.save_sharded(save, ddp, ctx, optimizer=opt)
        out["rank"] = ctx.rank
        ctx.destroy()
    return out


def _run_side(kind: str, args) -> dict:
    if args.frappe:
        flags = ["--worker", kind, "--frappe", "--epochs", str(args.epochs), "--batch",
                 str(args.batch), "--seed", str(args.seed)]
        if args.dropout is not None:
            flags += ["--dropout", str(args.dropout)]
        if args.local_dropout:
            flags.append("--local-dropout")
        if kind == "dist" and args.save:
            flags += ["--save", args.save]
    else:
        flags = ["--worker", kind, "--warmup", str(args.warmup), "--steps", str(args.steps),
                 "--max-batches", str(args.max_batches)]
        if args.dynamic:
            flags.append("--dynamic")
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


def _cli(args: list, threads: int | None = None) -> dict:
    """``python -m adrec_fast ARGS --json``: the JSON object its last line prints."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}
    cmd = [sys.executable, "-m", "adrec_fast", *map(str, args), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n"
                         f"{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def frappe_cli_main(args) -> None:
    import tempfile

    import pyarrow as pa
    import pyarrow.csv as pcsv

    sys.path.insert(0, str(HERE))
    from frappe_models import FRAPPE as SPLIT_FILE
    from frappe_models import split_frappe

    if not SPLIT_FILE.is_file():
        raise SystemExit(f"--frappe-cli needs the shared Frappe file at {SPLIT_FILE}")
    table, parts = split_frappe()
    rows, base_seed = [], args.seed
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, idx in zip(("fit", "stop", "test"), parts):
            pcsv.write_csv(table.take(pa.array(idx)), tmp / f"{name}.csv")
        print(f"Frappe 80/10/10 (split_frappe): {len(parts[0]):,} fit, {len(parts[1]):,} "
              f"early-stop, {len(parts[2]):,} test rows; model {args.model}, its recipe",
              flush=True)
        for run in range(args.runs):
            seed = base_seed + run
            load0 = os.getloadavg()[0]
            got = {}
            for side in (("one", "two") if run % 2 == 0 else ("two", "one")):
                out = tmp / f"{side}-{seed}"
                train = ["train", tmp / "fit.csv", "--valid", tmp / "stop.csv", "--model",
                         args.model, "--seed", seed, "--out", out, "--no-progress"]
                t0 = time.perf_counter()
                if side == "two":
                    fit = _cli(train + ["--nproc", 2])
                else:
                    fit = _cli(train, threads=args.threads)
                seconds = time.perf_counter() - t0
                test = _cli(["eval", out, tmp / "test.csv"])
                got[side] = {"fit": fit, "test": test, "seconds": seconds}
            rows.append((seed, got, load0, os.getloadavg()[0]))
            one, two = got["one"], got["two"]
            print(f"seed {seed}: test AUC 1 process {one['test']['auc']:.5f}, 2 ranks "
                  f"{two['test']['auc']:.5f}, difference "
                  f"{two['test']['auc'] - one['test']['auc']:+.5f}", flush=True)
    print(f"\n`adrec-fast train fit.csv --valid stop.csv --model {args.model} --seed S` "
          f"(1 process, --threads {args.threads}) against the same with `--nproc 2`; "
          "`adrec-fast eval RUN test.csv`\n")
    print("| seed | test AUC, 1 process | test AUC, 2 ranks | difference | best epoch 1 / 2 | "
          "valid AUC 1 / 2 | train seconds 1 / 2 | load 1-min |")
    print("|---|---|---|---|---|---|---|---|")
    diffs = []
    for seed, got, l0, l1 in rows:
        one, two = got["one"], got["two"]
        d = two["test"]["auc"] - one["test"]["auc"]
        diffs.append(d)
        print(f"| {seed} | {one['test']['auc']:.5f} | {two['test']['auc']:.5f} | {d:+.5f} | "
              f"{one['fit']['best_epoch']} / {two['fit']['best_epoch']} | "
              f"{one['fit']['auc']:.5f} / {two['fit']['auc']:.5f} | "
              f"{one['seconds']:.0f} / {two['seconds']:.0f} | {l0:.1f} -> {l1:.1f} |")
    worst = max(abs(d) for d in diffs)
    print(f"\nlargest |test AUC difference| {worst:.5f} (target <= 0.002): "
          f"{'holds' if worst <= 0.002 else 'MISSED'}; mean {statistics.mean(diffs):+.5f}")


#: Criteo 1TB (24 days) distinct values per categorical field, as TorchRec's DLRM example
#: declares them (``--num_embeddings_per_feature``); Kaggle's are in bench/shapes.py
CRITEO_1TB_CARDINALITIES = (
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10, 2209,
    11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35)


def scaling_main(args) -> None:
    from shapes import CRITEO_KAGGLE_CARDINALITIES

    two = _run_side("dist", args)
    steps = len(two["step_s"])
    ex = two["exchange"]
    kinds = {k: v / steps for k, v in ex["sent_by_kind"].items()}
    B = two["B"]
    b, T, D = B // 2, 26, 16
    step_ms = statistics.median(two["step_s"]) * 1e3
    emb_ms = ex["seconds"] / steps * 1e3
    ar_ms = two["allreduce_s"] * 1e3
    compute_ms = args.compute_ms if args.compute_ms else step_ms - emb_ms - ar_ms
    P4 = two["dense_grad_bytes"]
    remote_ids = b * T * 0.5  # ids of a rank's batch share owned by the other rank, no de-dup
    u = kinds.get("id", 0.0) / 4 / remote_ids
    print(f"measured, 2 ranks x 1 thread, DLRM B={B} global (b={b} per rank), {steps} steps, "
          f"exchange path {ex['mode']}:")
    print("| per rank per step | bytes sent |")
    print("|---|---|")
    for k in ("count", "id", "row", "gradient"):
        print(f"| embedding {k}s | {kinds.get(k, 0):,.0f} |")
    print(f"| embeddings in all | {ex['bytes_sent'] / steps:,.0f} (received "
          f"{ex['bytes_received'] / steps:,.0f}) |")
    print(f"| dense gradients (DDP all-reduce, ring: 2(N-1)/N x) | {P4:,.0f} x 1 |")
    print(f"\nstep {step_ms:.1f} ms median: embedding exchange {emb_ms:.1f} ms (waiting "
          f"included), dense all-reduce alone {ar_ms:.1f} ms, compute "
          f"{step_ms - emb_ms - ar_ms:.1f} ms; de-duplication leaves u = {u:.3f} of the remote "
          f"ids; compute used below: {compute_ms:.1f} ms per {b} rows")
    alpha = args.alpha_us * 1e-6

    def step_s(n, bw_gbit, t_c):
        e = u * b * T * (n - 1) / n * (4 + 2 * 4 * D)
        a = 2 * (n - 1) / n * P4
        lat = alpha * 6 * (n - 1)
        return t_c + (e + a) / (bw_gbit * 1e9 / 8) + lat, e, a, lat

    machines = [("one rank here", compute_ms / 1e3)]
    if args.speedup:
        machines.append((f"{args.speedup:g}x faster", compute_ms / 1e3 / args.speedup))
    print(f"\nprojection (alpha = {args.alpha_us:g} us per message; per-rank batch {b}):\n")
    print("| machine compute | N | network | embedding MB/step | dense MB/step | latency ms | "
          "step ms | samples/s | vs N x 1 machine |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, t_c in machines:
        for n in (8, 64, 512):
            for bw in (25, 100):
                t, e, a, lat = step_s(n, bw, t_c)
                print(f"| {name} | {n} | {bw} Gb/s | {e / 1e6:.2f} | {a / 1e6:.2f} | "
                      f"{lat * 1e3:.1f} | {t * 1e3:.1f} | {n * b / t:,.0f} | {t_c / t:.0%} |")
    print("\nmemory per machine (rows x (D + 1 Adagrad) x 4 bytes, spread evenly by row-wise "
          "sharding; the largest table is the floor of table-wise sharding):\n")
    print("| tables | rows | total GB | largest table GB | GB per machine at 8 / 64 / 512 |")
    print("|---|---|---|---|---|")
    for name, card in (("Criteo Kaggle", CRITEO_KAGGLE_CARDINALITIES),
                       ("Criteo 1TB", CRITEO_1TB_CARDINALITIES)):
        rows = sum(card)
        gb = rows * (D + 1) * 4 / 1e9
        print(f"| {name} | {rows:,} | {gb:.2f} | {max(card) * (D + 1) * 4 / 1e9:.2f} | "
              f"{gb / 8:.3f} / {gb / 64:.4f} / {gb / 512:.5f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-batches", type=int, default=128, help="cap on the batch pool")
    ap.add_argument("--quick", action="store_true", help="1 run, 5 steps, a pool of 8")
    ap.add_argument("--dynamic", action="store_true",
                    help="every table dynamic (keyed, sharded by key), capacity 2^22 keys")
    ap.add_argument("--worker", choices=["single", "dist"], help=argparse.SUPPRESS)
    ap.add_argument("--frappe", action="store_true",
                    help="compare the test AUC of 2 ranks and 1 process on Frappe")
    ap.add_argument("--epochs", type=int, default=30,
                    help="--frappe: most epochs per side (early stopping ends a run sooner)")
    ap.add_argument("--batch", type=int, default=None,
                    help="--frappe: global batch (default: the DLRM recipe's)")
    ap.add_argument("--seed", type=int, default=0,
                    help="--frappe: model seed and data split of the first run (+1 per run)")
    ap.add_argument("--dropout", type=float, default=None,
                    help="--frappe: dropout of the tower (default: the DLRM recipe's)")
    ap.add_argument("--local-dropout", action="store_true",
                    help="--frappe: each rank draws its own dropout masks (default: the global "
                         "batch's, as one process draws them: global_batch_dropout)")
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--frappe-cli", action="store_true",
                    help="compare the test AUC of `adrec-fast train --nproc 2` and of one "
                         "process on Frappe's 80/10/10 split, through the command line")
    ap.add_argument("--model", default="deepfm", help="--frappe-cli: the model (default deepfm)")
    ap.add_argument("--threads", type=int, default=2,
                    help="--frappe-cli: threads of the one-process run (default 2)")
    ap.add_argument("--scaling", action="store_true",
                    help="measure one 2-rank run and project it to 8, 64, 512 machines")
    ap.add_argument("--compute-ms", type=float, default=None,
                    help="--scaling: per-rank compute per step instead of the measured one")
    ap.add_argument("--alpha-us", type=float, default=25.0,
                    help="--scaling: cost of one message in microseconds (default 25)")
    ap.add_argument("--speedup", type=float, default=32.0,
                    help="--scaling: also project a machine this many times faster (0: no)")
    args = ap.parse_args(argv)
    if args.scaling:
        if args.quick:
            args.steps, args.warmup, args.max_batches = 5, 2, 8
        return scaling_main(args)
    if args.frappe_cli:
        if args.runs < 1:
            raise SystemExit("--runs must be >= 1")
        return frappe_cli_main(args)
    if args.frappe:
        return frappe_main(args)
    if args.quick:
        args.runs, args.steps, args.warmup, args.max_batches = 1, 5, 2, 8
    if min(args.runs, args.steps, args.max_batches) < 1 or args.warmup < 0:
        raise SystemExit("--runs, --steps and --max-batches must be >= 1, --warmup >= 0")
    if args.worker:
        res = worker(args.worker, args.warmup, args.steps, args.max_batches, args.dynamic)
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
    print(f"\nDLRM B={rows[0]['B']} global{', dynamic tables' if args.dynamic else ''}, 1 "
          f"thread per process, {args.steps} timed steps per side per run\n")
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


def frappe_main(args) -> None:
    import tempfile

    from adrec_fast.training import recipes

    if args.batch is None:
        args.batch = recipes.recipe("dlrm").trainer["batch_size"]
    if args.runs < 1 or args.epochs < 1 or args.batch < 2 or args.batch % 2:
        raise SystemExit("--frappe: --runs and --epochs must be >= 1, --batch even and >= 2")
    if args.worker:
        res = frappe_worker(args.worker, args.epochs, args.batch, args.seed, args.dropout,
                            args.local_dropout, args.save)
        if res.get("rank", 0) == 0:
            print("RESULT " + json.dumps(res), flush=True)
        return
    if not FRAPPE.is_file():
        raise SystemExit(f"--frappe needs the shared Frappe file at {FRAPPE}")
    from adrec_fast.data.metrics import auc
    from adrec_fast.models.checkpoint import load_model

    rows, base_seed = [], args.seed
    for run in range(args.runs):
        args.seed = base_seed + run  # each run its own seed (model and split)
        _, _, _, test = frappe_data(args.seed)
        load0 = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            args.save = str(Path(tmp) / "run")
            order = ["single", "dist"] if run % 2 == 0 else ["dist", "single"]
            got = {kind: _run_side(kind, args) for kind in order}
            model, _, _ = load_model(args.save)  # the sharded save, on one process
            reloaded = auc(test.labels.numpy(), model.predict(test).numpy())
        rows.append((got["single"], got["dist"], reloaded, load0, os.getloadavg()[0]))
    s = rows[0][0]
    masks = "per-rank" if args.local_dropout else "global-batch"
    print(f"\nDLRM {s['model']}, {masks} dropout masks, on Frappe: {s['train_rows']:,} "
          f"training, {s['valid_rows']:,} "
          f"valid, {s['test_rows']:,} test rows, global batch {args.batch}, up to "
          f"{args.epochs} epochs, run i: seed {base_seed} + i, 1 thread per process\n")
    print("| run | test AUC at the best valid epoch: 1 process / 2 ranks (epoch) | difference | "
          "last-epoch test AUC 1 / 2 | 2-rank save, load_model AUC | last-epoch loss 1 / 2 | "
          "train seconds 1 / 2 | load 1-min |")
    print("|---|---|---|---|---|---|---|---|")
    diffs = []
    for i, (one, two, reloaded, l0, l1) in enumerate(rows):
        b1 = max(range(len(one["valid_auc"])), key=lambda e: one["valid_auc"][e])
        b2 = max(range(len(two["valid_auc"])), key=lambda e: two["valid_auc"][e])
        d = two["test_auc"][b2] - one["test_auc"][b1]
        diffs.append(d)
        print(f"| {i} | {one['test_auc'][b1]:.5f} ({b1 + 1}) / {two['test_auc'][b2]:.5f} "
              f"({b2 + 1}) | {d:+.5f} | {one['test_auc'][-1]:.5f} / {two['test_auc'][-1]:.5f} | "
              f"{reloaded:.5f} | {one['losses'][-1]:.5f} / {two['losses'][-1]:.5f} | "
              f"{one['seconds']:.0f} / {two['seconds']:.0f} | {l0:.1f} -> {l1:.1f} |")
    for one, two, *_ in rows:
        print("per-epoch test AUC, 1 process:", " ".join(f"{a:.4f}" for a in one["test_auc"]))
        print("per-epoch test AUC, 2 ranks:  ", " ".join(f"{a:.4f}" for a in two["test_auc"]))
    worst = max(abs(d) for d in diffs)
    print(f"\nlargest |AUC difference| at the best epoch {worst:.5f} (target <= 0.002): "
          f"{'holds' if worst <= 0.002 else 'MISSED'}")


if __name__ == "__main__":
    main()
