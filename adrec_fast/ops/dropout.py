# SPDX-License-Identifier: Apache-2.0
"""Op layer for dropout with a counter-based mask (``adrec::dropout``): the mask is a hash of
(seed, element index), so nothing is stored for the backward, which is the same op on the
gradient."""
import torch

from .. import reference
from . import _backend


@torch.library.register_fake("adrec::dropout")
def _(x, p, seed, offset):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    _, ctx.p, ctx.seed, ctx.offset = inputs


def _backward(ctx, grad):
    return dropout(grad.contiguous(), ctx.p, ctx.seed, ctx.offset), None, None, None


torch.library.register_autograd("adrec::dropout", _backward, setup_context=_setup_context)


@torch.library.register_fake("adrec::dropout_")
def _(x, p, seed, offset):
    return None


def dropout(x, p: float, seed: int, offset: int = 0):
    be = _backend.backend_for("dropout", x.device)
    if be == "reference":
        return reference.dropout(x, p, seed, offset)
    return torch.ops.adrec.dropout(x, p, seed, offset)


def dropout_(x, p: float, seed: int, offset: int = 0):
    """``dropout`` written into x, which is returned; for a tensor no one else reads and that
    autograd does not track (no backward: the caller's own accounts for the mask)."""
    if _backend.backend_for("dropout", x.device) == "cpp" and x.is_contiguous():
        torch.ops.adrec.dropout_(x, p, seed, offset)
        return x
    return x.copy_(dropout(x, p, seed, offset))
