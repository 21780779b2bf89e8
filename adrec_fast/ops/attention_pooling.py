# SPDX-License-Identifier: Apache-2.0
"""Op layer for target attention pooling over variable-length behaviour sequences."""
import torch

from .. import reference
from . import _backend


@torch.library.register_fake("adrec::attention_pooling")
def _(query, keys, offsets):
    return torch.empty_like(query), keys.new_empty(keys.shape[0])  # out [B, D], probs [L_total]


@torch.library.register_fake("adrec::attention_pooling_bwd")
def _(grad_out, query, keys, offsets, probs):
    return torch.empty_like(query), torch.empty_like(keys)


def _setup_context(ctx, inputs, output):
    query, keys, offsets = inputs
    ctx.save_for_backward(query, keys, offsets, output[1])


def _backward(ctx, grad_out, grad_probs):
    query, keys, offsets, probs = ctx.saved_tensors
    if grad_probs is not None and bool((grad_probs != 0).any()):
        raise RuntimeError("attention_pooling: gradients through the attention weights output "
                           "are not supported; use the pooled output")
    gq, gk = torch.ops.adrec.attention_pooling_bwd(grad_out, query, keys, offsets, probs)
    return gq, gk, None


torch.library.register_autograd("adrec::attention_pooling", _backward, setup_context=_setup_context)


def attention_pooling(query, keys, offsets):
    be = _backend.backend_for("attention_pooling", query.device)
    if be == "reference":
        return reference.attention_pooling(query, keys, offsets)
    if be == "triton":
        return torch.ops.adrec.attention_pooling_triton(query, keys, offsets)
    return torch.ops.adrec.attention_pooling(query, keys, offsets)[0]
