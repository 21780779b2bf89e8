# SPDX-License-Identifier: Apache-2.0
"""Shared helpers for the interaction / scoring benchmarks (bench_<op>.py for fm_interaction,
dot_interaction, cross_layer, attention_pooling, sigmoid_bce).

Each benchmark times one training step of the op alone, forward + backward, at B=4096, F=27,
D=16 (sequence length 50 for attention; K = F*D = 432 for the cross layer), for three
providers:

- ``reference``: the plain-PyTorch oracle in eager mode;
- ``reference_compiled``: ``torch.compile`` of that oracle, compiled and warmed up before timing;
- ``cpp``: adrec_fast's public function (``adrec_fast.functional``: the ``adrec::`` op, C++ CPU
  kernels, autograd from the op layer). The script tables call it ``adrec``.

The inputs are dense activations. Each round takes the next set of a pool of distinct input
tensors (and upstream gradients) whose total size is >= 4x the L3, as each training step brings
new activations; one set reused every round would be timed from the cache. Parameters (the
cross layer's weight and bias) are shared by the sets, as they are across steps.

Before timing, every provider's output and input gradients are checked once against the
reference run in float64.

Headline ratios (script mode: the three providers alternating round by round on the same sets,
3 runs, Markdown table; about 2 min for all five ops on 2 quiet cores, much of it torch.compile;
``--quick`` for a smoke run)::

    python bench/_common_ops.py --runs 3                  # all five ops
    python bench/bench_cross_layer.py --runs 3            # one op
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

import _harness as H

PROVIDERS = ("reference", "reference_compiled", "cpp")
B, F, D = 4096, 27, 16
SEQ_LEN = 50
K = F * D
# Timing: pytest-benchmark pedantic, as STYLE.md §6.
WARMUP_ROUNDS = 3
ROUNDS = 20

# torch.compile's import path touches torch.jit.script_method, which warns on this torch (and the
# pytest config turns warnings into errors). Each bench file sets ``pytestmark = COMPILE_WARNINGS``.
COMPILE_WARNINGS = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

_COMPILED: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), one compiled wrapper per function for the whole session."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


@dataclass
class OpCase:
    """One op's benchmark. ``make_set(g)`` returns one set of fresh inputs and the upstream
    gradient (None for a scalar loss) drawn from generator ``g``; ``shared`` are parameters every
    set uses (created once). ``inner``: steps per timed round, for ops too small to time one by
    one (the reported time is per step)."""

    name: str
    ref_fn: Callable
    adrec_fn: Callable
    make_set: Callable[[torch.Generator], tuple[tuple, torch.Tensor | None]]
    inner: int = 1
    check: dict | None = None


@dataclass
class Set:
    inputs: tuple
    grad: torch.Tensor | None


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def input_pool(case: OpCase, min_bytes: int | None = None, max_sets: int = 8192,
               seed: int = 0) -> list[Set]:
    """Distinct input sets until their tensors total ``min_bytes`` (default 4x the L3); at least
    2 (and ``case.inner`` + 1, so a round of ``inner`` steps never meets its own sets twice)."""
    min_bytes = H.fresh_bytes() if min_bytes is None else min_bytes
    g = torch.Generator().manual_seed(seed)
    pool: list[Set] = []
    total = 0
    seen: set[int] = set()  # shared tensors (parameters) count once
    while len(pool) < max_sets and (total < min_bytes or len(pool) < max(2, case.inner + 1)):
        inputs, grad = case.make_set(g)
        for t in (*inputs, grad):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += _nbytes(t)
        pool.append(Set(inputs, grad))
    return pool


def pool_bytes(pool: Sequence[Set]) -> int:
    seen, total = set(), 0
    for s in pool:
        for t in (*s.inputs, s.grad):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += _nbytes(t)
    return total


def leaves(inputs: Sequence) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def fwdbwd(fn: Callable, s: Set) -> torch.Tensor:
    """One forward + backward of ``fn(*s.inputs)``; input gradients are reset first so the
    backward writes (not accumulates) them, as a training step does after zero_grad."""
    for t in leaves(s.inputs):
        t.grad = None
    out = fn(*s.inputs)
    out.backward(s.grad)
    return out


def check_once(fn: Callable, ref_fn: Callable, s: Set, rtol: float = 1e-4,
               atol: float = 1e-4) -> None:
    """Run ``fn`` once on ``s`` and compare its output and input gradients with ``ref_fn`` in
    float64.

    The tolerance is a sanity bound for float32 at benchmark sizes (the tests hold the kernels
    to the dtype defaults on smaller shapes)."""
    out = fwdbwd(fn, s).detach()
    got = [t.grad.detach().clone() for t in leaves(s.inputs)]
    ref_inputs = [
        t.detach().double().requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in s.inputs
    ]
    ref = ref_fn(*ref_inputs)
    ref.backward(None if s.grad is None else s.grad.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol)
    for g, t in zip(got, leaves(ref_inputs)):
        torch.testing.assert_close(g.double(), t.grad, rtol=rtol, atol=atol)


def provider_fn(case: OpCase, backend: str) -> Callable:
    return {"reference": case.ref_fn, "reference_compiled": compiled(case.ref_fn),
            "cpp": case.adrec_fn, "adrec": case.adrec_fn}[backend]


def _round_step(fn: Callable) -> Callable[[list[Set]], None]:
    def step(sets: list[Set]) -> None:
        for s in sets:
            fwdbwd(fn, s)
    return step


def _rounds_of(pool: list[Set], inner: int):
    """Consecutive groups of ``inner`` sets, forever."""
    it = H.cycle(pool)
    while True:
        yield [next(it) for _ in range(inner)]


def run_fwdbwd(benchmark, backend: str, case: OpCase) -> None:
    """pytest-benchmark: check ``backend`` once against the float64 reference, then time its
    forward + backward, each round on the next ``case.inner`` sets of a fresh pool."""
    from conftest import QUICK, bench_rounds

    pool = input_pool(case, max_sets=64 if QUICK else 8192)
    fn = provider_fn(case, backend)
    check_once(fn, case.ref_fn, pool[0], **(case.check or {}))  # also compiles the reference
    step = _round_step(fn)
    groups = _rounds_of(pool, case.inner)
    benchmark.extra_info.update(provider=backend, threads=torch.get_num_threads(),
                                steps_per_round=case.inner, pool_sets=len(pool),
                                pool_MB=round(pool_bytes(pool) / 1e6, 1))
    benchmark.pedantic(step, setup=lambda: ((next(groups),), {}), warmup_rounds=WARMUP_ROUNDS,
                       rounds=bench_rounds(ROUNDS), iterations=1)


# ------------------------------------------------------------------------------------------
# Script mode

SCRIPT_PROVIDERS = {"adrec": "cpp", "eager": "reference", "compile": "reference_compiled"}
TARGET_NOTE = ("Targets: adrec >= 1.5x eager and >= 1.0x compile (torch.compile of the same "
               "reference), forward + backward, median of >= 3 runs.")


def _script_case(case: OpCase, quick: bool):
    pool = input_pool(case, max_sets=64 if quick else 8192)
    fns = {k: provider_fn(case, v) for k, v in SCRIPT_PROVIDERS.items()}
    for k, fn in fns.items():
        check_once(fn, case.ref_fn, pool[0], **(case.check or {}))  # compiles; correctness
    steps = {k: _round_step(fn) for k, fn in fns.items()}
    return pool, steps


def main(cases: Sequence[OpCase], argv=None) -> None:
    import argparse
    import statistics
    import warnings

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_args(ap)
    if len(cases) > 1:
        ap.add_argument("--ops", default=",".join(c.name for c in cases),
                        help="comma list of " + ", ".join(c.name for c in cases))
    args = H.settle(ap.parse_args(argv))
    if len(cases) > 1:
        names = [n for n in args.ops.split(",") if n]
        bad = [n for n in names if n not in {c.name for c in cases}]
        if bad:
            raise SystemExit(f"--ops: unknown {bad}; choose from {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in names]
    print(H.header(args, "interaction ops, forward + backward"), flush=True)
    res = H.Results("Interaction ops, forward + backward (fresh input sets)", unit="ms")
    res.notes.append(TARGET_NOTE)
    built = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's deprecation notes
        for case in cases:
            pool, steps = _script_case(case, args.quick)
            built[case.name] = (case, steps, _rounds_of(pool, case.inner))
            res.notes.append(f"{case.name}: pool of {len(pool)} input sets, "
                             f"{pool_bytes(pool) / H.l3_bytes():.1f}x L3"
                             + (f"; {case.inner} steps per round, time per step"
                                if case.inner > 1 else ""))
            print(f"built {case.name}: {len(pool)} sets", flush=True)
        for run in range(args.runs):
            l0 = H.load1()
            for name, (case, steps, groups) in built.items():
                H.warm(steps, groups, seconds=0.0 if args.quick else 0.3,
                       min_calls=1 if args.quick else 3)
                times = H.alternate(steps, groups, args.rounds)
                times = {k: [t / case.inner for t in v] for k, v in times.items()}
                res.add(name, times)
                print(f"run {run + 1}: {name}: " + ", ".join(
                    f"{k} {statistics.median(v) * 1e3:.4f} ms" for k, v in times.items()),
                    flush=True)
            res.loads.append((l0, H.load1()))
    print()
    print(res.markdown())


def all_cases() -> list[OpCase]:
    import bench_attention_pooling
    import bench_cross_layer
    import bench_dot_interaction
    import bench_fm_interaction
    import bench_sigmoid_bce

    return [bench_fm_interaction.CASE, bench_dot_interaction.CASE, bench_cross_layer.CASE,
            bench_sigmoid_bce.CASE, bench_attention_pooling.CASE]


def cross_weight(k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross layer's parameters, CrossNet-like scale: weight [K, K], bias [K]."""
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(k, k, generator=g) / math.sqrt(k)).requires_grad_(True)
    return w, torch.zeros(k, requires_grad=True)


if __name__ == "__main__":
    main(all_cases())
