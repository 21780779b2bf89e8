# SPDX-License-Identifier: Apache-2.0
"""Build a model by name: ``build_model(name, schema, embedding_dim=16, **kwargs)``."""
from __future__ import annotations

import inspect

from . import zoo  # noqa: F401  (registers the models)
from .base import MODELS, CTRModel


def model_names() -> list[str]:
    return sorted(MODELS)


def canonical_name(name: str) -> str:
    """The registered name of ``name`` ("DCN-v2" -> "dcnv2"); ValueError when unknown."""
    key = str(name).lower().replace("-", "").replace("_", "")
    aliases = {"dcn": "dcnv2", "dcnv2": "dcnv2", "logreg": "lr"}
    key = aliases.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {model_names()}")
    return key


def reads_histories(name: str) -> bool:
    """Whether model ``name`` attends over behaviour sequences (a schema inferred for it reads
    history columns as sequences); ValueError when the name is unknown."""
    return MODELS[canonical_name(name)].reads_histories


def build_model(name: str, schema, embedding_dim: int = 16, **kwargs) -> CTRModel:
    """A fresh model ``name`` (see ``model_names()``) for a fitted ``schema``.

    ``kwargs`` are the model's keyword arguments (e.g. ``hidden=(256, 128)``,
    ``cross_layers=3``, ``structure="stacked"``) plus the shared ones: ``embedding_optimizer``
    (``"rowwise_adagrad"`` default, ``"sgd"``, or ``"none"`` for a sparse-gradient Parameter),
    ``pooling`` (``"mean"`` | ``"sum"`` for multi-valued bags), ``init_std``, ``embedding_l2`` /
    ``embedding_l2_mode`` (L2 on every table, inside the fused update; see
    ``nn.EmbeddingBagCollection``) and ``dense_init`` ("torch" | "xavier"); deep models also take
    ``dropout``, ``batch_norm`` and ``layer_norm``. The default training recipe of each model
    (what ``adrec-fast train`` uses) is ``training.recipes``. Parameters are
    drawn from torch's global RNG: seed it first for a reproducible start.
    ``model.config`` rebuilds the same architecture: ``build_model(**model.config, schema=s)``.
    """
    key = canonical_name(name)
    cls = MODELS[key]
    allowed = set(model_kwargs(key))
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"model {key!r} takes no argument(s) {unknown}; its keyword arguments: "
                        f"{sorted(allowed)}")
    return cls(schema, embedding_dim=embedding_dim, **kwargs)


def model_kwargs(name: str) -> list[str]:
    """The keyword arguments model ``name`` accepts (its own and the shared ones)."""
    names = []
    for c in (MODELS[name], CTRModel):
        for p in inspect.signature(c.__init__).parameters.values():
            named = p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD
                                                 and p.name not in ("self", "schema"))
            if named and p.name not in names and p.name != "embedding_dim":
                names.append(p.name)
    return names
