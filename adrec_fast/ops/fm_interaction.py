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


# adrec::fm_interaction's own autograd is C++ (csrc/autograd/fm_interaction.cpp: a Python
# autograd wrapper costs about the op's whole margin over torch.compile); _setup_context and
# _backward above serve the Triton op, and define the same rule.


def fm_interaction(emb):
    be = _backend.backend_for("fm_interaction", emb.device)
    if be == "reference":
        return reference.fm_interaction(emb)
    if be == "triton":
        return torch.ops.adrec.fm_interaction_triton(emb)
    return torch.ops.adrec.fm_interaction(emb)


# --- Triton backend: adrec::fm_interaction_triton for CUDA tensors (kernels/fm_interaction.py);
# the reference is its CPU kernel. Skipped without triton or a device it runs on.
_tk = None
if _backend.TRITON_OPS:  # a device the kernels can run on (ops/_backend.py)
    try:
        from torch.library import triton_op, wrap_triton

        from ..kernels import fm_interaction as _tk
    except ImportError:  # triton is not installed
        _tk = None

if _tk is not None:

    @triton_op("adrec::fm_interaction_triton", mutates_args=())
    def _fm_interaction_triton(emb: torch.Tensor) -> torch.Tensor:
        return _tk.fm_interaction_fwd(emb, wrap=wrap_triton)  # [B, 1]

    @triton_op("adrec::fm_interaction_bwd_triton", mutates_args=())
    def _fm_interaction_bwd_triton(grad_out: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return _tk.fm_interaction_bwd(grad_out, emb, wrap=wrap_triton)  # [B, F, D]

    @_fm_interaction_bwd_triton.register_kernel("cpu")
    def _(grad_out, emb):
        return grad_out.reshape(-1, 1, 1) * (emb.sum(dim=1, keepdim=True) - emb)

    def _triton_backward(ctx, grad_out):
        (emb,) = ctx.saved_tensors
        return torch.ops.adrec.fm_interaction_bwd_triton(grad_out, emb)

    _fm_interaction_triton.register_kernel("cpu")(reference.fm_interaction)
    _fm_interaction_triton.register_autograd(_triton_backward, setup_context=_setup_context)
    _backend.register(
        "fm_interaction", "cuda", "triton",
        default=_backend.default_on_cuda("fm_interaction", "triton"),
    )
