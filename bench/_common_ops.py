# SPDX-License-Identifier: Apache-2.0
"""Shared helpers for the interaction / scoring benchmarks (bench_<op>.py for fm_interaction,
dot_interaction, cross_layer, attention_pooling, sigmoid_bce).

Each benchmark times one training step of the op alone, forward + backward, at the issue-2
shape (B=4096, F=27, D=16; sequence length 50 for attention; K = F*D = 432 for the cross layer),
for three providers:

- ``reference``: the plain-PyTorch oracle in eager mode;
- ``reference_compiled``: ``torch.compile`` of that oracle, compiled and warmed up before timing;
- ``cpp``: the ``adrec::`` op (C++ CPU kernels, autograd from the op layer).

Before timing, every provider's output and input gradients are checked once against the
reference run in float64.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

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


def leaves(inputs: Sequence) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def fwdbwd_step(fn: Callable, inputs: Sequence, grad: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """One forward + backward of ``fn(*inputs)``; input gradients are reset each call so the
    backward writes (not accumulates) them, as a training step does after zero_grad."""
    params = leaves(inputs)

    def step():
        for t in params:
            t.grad = None
        out = fn(*inputs)
        out.backward(grad)
        return out

    return step


def check_once(step: Callable[[], torch.Tensor], ref_fn: Callable, inputs: Sequence,
               grad: torch.Tensor | None, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Run ``step`` once and compare its output and input gradients with ``ref_fn`` in float64.

    The tolerance is a sanity bound for float32 at benchmark sizes (the tests hold the kernels
    to the dtype defaults on smaller shapes)."""
    out = step().detach()
    got = [t.grad.detach().clone() for t in leaves(inputs)]
    ref_inputs = [
        t.detach().double().requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in inputs
    ]
    ref = ref_fn(*ref_inputs)
    ref.backward(None if grad is None else grad.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol)
    for g, t in zip(got, leaves(ref_inputs)):
        torch.testing.assert_close(g.double(), t.grad, rtol=rtol, atol=atol)


def run_fwdbwd(benchmark, backend: str, ref_fn: Callable, cpp_fn: Callable, inputs: Sequence,
               grad: torch.Tensor | None, iterations: int = 1, **check_kw) -> None:
    """Check ``backend`` once against the float64 reference, then time its forward + backward."""
    fn = {"reference": ref_fn, "reference_compiled": compiled(ref_fn), "cpp": cpp_fn}[backend]
    step = fwdbwd_step(fn, inputs, grad)
    check_once(step, ref_fn, inputs, grad, **check_kw)  # also compiles reference_compiled
    benchmark.extra_info["provider"] = backend
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(step, warmup_rounds=WARMUP_ROUNDS, rounds=ROUNDS, iterations=iterations)
