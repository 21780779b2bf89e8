# SPDX-License-Identifier: Apache-2.0
"""The op layer: fake kernels, autograd and backend choice for every ``adrec::`` op."""
from . import _backend  # noqa: F401
from . import attention_pooling, cross_layer, dot_interaction, dropout, embedding_bag
from . import fm_interaction
from . import linear, scorer, sigmoid_bce

__all__ = [
    "attention_pooling",
    "cross_layer",
    "dot_interaction",
    "dropout",
    "embedding_bag",
    "fm_interaction",
    "linear",
    "scorer",
    "sigmoid_bce",
]
