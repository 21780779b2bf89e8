# SPDX-License-Identifier: Apache-2.0
"""Helpers for the GPU tests: run a public function with a forced backend, compare with the
float64 reference on the CPU (forward and gradients)."""
from __future__ import annotations

import torch

from ..conftest import assert_close_verbose


def check_against_reference(monkeypatch, backend, fn, ref_fn, inputs, grad_inputs, *args):
    """fn(*inputs, *args) on CUDA with ADREC_BACKEND=backend vs ref_fn on float64 CPU copies."""
    monkeypatch.setenv("ADREC_BACKEND", backend)
    xs = [t.cuda().requires_grad_(i in grad_inputs) for i, t in enumerate(inputs)]
    rs = [t.double().requires_grad_(i in grad_inputs) if t.is_floating_point() else t
          for i, t in enumerate(inputs)]
    out = fn(*xs, *args)
    truth = ref_fn(*rs, *args)
    assert_close_verbose(out.cpu(), truth.float().detach())
    g = torch.randn_like(truth)
    got = torch.autograd.grad(out, [xs[i] for i in grad_inputs], g.float().cuda())
    want = torch.autograd.grad(truth, [rs[i] for i in grad_inputs], g)
    for a, b in zip(got, want):
        assert_close_verbose(a.cpu(), b.float())
