# SPDX-License-Identifier: Apache-2.0
"""Op layer for ``adrec::serving_forward`` (the one-call serving forward of DLRM and DCN-v2) and
``adrec::serving_dlrm`` (DLRM on a packed model); inference only: no autograd. Their CPU kernels
are in csrc/cpu/scorer.cpp."""
import torch


@torch.library.register_fake("adrec::serving_forward")
def _(weights, scale_bias, user_rows, cand_rows, cand_slots, dense, bottom, layers, head_w,
      head_b, kind, n_cross, self_interaction):
    return dense.new_empty(cand_rows.shape[0])  # [N] probabilities


def serving_forward(weights, scale_bias, user_rows, cand_rows, cand_slots, dense, bottom, layers,
                    head_w, head_b, kind, n_cross, self_interaction):
    """See csrc/registration.cpp. torch.ops releases the GIL while the kernel runs."""
    return torch.ops.adrec.serving_forward(weights, scale_bias, user_rows, cand_rows, cand_slots,
                                           dense, bottom, layers, head_w, head_b, kind, n_cross,
                                           self_interaction)


@torch.library.register_fake("adrec::serving_dlrm")
def _(meta, blob, weights, scale_bias, user_ids, cand_ids, dense):
    return dense.new_empty(cand_ids.shape[0])  # [N] probabilities
