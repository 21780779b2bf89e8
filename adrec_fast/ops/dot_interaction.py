# SPDX-License-Identifier: Apache-2.0
"""Op layer for the DLRM pairwise dot interaction."""
import torch

from .. import reference
from . import _backend


def num_pairs(F: int, self_interaction: bool) -> int:
    return F * (F + 1) // 2 if self_interaction else F * (F - 1) // 2


@torch.library.register_fake("adrec::dot_interaction")
def _(emb, self_interaction):
    return emb.new_empty(emb.shape[0], num_pairs(emb.shape[1], self_interaction))  # [B, P]


@torch.library.register_fake("adrec::dot_interaction_bwd")
def _(grad_out, emb, self_interaction):
    return torch.empty_like(emb)  # [B, F, D]


def _setup_context(ctx, inputs, output):
    emb, self_interaction = inputs
    ctx.save_for_backward(emb)
    ctx.self_interaction = self_interaction


def _backward(ctx, grad_out):
    (emb,) = ctx.saved_tensors
    return torch.ops.adrec.dot_interaction_bwd(grad_out, emb, ctx.self_interaction), None


torch.library.register_autograd("adrec::dot_interaction", _backward, setup_context=_setup_context)


def dot_interaction(emb, self_interaction=False):
    be = _backend.backend_for("dot_interaction", emb.device)
    if be == "reference":
        return reference.dot_interaction(emb, self_interaction)
    if be == "triton":
        return torch.ops.adrec.dot_interaction_triton(emb, self_interaction)
    return torch.ops.adrec.dot_interaction(emb, self_interaction)
