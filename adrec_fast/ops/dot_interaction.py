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


# --- Triton backend: adrec::dot_interaction_triton for CUDA tensors
# (kernels/dot_interaction.py); the reference is its CPU kernel. Skipped without triton or a
# device it runs on.
_tk = None
if _backend.TRITON_OPS:  # a device the kernels can run on (ops/_backend.py)
    try:
        from torch.library import triton_op, wrap_triton

        from ..kernels import dot_interaction as _tk
    except ImportError:  # triton is not installed
        _tk = None

if _tk is not None:

    @triton_op("adrec::dot_interaction_triton", mutates_args=())
    def _dot_interaction_triton(emb: torch.Tensor, self_interaction: bool) -> torch.Tensor:
        return _tk.dot_interaction_fwd(emb, self_interaction, wrap=wrap_triton)  # [B, P]

    @triton_op("adrec::dot_interaction_bwd_triton", mutates_args=())
    def _dot_interaction_bwd_triton(
        grad_out: torch.Tensor, emb: torch.Tensor, self_interaction: bool
    ) -> torch.Tensor:
        return _tk.dot_interaction_bwd(grad_out, emb, self_interaction, wrap=wrap_triton)

    @_dot_interaction_bwd_triton.register_kernel("cpu")
    def _(grad_out, emb, self_interaction):
        F_ = emb.shape[1]
        i, j = torch.triu_indices(F_, F_, offset=0 if self_interaction else 1)
        gm = emb.new_zeros(emb.shape[0], F_, F_)  # [B, F, F]
        gm[:, i, j] = grad_out.to(emb.dtype)
        return torch.bmm(gm + gm.transpose(1, 2), emb)  # diagonal doubled by the sum

    def _triton_backward(ctx, grad_out):
        (emb,) = ctx.saved_tensors
        g = torch.ops.adrec.dot_interaction_bwd_triton(grad_out, emb, ctx.self_interaction)
        return g, None

    _dot_interaction_triton.register_kernel("cpu")(reference.dot_interaction)
    _dot_interaction_triton.register_autograd(_triton_backward, setup_context=_setup_context)
    _backend.register(
        "dot_interaction", "cuda", "triton",
        default=_backend.default_on_cuda("dot_interaction", "triton"),
    )
