# SPDX-License-Identifier: Apache-2.0
"""fp32 dense products of the model towers through oneDNN on the CPU.

Why: ATen sends fp32 ``mm``/``addmm`` on x86 to MKL, which on the AMD benchmark machine runs at
about half the rate of oneDNN (``torch.ops.mkldnn._linear_pointwise``, shipped with every x86
torch build; ONEDNN_VERBOSE reports its AVX-512 kernels there; the MKL rate is consistent with
MKL not taking its AVX-512 paths on AMD CPUs). Measured there, 2 threads, fp32, B = 4096:
[4096, 512] x [512, 256] 5.1 ms (MKL) vs 2.2 ms (oneDNN); [4096, 432] x [432, 432] 7.4 vs 3.2 ms;
the weight-gradient product g.T @ x 7.2 vs 4.3 ms. It is still IEEE fp32 (no reduced-precision
math mode): results differ from MKL by summation order only.

One autograd function, used by the models' MLP towers when :func:`enabled` says so (CPU, fp32, a
2-D batch of at least MIN_ROWS rows, no autocast): ``linear(x, w, b, relu)`` with bias and ReLU
fused into the product's epilogue. Anything else takes the ATen path. ``ADREC_DENSE=aten`` (or
``ONEDNN = False``) switches it off. DCN-v2's cross layers need nothing here: the
``adrec::cross_layer`` C++ op sends its fp32 products to oneDNN itself
(csrc/common/onednn_linear.h, same switch, same row minimum).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor


def _find_op():
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return None


_LP = _find_op()
#: module switch (tests flip it to compare both paths)
ONEDNN = os.environ.get("ADREC_DENSE", "onednn") != "aten"
#: smallest batch sent to oneDNN. Below it oneDNN's per-call cost dominates: [B, 512] x [512, 256]
#: + ReLU, 2 threads, measured 24.8 vs 8.7 us (ATen) at B = 1, 40.6 vs 25.7 at 8, 39.9 vs 38.6 at
#: 16, 53.5 vs 59.1 at 32, 69.3 vs 100.2 at 64 (a DLRM forward on one serving request went from
#: ~100 to ~220 us when every batch took oneDNN). csrc/common/onednn_linear.h uses the same minimum.
MIN_ROWS = 32


def enabled(x: Tensor) -> bool:
    """Whether the oneDNN path serves this activation ``x`` [B, K]."""
    return (ONEDNN and _LP is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 2 and x.size(0) >= MIN_ROWS and torch.backends.mkldnn.is_available()
            and not torch.is_autocast_enabled("cpu"))


def _mm_t(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] @ b.T for b [N, K] -> [M, N] (operands may be strided views, e.g. transposes)."""
    return _LP(a, b, None, "none", [], "")


def _weight_grad(g: Tensor, x: Tensor) -> Tensor:
    """g.T @ x for g [B, N], x [B, K] -> [N, K]. oneDNN's first operand must be row-major, so
    one of the two is transposed into a copy: the narrower one (DLRM's first bottom layer:
    x.T [13, B] instead of g.T [512, B]); the result is then computed transposed."""
    if x.size(1) < g.size(1):
        return _mm_t(x.t(), g.t()).t()  # ([K, B] @ [B, N]).T
    return _mm_t(g.t(), x.t())


class _Linear(torch.autograd.Function):
    """out = [relu](x @ w.T + b): x [B, K], w [N, K], b [N] or None -> [B, N]."""

    @staticmethod
    def forward(ctx, x, w, b, relu):
        out = _LP(x, w, b, "relu" if relu else "none", [], "")  # bias/ReLU in the epilogue
        ctx.relu = relu
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, w, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, g):  # g [B, N]
        x, w, out = ctx.saved_tensors
        if ctx.relu:
            g = torch.ops.aten.threshold_backward(g, out, 0)  # g * (out > 0)
        gx = _mm_t(g, w.t()) if ctx.needs_input_grad[0] else None  # [B, K] = g @ w
        gw = _weight_grad(g, x) if ctx.needs_input_grad[1] else None  # [N, K] = g.T @ x
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # [N]
        return gx, gw, gb, None


def linear(x: Tensor, w: Tensor, b: Tensor | None, relu: bool = False) -> Tensor:
    return _Linear.apply(x, w, b, relu)
