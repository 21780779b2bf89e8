# SPDX-License-Identifier: Apache-2.0
"""Lookups/s of the dynamic embedding table with N live keys (default 10M) at D=16.

Providers, alternating round by round on the same fresh batch of keys drawn uniformly from the
live keys (every lookup misses the caches: the slot array alone is hundreds of MB):

- ``map find``: the native key -> row map alone, read-only (serving);
- ``map train``: the map alone in training mode (every key a hit: counters and clock updated);
- ``dict``: a Python dict key -> row, the same job in Python (``keys.tolist()`` included);
- ``dynamic lookup``: ``DynamicEmbedding`` in eval mode: map + the fused pooled lookup;
- ``static lookup``: the same fused lookup with the rows already known (a static table);
- ``dict + tensor``: the dict, then ``weight.index_select``;
- ``dynamic train step`` / ``static train step``: forward + backward with the fused row-wise
  Adagrad update, through the dynamic table and with the rows already known.

One key per bag. ``python bench/bench_dynamic_table.py --runs 3`` (``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import add_args, alternate, cycle, header, load1, settle, warm  # noqa: E402

from adrec_fast import functional as F  # noqa: E402
from adrec_fast.nn.dynamic_table import DynamicEmbedding  # noqa: E402
from adrec_fast.optim import FusedRowwiseAdagrad  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap, rounds=20)
    ap.add_argument("--keys", type=int, default=10_000_000, help="live keys in the table")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=65536, help="keys per call")
    ap.add_argument("--pool", type=int, default=32, help="batches in the pool")
    args = settle(ap.parse_args())
    if args.quick:
        args.keys, args.pool = min(args.keys, 1_000_000), min(args.pool, 8)
    print(header(args, "bench_dynamic_table"))

    rng = np.random.default_rng(0)
    keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, args.keys,
                        dtype=np.int64)
    t0 = time.perf_counter()
    # An LFU table (its training lookups keep the per-key counters) with 1/16 headroom: it
    # never fills, so nothing is evicted while timing.
    emb = DynamicEmbedding(args.dim, args.keys + args.keys // 16, eviction="lfu",
                           optimizer=FusedRowwiseAdagrad(lr=0.01))
    kt = torch.from_numpy(keys)
    for b in range(0, args.keys, 1 << 20):
        emb.rows(kt[b:b + (1 << 20)], train=True)
    assert emb.num_keys == args.keys, "random 64-bit keys repeated: pick another seed"
    t_fill = time.perf_counter() - t0
    emb.eval()
    t0 = time.perf_counter()
    rows_all = emb.rows(kt).tolist()
    d = dict(zip(keys.tolist(), rows_all))  # the Python baseline maps keys to the same rows
    del rows_all
    t_dict = time.perf_counter() - t0
    gc.collect()
    print(f"filled {args.keys:,} keys in {t_fill:.1f} s (map + row init); dict built in "
          f"{t_dict:.1f} s; map slots {emb._map.slots:,}")

    pool = [torch.from_numpy(keys[rng.integers(0, args.keys, args.batch)])
            for _ in range(args.pool)]
    offsets = torch.arange(args.batch + 1)
    now = [1]

    def map_find(k):
        return emb._map.find(k.numpy())

    def map_train(k):
        now[0] += 1
        return emb._map.lookup(k.numpy(), now[0])

    def dict_rows(k):
        return torch.tensor([d.get(x, 0) for x in k.tolist()])

    def dyn_lookup(k):
        with torch.no_grad():
            return emb(k)

    def static_lookup(rows):
        w = emb.weight
        return F.embedding_bag(w, torch.tensor([0, w.size(0)]), rows, offsets)

    def dict_tensor(k):
        return emb.weight.index_select(0, dict_rows(k))

    def dyn_train(k):
        emb.train()
        emb(k).sum().backward()
        emb.eval()

    def static_train(rows):
        w = emb.weight
        F.embedding_bag(w, torch.tensor([0, w.size(0)]), rows, offsets,
                        optimizer=emb.optimizer, state=emb.state).sum().backward()

    steps = {"map find": map_find, "map train": map_train, "dict": dict_rows,
             "dynamic lookup": dyn_lookup, "static lookup": static_lookup,
             "dict + tensor": dict_tensor, "dynamic train step": dyn_train,
             "static train step": static_train}
    rows_of = {id(k): emb.rows(k) for k in pool}  # the static table's ids: known in advance
    prepare = {name: (lambda k: rows_of[id(k)]) for name in ("static lookup", "static train step")}
    # once, before timing: every path gives the same rows / vectors
    k = pool[0]
    assert torch.equal(torch.from_numpy(map_find(k)), rows_of[id(k)])
    assert torch.equal(dict_rows(k), rows_of[id(k)])
    torch.testing.assert_close(dyn_lookup(k), static_lookup(rows_of[id(k)]))
    torch.testing.assert_close(dict_tensor(k), static_lookup(rows_of[id(k)]))

    rates: dict[str, list[float]] = {name: [] for name in steps}
    loads = []
    for run in range(args.runs):
        items = cycle(pool, start=run * 7)
        before = load1()

        def warm_step(name):
            fn, prep = steps[name], prepare.get(name)
            return (lambda k: fn(prep(k))) if prep else fn

        warm({n: warm_step(n) for n in steps}, items, seconds=0.5 if args.quick else 2.0)
        times = alternate(steps, items, args.rounds, prepare)
        loads.append((before, load1()))
        for name, ts in times.items():
            rates[name].append(args.batch / statistics.median(ts))

    # per-call overhead of the map (shared lock + binding), one key
    one = pool[0][:1].numpy()
    ts = []
    for _ in range(2000):
        t = time.perf_counter()
        emb._map.find(one)
        ts.append(time.perf_counter() - t)

    def fmt(v):
        return f"{statistics.median(v) / 1e6:.2f} ({min(v) / 1e6:.2f}-{max(v) / 1e6:.2f})"

    print()
    print(f"### Dynamic table: {args.keys:,} live keys, D={args.dim}, {args.batch:,} keys per "
          f"call, {args.threads} threads")
    print()
    print("1-minute load before / after each run: "
          + ", ".join(f"{a:.2f} / {b:.2f}" for a, b in loads))
    print()
    print("| provider | M lookups/s, median over runs (min-max) | vs static lookup |")
    print("|---|---|---|")
    base = statistics.median(rates["static lookup"])
    for name, v in rates.items():
        print(f"| {name} | {fmt(v)} | {statistics.median(v) / base:.2f}x |")
    print()
    print(f"- one-key `find` call (shared lock + binding): median "
          f"{statistics.median(ts) * 1e6:.2f} us")
    print(f"- peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          "(table rows, Adagrad state, map, dict and key pool)")


if __name__ == "__main__":
    main()
