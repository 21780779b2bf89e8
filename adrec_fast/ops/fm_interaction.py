# SPDX-License-Identifier: Apache-2.0
"""Op layer for the FM second-order interaction."""
import torch

from .. import reference
from . import _backend


@torch.library.register_fake("adrec::fm_interaction")
def _(emb):
    return emb.new_empty(emb.shape[0], 1)  # [B, 1]


@torch.library.register_fake("adrec::fm_interaction_bwd")
def _(grad_out, emb):
    return torch.empty_like(emb)  # [B, F, D]


def _setup_context(ctx, inputs, output):
    (emb,) = inputs
    ctx.save_for_backward(emb)


def _backward(ctx, grad_out):
    (emb,) = ctx.saved_tensors
    return torch.ops.adrec.fm_interaction_bwd(grad_out, emb)


torch.library.register_autograd("adrec::fm_interaction", _backward, setup_context=_setup_context)


def fm_interaction(emb):
    be = _backend.backend_for("fm_interaction", emb.device)
    if be == "reference":
        return reference.fm_interaction(emb)
    if be == "triton":
        return torch.ops.adrec.fm_interaction_triton(emb)
    return torch.ops.adrec.fm_interaction(emb)
