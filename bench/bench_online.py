# SPDX-License-Identifier: Apache-2.0
"""Freshness pays: Monolith's protocol on the drifting synthetic stream.

The stream is ``7 * period_rows`` rows of ``SyntheticCTR(drift=True)`` (7 periods, "days").
A model is trained as a batch on the first 5/7 (the existing ``Trainer``, shuffled epochs);
then, on the last 2/7:

  (a) frozen: the batch model's AUC on those rows, never updated;
  (b) online: a copy of the batch model (optimizer state included) trained on those rows in
      one pass in order, scored before each step (progressive AUC).

It prints both, their difference in AUC points (x100), the oracle AUC per period, and the
samples/s of the online pass against an offline epoch of the same model on the same rows
(``Trainer.fit``, one epoch in order; both fed from memory, timed round by round, alternating
which goes first; the loops as each reports them and the whole calls). ``--quick`` runs a small
stream.

    python bench/bench_online.py                 # default: 7 x 100,000 rows, DIN, 1 thread

``--throughput`` compares the training speed alone: the same model trained online on dynamic
tables (``train_online``, the ``train --online`` default: no vocabulary, keys hashed per value)
against an offline epoch in order on static tables (``Trainer.fit``), both on the same
``--rows`` rows of the drifting stream encoded in memory beforehand (each schema's own encoding,
timed apart), fresh models from the same seed every round, rounds alternating which goes
first after an untimed warm-up, median of ``--runs``. Samples/s of the loops as each reports
them, of the whole calls (online: its progressive metrics included; offline: its setup), and
the process CPU time per row (what a busy machine distorts least).

    python bench/bench_online.py --throughput --runs 3
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from adrec_fast.data.batch import Batch
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.models.registry import build_model
from adrec_fast.training.loop import Trainer
from adrec_fast.training.online import freshness, online_schema, train_online

# the demo's model on this data (adrec_fast/cli.py DEMO_MODEL_KW): DIN without an MLP
MODEL_KW = {"din": {"hidden": []}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--period-rows", type=int, default=100_000)
    ap.add_argument("--model", default="din")
    ap.add_argument("--epochs", type=int, default=2, help="batch epochs on the first 5/7")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--embedding-lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5, help="rounds of the throughput comparison")
    ap.add_argument("--quick", action="store_true", help="7 x 20,000 rows, 1 round")
    ap.add_argument("--no-drift", action="store_true",
                    help="control: the same protocol on the stationary generator")
    ap.add_argument("--static-vocab", action="store_true",
                    help="the generator's full vocabularies (static tables) instead of dynamic "
                         "tables")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--throughput", action="store_true",
                    help="only the throughput comparison: online on dynamic tables vs offline "
                         "on static ones (see the module doc)")
    ap.add_argument("--rows", type=int, default=200_000, help="rows of --throughput")
    a = ap.parse_args(argv)
    if a.quick:
        a.period_rows, a.runs = 20_000, 1
    torch.set_num_threads(a.threads)
    if a.throughput:
        return throughput(a)
    P = a.period_rows
    fr = freshness(a.model, period_rows=P, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                   embedding_lr=a.embedding_lr, seed=a.seed, drift=not a.no_drift,
                   dynamic=not a.static_vocab, model_kw=MODEL_KW.get(a.model, {}))
    trainer, tail, res = fr.trainer, fr.tail, fr.online
    y_tail = np.concatenate([b.labels.numpy() for b in tail])
    oracle, oracle_tail, frozen_auc = fr.oracle_auc_per_period, fr.oracle_auc_tail, fr.frozen_auc
    t_data, t_batch = fr.data_s, fr.batch_s

    # warm-up (first-call allocations), untimed: both paths on a few steps of a copy
    warm = tail[0].slice(0, 20 * a.batch_size)
    w = copy.deepcopy(trainer)
    train_online(w.model, [warm], trainer=w)
    w.shuffle = False
    w.fit(warm, epochs=w.epoch + 1)
    # online and offline from the same start: each round copies the batch model and trainer
    online_sps, offline_sps, online_wall, offline_wall = [], [], [], []
    for r in range(a.runs):
        order = ("online", "offline") if r % 2 == 0 else ("offline", "online")
        for which in order:
            # one deep copy of the trainer: its model and optimizers stay bound to each other
            tr = copy.deepcopy(trainer)
            m = tr.model
            if which == "online":
                t = time.perf_counter()
                out = train_online(m, tail, trainer=tr, window_rows=P // 4)
                online_wall.append(y_tail.size / (time.perf_counter() - t))
                online_sps.append(out.samples_per_s)
            else:
                tr.shuffle = False
                rows = Batch.concat(tail)
                t = time.perf_counter()
                h = tr.fit(rows, epochs=trainer.epoch + 1).history[-1]
                offline_wall.append(y_tail.size / (time.perf_counter() - t))
                offline_sps.append(h["samples_per_s"])
    on, off = statistics.median(online_sps), statistics.median(offline_sps)
    on_w, off_w = statistics.median(online_wall), statistics.median(offline_wall)
    gain = 100 * (res.progressive_auc - frozen_auc)
    load1 = os.getloadavg()[0]
    kind = "stationary" if a.no_drift else "drifting"
    tables = "static" if a.static_vocab else "dynamic"
    print(f"{kind} stream: 7 x {P:,} rows ({t_data:.1f}s to generate); model {a.model}, "
          f"{tables} tables, batch {a.batch_size}, {a.epochs} batch epochs on 5/7 "
          f"({t_batch:.1f}s), {a.threads} thread(s)")
    print("oracle AUC per period: " + ", ".join(f"{x:.4f}" for x in oracle))
    print(f"last 2/7 ({y_tail.size:,} rows): oracle {oracle_tail:.4f}, frozen batch model "
          f"{frozen_auc:.4f}, online progressive {res.progressive_auc:.4f} (logloss "
          f"{res.progressive_logloss:.4f}): online - frozen = {gain:+.2f} AUC points")
    frozen_w = fr.frozen_windows
    print("per quarter period, online: " + ", ".join(f"{w['auc']:.4f}" for w in res.windows))
    print("per quarter period, frozen: " + ", ".join(f"{x:.4f}" for x in frozen_w))
    print(f"samples/s (median of {a.runs}): online {on:,.0f} [{min(online_sps):,.0f}-"
          f"{max(online_sps):,.0f}], offline {off:,.0f} [{min(offline_sps):,.0f}-"
          f"{max(offline_sps):,.0f}]: online/offline = {on / off:.3f} (loops); whole calls "
          f"online {on_w:,.0f}, offline {off_w:,.0f}: {on_w / off_w:.3f}; 1-min load {load1:.2f}")
    if a.json:
        print(json.dumps({"oracle_auc_per_period": oracle, "oracle_auc_tail": oracle_tail,
                          "frozen_auc": frozen_auc, "frozen_auc_per_quarter": frozen_w,
                          "online_auc_per_quarter": [w["auc"] for w in res.windows],
                          "progressive_auc": res.progressive_auc,
                          "progressive_logloss": res.progressive_logloss, "gain_points": gain,
                          "online_samples_per_s": on, "offline_samples_per_s": off,
                          "ratio": on / off, "online_wall_samples_per_s": on_w,
                          "offline_wall_samples_per_s": off_w, "wall_ratio": on_w / off_w,
                          "load1": load1}))
    return 0


def throughput(a) -> int:
    """Online on dynamic tables vs offline on static tables, the same model and rows."""
    gen = SyntheticCTR(seed=a.seed, drift=True, period_rows=max(a.rows // 7, 1),
                       drift_periods=7)
    static = gen.schema()
    dynamic = online_schema(static, keep_vocabularies=False)
    tables = list(gen.chunks(a.rows, chunk_rows=65536))
    enc = {}
    for name, schema in (("static", static), ("dynamic", dynamic)):
        t = time.perf_counter()
        enc[name] = [schema.encode(tb) for tb in tables]
        enc[name + "_encode_s"] = time.perf_counter() - t
    rows = Batch.concat(enc["static"])
    kw = dict(MODEL_KW.get(a.model, {}), embedding_dim=16)

    def run(which: str, n_rows: int | None = None):
        torch.manual_seed(a.seed)
        if which == "offline":
            m = build_model(a.model, static, **kw)
            tr = Trainer(m, lr=a.lr, embedding_lr=a.embedding_lr, batch_size=a.batch_size,
                         seed=a.seed, progress=False)
            tr.shuffle = False
            data = rows if n_rows is None else rows.slice(0, n_rows)
            t, c = time.perf_counter(), time.process_time()
            loop = tr.fit(data, epochs=1).history[-1]["samples_per_s"]
        else:
            m = build_model(a.model, dynamic, embedding_l2=0.0, **kw)
            tr = Trainer(m, lr=a.lr, embedding_lr=a.embedding_lr, batch_size=a.batch_size,
                         seed=a.seed, progress=False)
            data = enc["dynamic"] if n_rows is None else [enc["dynamic"][0].slice(0, n_rows)]
            t, c = time.perf_counter(), time.process_time()
            loop = train_online(m, data, trainer=tr).samples_per_s
        n = a.rows if n_rows is None else n_rows
        return {"loop": loop, "wall": n / (time.perf_counter() - t),
                "cpu_us_per_row": 1e6 * (time.process_time() - c) / n}

    run("online", 20 * a.batch_size), run("offline", 20 * a.batch_size)  # warm-up, untimed
    got = {"online": [], "offline": []}
    loads = [os.getloadavg()[0]]
    for r in range(a.runs):
        for which in (("online", "offline") if r % 2 == 0 else ("offline", "online")):
            got[which].append(run(which))
        loads.append(os.getloadavg()[0])
    med = {w: {k: statistics.median(x[k] for x in v) for k in v[0]} for w, v in got.items()}
    ratio = {k: med["online"][k] / med["offline"][k] for k in ("loop", "wall")}
    ratio["cpu"] = med["offline"]["cpu_us_per_row"] / med["online"]["cpu_us_per_row"]
    print(f"throughput: model {a.model}, {a.rows:,} rows of the drifting stream, batch "
          f"{a.batch_size}, {a.threads} thread(s), median of {a.runs} alternating rounds; "
          f"1-min load {', '.join(f'{x:.2f}' for x in loads)}")
    print(f"encoding (not timed below): static {a.rows / enc['static_encode_s']:,.0f} rows/s, "
          f"dynamic (hashed keys) {a.rows / enc['dynamic_encode_s']:,.0f} rows/s")
    for w in ("online", "offline"):
        v = got[w]
        print(f"  {w:7s} ({'dynamic' if w == 'online' else 'static'} tables): loop "
              f"{med[w]['loop']:,.0f} samples/s [{min(x['loop'] for x in v):,.0f}-"
              f"{max(x['loop'] for x in v):,.0f}], whole call {med[w]['wall']:,.0f} "
              f"[{min(x['wall'] for x in v):,.0f}-{max(x['wall'] for x in v):,.0f}], CPU "
              f"{med[w]['cpu_us_per_row']:.2f} us/row")
    print(f"online/offline: whole calls {ratio['wall']:.3f}, loops {ratio['loop']:.3f}, CPU "
          f"time per row {ratio['cpu']:.3f} (target >= 0.90)")
    if a.json:
        print(json.dumps({"model": a.model, "rows": a.rows, "runs": got, "median": med,
                          "ratio": ratio, "load1": loads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
