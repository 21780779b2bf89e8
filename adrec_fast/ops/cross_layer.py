# SPDX-License-Identifier: Apache-2.0
"""Op layer for the DCN-v2 cross layer: out = x0 * (x @ W.T + b) + x."""
import torch

from .. import reference
from . import _backend


@torch.library.register_fake("adrec::cross_layer")
def _(x0, x, weight, bias):
    return torch.empty_like(x), torch.empty_like(x)  # out [B, K], xw [B, K]


@torch.library.register_fake("adrec::cross_layer_bwd")
def _(grad_out, x0, x, weight, xw):
    return (
        torch.empty_like(x0),
        torch.empty_like(x),
        torch.empty_like(weight),
        weight.new_empty(weight.shape[0]),
    )


def _setup_context(ctx, inputs, output):
    x0, x, weight, bias = inputs
    ctx.save_for_backward(x0, x, weight, output[1])


def _backward(ctx, grad_out, grad_xw):
    x0, x, weight, xw = ctx.saved_tensors
    gx0, gx, gw, gb = torch.ops.adrec.cross_layer_bwd(grad_out, x0, x, weight, xw)
    if grad_xw is not None:  # xw is an internal output; fold in a gradient if one arrives
        gx = gx + grad_xw @ weight
        gw = gw + grad_xw.t() @ x
        gb = gb + grad_xw.sum(0)
    return gx0, gx, gw, gb


torch.library.register_autograd("adrec::cross_layer", _backward, setup_context=_setup_context)


def cross_layer(x0, x, weight, bias):
    be = _backend.backend_for("cross_layer", x.device)
    if be == "reference":
        return reference.cross_layer(x0, x, weight, bias)
    if be == "triton":
        return torch.ops.adrec.cross_layer_triton(x0, x, weight, bias)
    return torch.ops.adrec.cross_layer(x0, x, weight, bias)[0]
