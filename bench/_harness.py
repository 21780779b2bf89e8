# SPDX-License-Identifier: Apache-2.0
"""Script mode of the benchmarks: fresh inputs, providers alternating round by round, several
runs, one Markdown table (STYLE.md §6, "Fresh inputs" and "Ratios from interleaved runs").

Why each piece:

- Fresh inputs. A batch (or activation) reused every round keeps what it touches in the
  last-level cache, so the timing measures the cache, not the kernel. Each round draws the next
  item of a pool whose touched bytes are at least ``FRESH_FACTOR`` times the L3.
- Alternation. Every round times each provider once, on the same item, in an order that rotates
  from round to round; a change in machine load (other processes on 2 shared cores) then lands on
  every provider, not on whichever happened to run during it.
- Runs. A ratio is quoted as the ratio of the medians over at least 3 runs, with the per-run
  ratios and the min-max spread beside it, and the 1-minute load before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

L3_FALLBACK = 32 << 20
# Touched bytes of a pool, in multiples of the L3: at 4x, at most a quarter of a pool's data can
# still be resident when an item comes round again (less in practice: every provider's own
# weights and the other items share the same cache).
FRESH_FACTOR = 4


def l3_bytes() -> int:
    """Size of the last-level cache of cpu0 in bytes (sysfs), else 32 MiB."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
        return int(s.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return L3_FALLBACK


def fresh_bytes() -> int:
    """Bytes a pool of inputs must touch so that a round does not find them in the L3."""
    return FRESH_FACTOR * l3_bytes()


def load1() -> float:
    return os.getloadavg()[0]


def add_args(ap: argparse.ArgumentParser, rounds: int = 20) -> None:
    ap.add_argument("--runs", type=int, default=3,
                    help="independent runs; the table quotes medians and spread over them")
    ap.add_argument("--rounds", type=int, default=rounds,
                    help="timed rounds per provider per case per run")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 run, few rounds, smaller pools (timings not meaningful)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("ADREC_BENCH_THREADS", "2")),
                    help="torch intra-op threads")


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """Apply --quick, validate the counts, pin the threads."""
    import torch

    if args.quick:
        args.runs = min(args.runs, 1)
        args.rounds = min(args.rounds, 3)
    if args.runs < 1 or args.rounds < 1:
        raise SystemExit(f"--runs and --rounds must be >= 1 (got {args.runs}, {args.rounds})")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1 (got {args.threads})")
    torch.set_num_threads(args.threads)
    return args


# ------------------------------------------------------------------------------------------
# Timing


def warm(steps: dict[str, Callable], items: Iterable, seconds: float, min_calls: int = 3) -> None:
    """Untimed calls, providers alternating, until ``seconds`` have passed (at least
    ``min_calls`` per provider): first touches, allocator growth and lazy compilation are not
    steady-state cost. ``items`` yields one argument per call."""
    it = iter(items)
    n, t_end = 0, time.perf_counter() + seconds
    while n < min_calls or time.perf_counter() < t_end:
        x = next(it)
        for step in steps.values():
            step(x)
        n += 1


def alternate(steps: dict[str, Callable], items: Iterable, rounds: int,
              prepare: dict[str, Callable] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every provider over ``rounds`` rounds. Round r takes the next item,
    prepares each provider's arguments from it outside the clock (``prepare[name](item)``, default
    the item itself), then times each provider once, the order rotated by r."""
    names = list(steps)
    prepare = prepare or {}
    times: dict[str, list[float]] = {k: [] for k in names}
    it = iter(items)
    for r in range(rounds):
        item = next(it)
        args = {k: prepare[k](item) if k in prepare else item for k in names}
        k0 = r % len(names)
        for k in names[k0:] + names[:k0]:
            step, a = steps[k], args[k]
            t0 = time.perf_counter()
            step(a)
            times[k].append(time.perf_counter() - t0)
    return times


def cycle(pool: Sequence, start: int = 0):
    """Items of ``pool`` in order, forever, starting at ``start``."""
    i = start
    while True:
        yield pool[i % len(pool)]
        i += 1


# ------------------------------------------------------------------------------------------
# Results


@dataclass
class Results:
    """Per-run medians (seconds) of every (case, provider), and the load around each run."""

    title: str
    ours: str = "adrec"
    medians: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cases: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loads: list[tuple[float, float]] = field(default_factory=list)
    unit: str = "ms"

    def add(self, case: str, times: dict[str, list[float]]) -> None:
        if case not in self.cases:
            self.cases.append(case)
        for k, ts in times.items():
            self.medians.setdefault((case, k), []).append(statistics.median(ts))

    def providers(self, case: str) -> list[str]:
        return [k for c, k in self.medians if c == case]

    def markdown(self, best_peer: bool = False, own: tuple[str, ...] = ()) -> str:
        """One row per (case, peer): our median and spread, the peer's, the ratio of the medians
        (peer / ours: > 1 means ours is faster) and the per-run ratios. ``best_peer``: also a row
        against the peer with the lowest median in each case; ``own``: providers that are
        variants of ours (listed, never the best peer; with ``best_peer``, each also gets a row
        of its own against that peer)."""
        scale = 1e3 if self.unit == "ms" else 1e6
        out = [f"### {self.title}", ""]
        if self.loads:
            out.append("1-minute load before / after each run: " + ", ".join(
                f"{a:.2f} / {b:.2f}" for a, b in self.loads))
            out.append("")
        out.append(f"Each time: the median over {len(self.loads) or 'the'} run(s) of each run's "
                   "median (min-max of the runs' medians). Ratio > 1: "
                   f"{self.ours} is faster.")
        out.append("")
        out.append(f"| case | {self.ours} {self.unit} (min-max) | peer | peer {self.unit} "
                   f"(min-max) | peer / {self.ours} (ratio of medians) | per-run ratios |")
        out.append("|---|---|---|---|---|---|")

        def fmt(v: list[float]) -> str:
            return (f"{statistics.median(v) * scale:.4g} "
                    f"({min(v) * scale:.4g}-{max(v) * scale:.4g})")

        for case in self.cases:
            provs = self.providers(case)
            ours = self.medians.get((case, self.ours))
            peers = [p for p in provs if p != self.ours]
            rows = [(p, p) for p in peers]
            others = [p for p in peers if p not in own]
            if best_peer and len(others) > 1:
                best = min(others, key=lambda p: statistics.median(self.medians[(case, p)]))
                rows.append((f"best peer ({best})", best))
            if ours is None:
                for label, p in rows:
                    out.append(f"| {case} | - | {label} | {fmt(self.medians[(case, p)])} | - | - |")
                continue
            if not rows:
                out.append(f"| {case} | {fmt(ours)} | - | - | - | - |")
            rows = [(case, ours, label, p) for label, p in rows]
            if best_peer and len(others) > 1:  # our variants against the best peer too
                rows += [(f"{case} ({o})", self.medians[(case, o)], f"best peer ({best})", best)
                         for o in own if (case, o) in self.medians]
            for name, mine, label, p in rows:
                theirs = self.medians[(case, p)]
                ratio = statistics.median(theirs) / statistics.median(mine)
                per_run = ", ".join(f"{b / a:.2f}" for a, b in zip(mine, theirs))
                out.append(f"| {name} | {fmt(mine)} | {label} | {fmt(theirs)} | "
                           f"{ratio:.2f}x | {per_run} |")
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out)


def header(args: argparse.Namespace, what: str) -> str:
    """The first lines of a script's output: what ran, where, and how loaded the machine was."""
    import platform

    import torch

    la = os.getloadavg()
    lines = [
        f"{what}: {args.runs} run(s) x {args.rounds} rounds, {args.threads} thread(s), "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, L3 {l3_bytes() >> 20} MiB, "
        f"fresh pools >= {FRESH_FACTOR}x L3, python {platform.python_version()}",
        f"1-minute load at start: {la[0]:.2f} (5-min {la[1]:.2f})"
        + ("; QUICK smoke run, timings not meaningful" if args.quick else ""),
    ]
    if args.runs < 3 and not args.quick:
        lines.append("NOTE: fewer than 3 runs; a headline ratio needs the spread of >= 3")
    if la[0] > 0.5 * (os.cpu_count() or 1):
        lines.append("WARNING: the machine is busy; compare ratios within this run only")
    return "\n".join(lines)
