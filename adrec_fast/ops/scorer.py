# SPDX-License-Identifier: Apache-2.0
"""Op layer for ``adrec::serving_forward``, the serving executor (every zoo model on a model
packed by ``adrec_fast.serving.scorer.pack``); inference only: no autograd. Its CPU kernel is in
csrc/cpu/scorer.cpp.

``serving_handle`` is the numpy entry point of the same kernel: a ``_C.ServingModel`` object
(pybind11, csrc/module.cpp), the one deliberate exception to "pybind11 exposes only non-tensor
utilities" (STYLE.md section 3). It skips the torch.ops dispatch and the numpy <-> tensor glue,
~5 us of a ~15 us request at one candidate (bench/RESULTS_serving.md), and runs the same checks
and kernel as the op, with the GIL released."""
import torch

from .. import _C


@torch.library.register_fake("adrec::serving_forward")
def _(meta, blob, weights, scale_bias, lin, user_ids, cand_ids, dense, seq_ids, seq_lengths):
    return dense.new_empty(cand_ids.shape[0])  # [N] probabilities


def serving_forward(meta, blob, weights, scale_bias, lin, user_ids, cand_ids, dense, seq_ids,
                    seq_lengths):
    """See csrc/registration.cpp. torch.ops releases the GIL while the kernel runs."""
    return torch.ops.adrec.serving_forward(meta, blob, weights, scale_bias, lin, user_ids,
                                           cand_ids, dense, seq_ids, seq_lengths)


def serving_handle(meta, blob, weights, scale_bias=None, lin=None):
    """The packed model ``(meta, blob)`` of ``pack`` over its embedding rows ``weights`` [R, D]
    float32 / float16 / uint8 (+ ``scale_bias`` [R, 2] float32 for uint8) and its first-order
    weights ``lin`` [R] float32 (None without), validated once -> a callable
    ``handle(user_ids, cand_ids, dense=None, seq_ids=None, seq_lengths=None) -> np.ndarray [N]``
    on numpy arrays: user_ids int64 [Tu] (or [T]), cand_ids int64 [N, Tc], dense float32 [K_d] or
    [Nd, K_d], seq_ids int64 [sum L] with seq_lengths int64 [S]. Same result, checks and errors as
    ``torch.ops.adrec.serving_forward``; the GIL is released while the kernel runs; thread-safe.
    The handle keeps the tensors alive; they must not be written afterwards."""
    return _C.ServingModel(meta.numpy(), blob.numpy(), weights.numpy(),
                           None if scale_bias is None else scale_bias.numpy(),
                           None if lin is None else lin.numpy())
