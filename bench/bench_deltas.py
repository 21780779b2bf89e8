# SPDX-License-Identifier: Apache-2.0
"""What row deltas cost: writing them during online training, and applying them in a Scorer.

For static and dynamic tables (``--tables``), one online pass over a drifting synthetic stream
(26 categorical fields, 13 dense, DeepFM, D=16) runs with a ``DeltaExporter`` every
``--every`` rows and, interleaved run by run on the same stream, without one; then a Scorer on
the base applies every delta with ``apply_delta``. Reported: ms and MB per delta written,
rows per delta, the whole pass's rows/s with and without export, and the ms per delta
applied (the Scorer's copy of its tables, the rows, the re-packing of the dense part).

    python bench/bench_deltas.py --rows 200000 --every 50000 --runs 3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from adrec_fast.data.schema import Schema
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.models.registry import build_model
from adrec_fast.serving import Scorer
from adrec_fast.serving.deltas import pending
from adrec_fast.training.export import DeltaExporter
from adrec_fast.training.loop import Trainer
from adrec_fast.training.online import online_schema, train_online


def _model(schema, dynamic: bool):
    torch.manual_seed(0)
    kw = {"dynamic_tables": {"capacity": 1 << 18}} if dynamic else {}
    return build_model("deepfm", schema, embedding_dim=16, hidden=(400, 400, 400),
                       batch_norm=True, **kw)


def _one(schema, table, dynamic: bool, every: int | None, bs: int, out: Path | None):
    model = _model(schema, dynamic)
    ex = None if every is None else DeltaExporter(model, out, every_rows=every)
    trainer = Trainer(model, progress=False, batch_size=bs)
    t0 = time.perf_counter()  # the whole call: the deltas are written between the steps
    res = train_online(model, table.to_batches(max_chunksize=65536), schema=schema,
                       batch_size=bs, exporter=ex, trainer=trainer)
    return res.rows / (time.perf_counter() - t0), ex


def _apply(out: Path) -> list[float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamic tables: served by the torch forward
        sc = Scorer.load(out / "base")
    ms = []
    for _, path in pending(out, 0):
        t0 = time.perf_counter()
        sc.apply_delta(path)
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--every", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tables", default="static,dynamic")
    a = ap.parse_args()
    gen = SyntheticCTR(n_rows=a.rows, seed=0, n_sparse=26, n_dense=13, max_len=4,
                       max_cardinality=100_000, n_users=50_000, n_items=50_000, drift=True,
                       period_rows=a.rows // 7)
    base = gen.schema()
    table = gen.generate(a.rows)
    print(f"{a.rows:,} rows, a delta every {a.every:,}, batch {a.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print("| tables | table rows | delta MB | rows per delta | ms per delta written | "
          "rows/s of the pass, with / without export | ms per delta applied |")
    print("|---|---|---|---|---|---|---|")
    for kind in a.tables.split(","):
        dynamic = kind == "dynamic"
        schema = base
        if dynamic:  # the generator's vocabularies dropped: the tables learn their keys
            d = base.to_dict()
            for f in d["fields"]:
                if f.get("vocabulary") is not None:
                    f.pop("vocabulary")
            schema = online_schema(Schema.from_dict(d))
            schema.fit(table)  # dense statistics
        with_s, without_s, write_ms, mb, rows, apply_ms = [], [], [], [], [], []
        for _ in range(a.runs):
            with tempfile.TemporaryDirectory() as d:
                sps, ex = _one(schema, table, dynamic, a.every, a.batch_size, Path(d))
                with_s.append(sps)
                write_ms += [s["ms"] for s in ex.stats]
                mb += [s["bytes"] / 2**20 for s in ex.stats]
                rows += [s["rows"] for s in ex.stats]
                apply_ms += _apply(Path(d))
                n_rows = sum(int(t.ebc.weight.shape[0]) for t in ex.tables) + sum(
                    t.dyn.num_rows for t in ex.dynamic)
            without_s.append(_one(schema, table, dynamic, None, a.batch_size, None)[0])
        med = statistics.median
        print(f"| {kind} | {n_rows:,} | {med(mb):.1f} | {med(rows):,.0f} | {med(write_ms):.0f} "
              f"({min(write_ms):.0f}-{max(write_ms):.0f}) | {med(with_s):,.0f} / "
              f"{med(without_s):,.0f} | {med(apply_ms):.0f} ({min(apply_ms):.0f}-"
              f"{max(apply_ms):.0f}) |", flush=True)


if __name__ == "__main__":
    main()
