# SPDX-License-Identifier: Apache-2.0
"""Modules that own parameters; they call adrec_fast.functional, never torch.ops."""
from .dynamic_table import DynamicEmbedding
from .embedding_bag import EmbeddingBagCollection
from .interaction import AttentionPooling, CrossNet, DotInteraction, FMInteraction, SigmoidBCEHead

__all__ = [
    "AttentionPooling",
    "CrossNet",
    "DotInteraction",
    "DynamicEmbedding",
    "EmbeddingBagCollection",
    "FMInteraction",
    "SigmoidBCEHead",
]
