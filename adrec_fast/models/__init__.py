# SPDX-License-Identifier: Apache-2.0
"""CTR models on the fused ops, configured by name and keyword arguments.

    model = build_model("deepfm", schema, embedding_dim=16, hidden=(256, 128))
    logits = model(batch)                       # Batch -> [B]
    loss = model.loss(logits, batch.labels)     # fused sigmoid + BCE
    probs = model.predict(batch)                # [B], eval mode

Names: lr, fm, deepfm, dcnv2, dlrm, din. Embeddings go through one fused
EmbeddingBagCollection per lookup (row-wise Adagrad fused into the backward by default); the
rest (``model.dense_parameters()``) is trained by a torch optimizer.
"""
from .base import MODELS, CTRModel, SparseLookup, mlp, register_model
from .registry import build_model, model_names
from .zoo import DIN, DLRM, FM, LR, DCNv2, DeepFM

__all__ = [
    "DIN",
    "DLRM",
    "FM",
    "LR",
    "MODELS",
    "CTRModel",
    "DCNv2",
    "DeepFM",
    "SparseLookup",
    "build_model",
    "mlp",
    "model_names",
    "register_model",
]
