# SPDX-License-Identifier: Apache-2.0
"""Op layer for the fused sigmoid + BCE loss (gradient from the same pass) and the fused
linear + sigmoid score."""
import torch

from .. import reference
from . import _backend


@torch.library.register_fake("adrec::sigmoid_bce")
def _(logits, labels, weight):
    return logits.new_empty(()), torch.empty_like(logits)  # loss [], grad_logits [B]


@torch.library.register_fake("adrec::score")
def _(x, w, b):
    return x.new_empty(x.shape[0])  # [B]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    # grad_logits is the loss's gradient, returned for the backward: it is not differentiable
    # (and no zeros are materialised for it).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_grad):
    if grad_loss is None:  # grads are not materialised: nothing flows back
        return None, None, None
    (grad_logits,) = ctx.saved_tensors
    return grad_loss * grad_logits, None, None


# adrec::sigmoid_bce's own autograd is C++ (csrc/autograd/sigmoid_bce.cpp: the op is
# overhead-bound and a Python wrapper costs more than eager's whole step); _setup_context and
# _backward above serve the Triton op, and define the same rule.


def _score_setup(ctx, inputs, output):
    x, w, b = inputs
    ctx.save_for_backward(x, w, output)
    ctx.b_shape = b.shape


def _score_backward(ctx, grad_p):
    x, w, p = ctx.saved_tensors
    gz = grad_p * p * (1 - p)  # [B]
    return gz[:, None] * w[None, :], x.t() @ gz, gz.sum().reshape(ctx.b_shape)


torch.library.register_autograd("adrec::score", _score_backward, setup_context=_score_setup)


def sigmoid_bce(logits, labels, weight=None):
    be = _backend.backend_for("sigmoid_bce", logits.device)
    if be == "reference":
        return reference.sigmoid_bce(logits, labels, weight)
    if be == "triton":
        return torch.ops.adrec.sigmoid_bce_triton(logits, labels, weight)[0]
    return torch.ops.adrec.sigmoid_bce(logits, labels, weight)[0]


def score(x, w, b):
    if not isinstance(b, torch.Tensor):
        b = torch.tensor(float(b), dtype=x.dtype, device=x.device)
    be = _backend.backend_for("score", x.device)
    if be == "reference":
        return reference.score(x, w, b)
    if be == "triton":
        return torch.ops.adrec.score_triton(x, w, b)
    return torch.ops.adrec.score(x, w, b)


# --- Triton backend: adrec::sigmoid_bce_triton (loss, grad in one pass) and adrec::score_triton
# for CUDA tensors (kernels/sigmoid_bce.py); the reference is their CPU kernel. Skipped
# without triton or a device it runs on.
_tk = None
if _backend.TRITON_OPS:  # a device the kernels can run on (ops/_backend.py)
    try:
        from typing import Optional

        from torch.library import triton_op, wrap_triton

        from ..kernels import sigmoid_bce as _tk
    except ImportError:  # triton is not installed
        _tk = None

if _tk is not None:

    @triton_op("adrec::sigmoid_bce_triton", mutates_args=())
    def _sigmoid_bce_triton(
        logits: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor]  # noqa: UP045
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.sigmoid_bce_fwd(logits, labels, weight, wrap=wrap_triton)

    @triton_op("adrec::score_triton", mutates_args=())
    def _score_triton(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _tk.score_fwd(x, w, b, wrap=wrap_triton)

    @_sigmoid_bce_triton.register_kernel("cpu")
    def _(logits, labels, weight):
        y = labels.to(logits.dtype)
        g = torch.sigmoid(logits) - y
        if weight is not None:
            g = g * weight
        return reference.sigmoid_bce(logits, y, weight), g / max(logits.numel(), 1)

    _score_triton.register_kernel("cpu")(reference.score)
    _sigmoid_bce_triton.register_autograd(_backward, setup_context=_setup_context)
    _score_triton.register_autograd(_score_backward, setup_context=_score_setup)
    for _op in ("sigmoid_bce", "score"):
        _backend.register(_op, "cuda", "triton", default=_backend.default_on_cuda(_op, "triton"))
