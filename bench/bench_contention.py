# SPDX-License-Identifier: Apache-2.0
"""CPU contention: how much slower a training step and a scoring request get when another
process keeps 2 threads busy on the same cores. Ad servers and trainers rarely own a machine;
losing half of 2 cores should cost about 2x, not more (target: slowdown <= 2.5x, median of 3
runs).

Workloads (2 torch intra-op threads each, fresh inputs every round):

- ``adrec_step``: one row-wise Adagrad training step of ``nn.EmbeddingBagCollection`` (forward,
  backward with the update fused), the 26 Criteo tables capped at 1e6 rows, D=16, B=4096, one id
  per field, each round on the next batch of a pool touching >= 4x the L3;
- ``fbgemm_step``: the same step with FBGEMM TBE (EXACT_ROWWISE_ADAGRAD), skipped with a note
  when fbgemm_gpu is not importable;
- ``scorer_n64``: ``Scorer.score`` of one request, 64 candidates, raw feature values (strings for
  the hashed categorical fields, floats for the dense ones), DLRM of the serving benchmark's
  shape, each round on the next request of a pool whose distinct values cover >= 4x the L3.

Every run times all workloads alternating round by round, once alone and once under each
contention mode, the phase order reversed from one run to the next so that drift in load does not
land on one phase. Contention (``--burn``): ``matmul``: 2 processes each multiplying 256x256
matrices with 1 BLAS thread (busy cores plus cache and memory traffic); ``spin``: 2 processes in
a pure Python loop (busy cores only). The burners' CPU time over the phase, in threads, is
printed: about 1.0 when they share 2 otherwise idle cores with the benchmark's 2 threads (up to
2.0 while the benchmark waits); well below 1 means they did not get their share.

    python bench/bench_contention.py --runs 3       # about 2 min on 2 quiet cores
    python bench/bench_contention.py --quick        # smoke run, about 40 s
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import _harness as H
from bench_embedding_bag import (
    BUILDERS,
    FBGEMM,
    FBGEMM_WHY,
    _release,
    check_step,
)
from shapes import EmbShape, make_pool, make_weights, pool_touched_bytes

TARGET = 2.5
N_CAND = 64
# Burner processes: each keeps exactly one thread busy (1 BLAS thread, or the GIL), and exits
# when its parent does, so a benchmark killed mid-run leaves no spinning process behind.
BURNERS = {
    "matmul": ("import os\n"
               "import numpy as np\n"
               "parent = os.getppid()\n"
               "a = np.random.rand(256, 256)\n"
               "while os.getppid() == parent:\n"
               "    b = a @ a\n"
               "    a = b / np.abs(b).max()\n"),
    "spin": ("import os\n"
             "parent = os.getppid()\n"
             "while os.getppid() == parent:\n"
             "    for _ in range(100000):\n"
             "        pass\n"),
}
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


class Burn:
    """``n`` burner processes for the duration of a ``with`` block; ``busy_threads`` is their CPU
    time over the block's wall time (2.0 when both had a core to themselves)."""

    def __init__(self, mode: str, n: int = 2):
        self.mode, self.n = mode, n
        self.busy_threads = 0.0

    def __enter__(self):
        env = {**os.environ, **ONE_THREAD}
        self.procs = [subprocess.Popen([sys.executable, "-c", BURNERS[self.mode]], env=env)
                      for _ in range(self.n)]
        time.sleep(1.0)  # let the scheduler see them as CPU-bound before timing
        self.t0, self.cpu0 = time.perf_counter(), self._cpu()
        return self

    def _cpu(self) -> float:
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        self.busy_threads = (self._cpu() - self.cpu0) / wall if wall > 0 else 0.0
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return False


# ------------------------------------------------------------------------------------------
# Workloads


def embedding_steps(quick: bool):
    """{name: step(batch)} for the training step of adrec (and FBGEMM TBE when importable), the
    batch pool, and the providers to release at the end."""
    shape = EmbShape(D=16, L=(1, 1), dist="uniform")
    pool = make_pool(shape, H.fresh_bytes(), max_batches=8 if quick else 512)
    w0 = make_weights(shape)
    names = ["adrec"] + (["fbgemm_tbe"] if FBGEMM is not None else [])
    provs, steps = {}, {}
    for p in names:
        prov = provs[p] = BUILDERS[p](shape, pool[0].table_offsets, w0, "rowwise_adagrad")
        prov.step(prov.prepare(pool[0]))
        check_step(prov, shape, pool[0], w0, "rowwise_adagrad", p)
        label = "adrec_step" if p == "adrec" else "fbgemm_step"
        steps[label] = (lambda b, prov=prov: prov.step(prov.prepare(b)))
    note = (f"embedding step: {len(pool)} batches touching "
            f"{pool_touched_bytes(shape, pool) / H.l3_bytes():.1f}x L3")
    return steps, pool, provs, note


def scorer_request(tmp: Path, quick: bool):
    """(step(request), request pool, note) for Scorer.score at N=64 on raw values."""
    from bench_serving import KW, ROWS, USER_T, criteo_schema

    from adrec_fast.models.registry import build_model
    from adrec_fast.serving import Scorer
    from adrec_fast.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("dlrm", criteo_schema(), embedding_dim=16, pooling="sum", **KW["dlrm"])
    model.eval()
    path = save_checkpoint(tmp / "dlrm", model, rng=False)
    sc = Scorer.load(path)
    T = len(ROWS)
    user_f = [f"C{t + 1}" for t in range(USER_T)]
    cand_f = [f"C{t + 1}" for t in range(USER_T, T)]
    dense_f = [f"I{i}" for i in range(1, 14)]
    # Distinct raw values hash to (nearly) distinct rows: a request touches ~USER_T + 64 * 13
    # rows of 64 bytes, so this many requests cover the byte budget.
    per_req = (USER_T + N_CAND * len(cand_f)) * 16 * 4
    count = 32 if quick else -(-H.fresh_bytes() // per_req)
    g = np.random.default_rng(5)
    reqs = []
    for _ in range(count):
        user = {f: f"{v:08x}" for f, v in zip(user_f, g.integers(0, 2**32, len(user_f)))}
        user.update({f: float(v) for f, v in zip(dense_f, g.standard_normal(len(dense_f)))})
        vals = g.integers(0, 2**32, (len(cand_f), N_CAND))
        cands = {f: [f"{v:08x}" for v in row] for f, row in zip(cand_f, vals)}
        reqs.append((user, cands))
    p = sc.score(*reqs[0])
    if p.shape != (N_CAND,) or not np.all((p > 0) & (p < 1)):
        raise SystemExit(f"Scorer.score returned {p!r} for a request of {N_CAND} candidates")
    note = (f"scorer: {count} requests of raw values "
            f"(~{count * per_req / H.l3_bytes():.1f}x L3 of distinct rows)")
    return (lambda r: sc.score(*r)), reqs, note


# ------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_args(ap, rounds=30)
    ap.add_argument("--burn", default="matmul,spin",
                    help="comma list of contention modes: " + ", ".join(BURNERS))
    ap.add_argument("--workloads", default="embedding,scorer",
                    help="comma list of embedding, scorer")
    args = H.settle(ap.parse_args(argv))
    modes = [m for m in args.burn.split(",") if m]
    bad = [m for m in modes if m not in BURNERS]
    if bad or not modes:
        raise SystemExit(f"--burn: unknown {bad or modes}; choose from {list(BURNERS)}")
    work = [w for w in args.workloads.split(",") if w]
    bad = [w for w in work if w not in ("embedding", "scorer")]
    if bad or not work:
        raise SystemExit(f"--workloads: unknown {bad or work}; choose from embedding, scorer")
    print(H.header(args, "contention"), flush=True)
    notes = []
    steps: dict = {}
    streams: dict = {}
    provs = {}
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")  # peers' deprecation notes on their hot paths
        if "embedding" in work:
            emb, pool, provs, note = embedding_steps(args.quick)
            notes.append(note)
            if FBGEMM is None:
                notes.append(f"fbgemm_step skipped: fbgemm_gpu unavailable ({FBGEMM_WHY})")
            for k, fn in emb.items():
                steps[k] = fn
            batches = H.cycle(pool, 1)
        if "scorer" in work:
            fn, reqs, note = scorer_request(Path(tmp), args.quick)
            steps["scorer_n64"] = fn
            notes.append(note)
            requests = H.cycle(reqs, 1)

        def next_item():
            # one round: the next batch for the training steps, the next request for the Scorer
            return (next(batches) if "embedding" in work else None,
                    next(requests) if "scorer" in work else None)

        def item_stream():
            while True:
                yield next_item()

        wrapped = {k: ((lambda it, f=f: f(it[1])) if k == "scorer_n64"
                       else (lambda it, f=f: f(it[0]))) for k, f in steps.items()}
        items = item_stream()
        phases = ["alone"] + modes
        med: dict[tuple[str, str], list[float]] = {}
        busy: dict[str, list[float]] = {m: [] for m in modes}
        loads = []
        for run in range(args.runs):
            l0 = H.load1()
            order = phases if run % 2 == 0 else phases[::-1]
            for phase in order:
                if phase == "alone":
                    H.warm(wrapped, items, seconds=0.0 if args.quick else 0.5)
                    times = H.alternate(wrapped, items, args.rounds)
                else:
                    with Burn(phase) as b:
                        H.warm(wrapped, items, seconds=0.0 if args.quick else 0.5)
                        times = H.alternate(wrapped, items, args.rounds)
                    busy[phase].append(b.busy_threads)
                for k, ts in times.items():
                    med.setdefault((k, phase), []).append(statistics.median(ts))
                print(f"run {run + 1} {phase}: " + ", ".join(
                    f"{k} {statistics.median(ts) * 1e3:.3f} ms" for k, ts in times.items()),
                    flush=True)
            loads.append((l0, H.load1()))
    for prov in provs.values():
        _release(prov)
    print()
    print(report(steps, modes, med, busy, loads, notes))


def report(steps, modes, med, busy, loads, notes) -> str:
    out = ["### CPU contention: alone vs another process keeping 2 threads busy", "",
           "1-minute load before / after each run: "
           + ", ".join(f"{a:.2f} / {b:.2f}" for a, b in loads), "",
           "| workload | contention | alone ms (min-max) | contended ms (min-max) "
           "| slowdown (ratio of medians) | per-run slowdowns | burners' busy threads "
           f"| target <= {TARGET}x |",
           "|---|---|---|---|---|---|---|---|"]

    def fmt(v):
        return f"{statistics.median(v) * 1e3:.4g} ({min(v) * 1e3:.4g}-{max(v) * 1e3:.4g})"

    for k in steps:
        alone = med[(k, "alone")]
        for m in modes:
            cont = med[(k, m)]
            ratio = statistics.median(cont) / statistics.median(alone)
            per_run = ", ".join(f"{c / a:.2f}" for a, c in zip(alone, cont))
            bt = ", ".join(f"{x:.2f}" for x in busy[m])
            out.append(f"| {k} | {m} | {fmt(alone)} | {fmt(cont)} | {ratio:.2f}x | {per_run} "
                       f"| {bt} | {'met' if ratio <= TARGET else 'not met'} |")
    out.append("")
    out += [f"- {n}" for n in notes]
    return "\n".join(out)


if __name__ == "__main__":
    main()
