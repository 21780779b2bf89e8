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
    # xw is an internal output: when nothing uses it its gradient must arrive as None, not as
    # materialised zeros (folding those in costs two extra [B, K] x [K, K] products per step).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_xw):
    if grad_out is None and grad_xw is None:  # grads are not materialised: nothing flows back
        return None, None, None, None
    x0, x, weight, xw = ctx.saved_tensors
    if grad_out is None:  # only xw was used
        grad_out = torch.zeros_like(xw)
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
        return torch.ops.adrec.cross_layer_triton(x0, x, weight, bias)[0]
    return torch.ops.adrec.cross_layer(x0, x, weight, bias)[0]


@torch.library.register_fake("adrec::cross_layer_bwd_")
def _(g, gx0, x0, x, weight, xw, accumulate, last):
    return torch.empty_like(weight), weight.new_empty(weight.shape[0])


class _CrossNet(torch.autograd.Function):
    """x_{l+1} = x0 * (x_l @ W_l.T + b_l) + x_l over the layers, with one backward for the net:
    the gradient of x_l is formed in place in one buffer (the residual's share added by the
    product itself) and x0's gradients from every layer meet in another, where per-layer
    backwards would write a [B, K] copy of the gradient per layer and leave autograd to sum
    x0's L + 1 gradients."""

    @staticmethod
    def forward(ctx, x0, *params):
        n = len(params) // 2
        weights, biases = params[:n], params[n:]
        x, xs, xws = x0, [], []
        for w, b in zip(weights, biases):
            xs.append(x)
            x, xw = torch.ops.adrec.cross_layer(x0, x, w, b)
            xws.append(xw)
        ctx.n = n
        ctx.save_for_backward(x0, *xs, *xws, *weights)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        n = ctx.n
        saved = ctx.saved_tensors
        x0, xs, xws, weights = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n:]
        g = grad.contiguous().clone()  # the buffer the layers' x gradients are formed in
        gx0 = torch.empty_like(g)
        gw, gb = [None] * n, [None] * n
        for i in reversed(range(n)):
            gw[i], gb[i] = torch.ops.adrec.cross_layer_bwd_(
                g, gx0, x0, xs[i], weights[i], xws[i], i < n - 1, i == 0)
        return (gx0, *gw, *gb)


def cross_net(x0, weights, biases):
    """The cross layers in turn (``x = cross_layer(x0, x, w, b)`` from x = x0); on the C++
    backend with one backward for the whole net (``_CrossNet``)."""
    if len(weights) != len(biases):
        raise ValueError(f"cross_net: {len(weights)} weights but {len(biases)} biases")
    if weights and _backend.backend_for("cross_layer", x0.device) == "cpp":
        return _CrossNet.apply(x0, *weights, *biases)
    x = x0
    for w, b in zip(weights, biases):
        x = cross_layer(x0, x, w, b)
    return x


# --- Triton backend: adrec::cross_layer_triton for CUDA tensors (kernels/cross_layer.py: GEMMs
# through torch, bias + x0 * xw + x fused); returns (out, xw) like adrec::cross_layer. The
# reference is its CPU kernel. Skipped without triton or a device it runs on.
_tk = None
if _backend.TRITON_OPS:  # a device the kernels can run on (ops/_backend.py)
    try:
        from torch.library import triton_op, wrap_triton

        from ..kernels import cross_layer as _tk
    except ImportError:  # triton is not installed
        _tk = None

if _tk is not None:

    @triton_op("adrec::cross_layer_triton", mutates_args=())
    def _cross_layer_triton(
        x0: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.cross_layer_fwd(x0, x, weight, bias, wrap=wrap_triton)

    @triton_op("adrec::cross_layer_bwd_triton", mutates_args=())
    def _cross_layer_bwd_triton(
        grad_out: torch.Tensor, x0: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
        xw: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.cross_layer_bwd(grad_out, x0, x, weight, xw, wrap=wrap_triton)

    @_cross_layer_triton.register_kernel("cpu")
    def _(x0, x, weight, bias):
        xw = torch.nn.functional.linear(x, weight, bias)  # [B, K]
        return x0 * xw + x, xw

    @_cross_layer_bwd_triton.register_kernel("cpu")
    def _(grad_out, x0, x, weight, xw):
        gxw = grad_out * x0
        return grad_out * xw, grad_out + gxw @ weight, gxw.t() @ x, gxw.sum(0)

    def _triton_backward(ctx, grad_out, grad_xw):
        if grad_out is None and grad_xw is None:  # _setup_context does not materialise grads
            return None, None, None, None
        x0, x, weight, xw = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(xw)
        gx0, gx, gw, gb = torch.ops.adrec.cross_layer_bwd_triton(grad_out, x0, x, weight, xw)
        if grad_xw is not None:
            gx = gx + grad_xw @ weight
            gw = gw + grad_xw.t() @ x
            gb = gb + grad_xw.sum(0)
        return gx0, gx, gw, gb

    _cross_layer_triton.register_autograd(_triton_backward, setup_context=_setup_context)
    _backend.register(
        "cross_layer", "cuda", "triton",
        default=_backend.default_on_cuda("cross_layer", "triton"),
    )
