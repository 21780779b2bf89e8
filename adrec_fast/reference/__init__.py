# SPDX-License-Identifier: Apache-2.0
"""Plain-PyTorch definitions of every op: the oracle for tests and the "before" in benchmarks."""
from .attention_pooling import attention_pooling
from .cross_layer import cross_layer, cross_layer_bwd_
from .dot_interaction import dot_interaction
from .dropout import dropout
from .embedding_bag import embedding_bag, rowwise_adagrad_update, sgd_update
from .fm_interaction import fm_interaction
from .linear import linear
from .sigmoid_bce import score, sigmoid_bce

__all__ = [
    "attention_pooling",
    "cross_layer",
    "cross_layer_bwd_",
    "dot_interaction",
    "dropout",
    "embedding_bag",
    "fm_interaction",
    "linear",
    "rowwise_adagrad_update",
    "score",
    "sgd_update",
    "sigmoid_bce",
]
