# SPDX-License-Identifier: Apache-2.0
"""Op layer for the dense layer ``act(x @ weight.T + bias)``. Which engine runs the product
(oneDNN, ATen, the small-batch kernel; the padding of K; ``ADREC_DENSE``) is decided inside the
C++ kernel, csrc/cpu/linear.cpp, the one place for that decision."""
import torch

from .. import _C, reference
from . import _backend
from . import dropout as _dropout

_backend.register("linear", "cpu", "cpp", default=True)
_backend.register("linear", "meta", "cpp", default=True)


@torch.library.register_fake("adrec::linear")
def _(x, weight, bias, activation):
    return x.new_empty(x.shape[0], weight.shape[0])  # [M, N]


@torch.library.register_fake("adrec::linear_bwd")
def _(grad_out, x, weight, result, activation, output_mask):
    gx = torch.empty_like(x) if output_mask[0] else x.new_empty(0)  # [M, K]
    gw = torch.empty_like(weight) if output_mask[1] else weight.new_empty(0)  # [N, K]
    gb = grad_out.new_empty(weight.shape[0]) if output_mask[2] else grad_out.new_empty(0)  # [N]
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    # the ReLU's mask is read from the output, which the next layer keeps alive anyway
    ctx.save_for_backward(x, weight, output if activation == "relu" else None)


def _backward(ctx, grad_out):
    x, weight, result = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], ctx.has_bias and need[2]]
    gx, gw, gb = torch.ops.adrec.linear_bwd(grad_out, x, weight, result, ctx.activation, mask)
    return gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None


torch.library.register_autograd("adrec::linear", _backward, setup_context=_setup_context)


def linear(x, weight, bias=None, activation="none"):
    if torch.is_autocast_enabled(x.device.type):
        # a custom op has no autocast rule of its own: cast as autocast casts F.linear's operands
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    be = _backend.backend_for("linear", x.device)
    if be == "reference":
        return reference.linear(x, weight, bias, activation)
    return torch.ops.adrec.linear(x, weight, bias, activation)


def gemm_width(k: int, dtype: torch.dtype, rows: int) -> int:
    """The width at which to store activations of ``k`` columns that feed products of ``rows``
    rows in ``dtype``: ``k`` or more, with zero columns appended (the C++ policy's choice)."""
    return int(_C.gemm_width(int(k), int(rows), dtype == torch.float32))


class _LinearReluDropout(torch.autograd.Function):
    """y = dropout(relu(x @ w.T + b)). The backward takes both masks from y: y > 0 exactly where
    the ReLU passed and the dropout kept, and there dy/d(x @ w.T + b) is the dropout's scale, a
    constant that moves into the products (w * scale for x's gradient, the weight and bias
    gradients scaled after) instead of a pass over the [M, N] gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, p, seed, offset):
        # the ReLU's output is this function's own: the mask goes on in place
        y = _dropout.dropout_(torch.ops.adrec.linear(x, weight, bias, "relu"), p, seed, offset)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], ctx.has_bias and need[2]]
        gx, gw, gb = torch.ops.adrec.linear_bwd(grad, x, weight * ctx.scale, y, "relu", mask)
        return (gx if mask[0] else None, gw.mul_(ctx.scale) if mask[1] else None,
                gb.mul_(ctx.scale) if mask[2] else None, None, None, None)


def linear_relu_dropout(x, weight, bias, p: float, seed: int, offset: int = 0):
    """``dropout(linear(x, weight, bias, "relu"), p, seed, offset)``: the same mask and values;
    on the native backend without autocast, a backward with no pass of the dropout's own.
    0 < p < 1."""
    be = _backend.backend_for("linear", x.device)
    if be == "reference" or torch.is_autocast_enabled(x.device.type):
        return _dropout.dropout(linear(x, weight, bias, "relu"), p, seed, offset)
    return _LinearReluDropout.apply(x, weight, bias, p, seed, offset)
