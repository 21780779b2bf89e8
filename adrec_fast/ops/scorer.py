# SPDX-License-Identifier: Apache-2.0
"""Op layer for ``adrec::serving_forward`` (the one-call serving forward of DLRM and DCN-v2) and
``adrec::serving_dlrm`` (DLRM on a packed model); inference only: no autograd. Their CPU kernels
are in csrc/cpu/scorer.cpp.

``serving_dlrm_handle`` is the numpy entry point of the same packed-DLRM kernel: a
``_C.ServingDLRM`` object (pybind11, csrc/module.cpp), the one deliberate exception to "pybind11
exposes only non-tensor utilities" (STYLE.md section 3). It skips the torch.ops dispatch and the
numpy <-> tensor glue, ~5 us of a ~15 us request at one candidate (bench/RESULTS_serving.md), and
runs the same checks and kernel as the op, with the GIL released."""
import torch

from .. import _C


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


def serving_dlrm_handle(meta, blob, weights, scale_bias=None):
    """The packed DLRM ``(meta, blob)`` of ``pack_dlrm`` over its embedding buffer ``weights``
    [R, D] float32 / float16 / uint8 (+ ``scale_bias`` [R, 2] float32 for uint8), validated once
    -> a callable ``handle(user_ids, cand_ids, dense=None) -> np.ndarray [N] float32``:
    user_ids int64 [Tu], cand_ids int64 [N, Tc], dense float32 [K_d] (None when K_d = 0), numpy
    arrays. Same result, checks and errors as ``torch.ops.adrec.serving_dlrm`` (IndexError for an
    id out of range, ValueError for a NaN dense value or no candidates; TypeError / ValueError
    naming the argument for a wrong dtype or shape); the GIL is released while the kernel runs;
    thread-safe. The handle keeps the tensors alive; they must not be written afterwards."""
    return _C.ServingDLRM(meta.numpy(), blob.numpy(), weights.numpy(),
                          None if scale_bias is None else scale_bias.numpy())
