# SPDX-License-Identifier: Apache-2.0
"""Modules that own parameters; they call adrec_fast.functional, never torch.ops."""
from .dropout import Dropout
from .dynamic_table import DynamicEmbedding
from .embedding_bag import EmbeddingBagCollection
from .interaction import AttentionPooling, CrossNet, DotInteraction, FMInteraction, SigmoidBCEHead

__all__ = [
    "AttentionPooling",
    "CrossNet",
    "DotInteraction",
    "Dropout",
    "DynamicEmbedding",
    "EmbeddingBagCollection",
    "FMInteraction",
    "SigmoidBCEHead",
]
