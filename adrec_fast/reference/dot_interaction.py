# SPDX-License-Identifier: Apache-2.0
"""DLRM pairwise dot interaction (torchrec InteractionArch semantics)."""
import torch
from torch import Tensor


def dot_interaction(emb: Tensor, self_interaction: bool = False) -> Tensor:
    """emb [B, F, D] -> [B, P]: e_i . e_j for i < j (i <= j with self_interaction), row-major in
    (i, j). P = F(F-1)/2, or F(F+1)/2 with self_interaction."""
    F_ = emb.size(1)
    gram = torch.bmm(emb, emb.transpose(1, 2))  # [B, F, F]
    i, j = torch.triu_indices(F_, F_, offset=0 if self_interaction else 1, device=emb.device)
    return gram[:, i, j]
