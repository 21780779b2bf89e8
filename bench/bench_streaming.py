# SPDX-License-Identifier: Apache-2.0
"""Streaming training vs the in-memory path, through the command users run (a script, not a
test: each run is a child ``adrec-fast train`` process).

1. Throughput: ``--small`` (a file that fits) trains one epoch with ``--stream off`` and
   ``--stream on``, alternating run by run so that a change of machine load hits both;
   samples/s is the trainer's own figure (the training loop, batches included), medians and
   spread over ``--runs``.
2. Memory: ``--big`` (the 8M-row file) trains one epoch with ``--stream auto`` (which streams
   it), ``--big-runs`` times.

Peak RSS is the child's ``ru_maxrss`` (``os.wait4``), embedding tables and optimizer state
included. The schema hashes C1..C26 into ``--hash-size`` rows each (bounded tables) and
standardises I1..I13 (log1p), so fitting it reads the file once for the dense statistics.

    python bench/make_criteo_tsv.py /tmp/criteo_1m.tsv --rows 1000000
    python bench/make_criteo_tsv.py /tmp/criteo_8m.tsv --rows 8000000
    python bench/bench_streaming.py --small /tmp/criteo_1m.tsv --big /tmp/criteo_8m.tsv
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load1() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def train(data: Path, schema: Path, stream: str, model: str, extra: list[str]) -> dict:
    """One child ``adrec-fast train`` run -> its JSON line plus wall seconds and peak RSS."""
    out = Path(tempfile.mkdtemp(prefix="adrec-bench-")) / "run"
    cmd = [sys.executable, "-m", "adrec_fast", "train", str(data), "--schema", str(schema),
           "--out", str(out), "--model", model, "--epochs", "1", "--threads", "1",
           "--no-progress", "--json", "--stream", stream, *extra]
    l0, t0 = load1(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(out.parent, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stdout}\n{stderr}")
    res = json.loads(stdout.strip().splitlines()[-1])
    held = next((ln for ln in stdout.splitlines() if "training rows" in ln), "")
    return {"stream": stream, "samples_per_s": res["samples_per_s"], "auc": res["auc"],
            "rows_train": res["rows_train"], "wall_s": round(wall, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "load1_start": l0,
            "load1_end": load1(), "held": held.split("(")[-1].split(")")[0],
            "cmd": " ".join(cmd[1:])}


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=Path, default=Path("/tmp/criteo_1m.tsv"))
    ap.add_argument("--big", type=Path, default=Path("/tmp/criteo_8m.tsv"))
    ap.add_argument("--runs", type=int, default=3, help="throughput runs per path")
    ap.add_argument("--big-runs", type=int, default=1)
    ap.add_argument("--model", default="deepfm")
    ap.add_argument("--hash-size", type=int, default=1 << 17)
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--skip-big", action="store_true")
    a = ap.parse_args()

    from adrec_fast.data.criteo import criteo_schema

    schema = Path(tempfile.gettempdir()) / f"adrec_bench_criteo_hash{a.hash_size}.json"
    criteo_schema(hash_size=a.hash_size).save(schema)
    results = []
    if not a.skip_small:
        for r in range(a.runs):
            for stream in (("off", "on") if r % 2 == 0 else ("on", "off")):
                res = train(a.small, schema, stream, a.model, [])
                results.append({"file": str(a.small), **res})
                print(json.dumps(results[-1]), flush=True)
        off = [x["samples_per_s"] for x in results if x["stream"] == "off"]
        on = [x["samples_per_s"] for x in results if x["stream"] == "on"]
        ratios = [b / c for b, c in zip(on, off)]
        print(f"{a.small.name}: in memory {spread(off)} samples/s, streamed {spread(on)} "
              f"samples/s; streamed/in-memory per run pair "
              f"{', '.join(f'{x:.3f}' for x in ratios)} (median "
              f"{statistics.median(ratios):.3f}); peak RSS in memory "
              f"{max(x['peak_rss_mib'] for x in results if x['stream'] == 'off')} MiB, streamed "
              f"{max(x['peak_rss_mib'] for x in results if x['stream'] == 'on')} MiB", flush=True)
    if not a.skip_big:
        for _ in range(a.big_runs):
            res = train(a.big, schema, "auto", a.model, [])
            results.append({"file": str(a.big), **res})
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
