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


def dropout(x, p: float, seed: int, offset: int = 0):
    be = _backend.backend_for("dropout", x.device)
    if be == "reference":
        return reference.dropout(x, p, seed, offset)
    return torch.ops.adrec.dropout(x, p, seed, offset)
