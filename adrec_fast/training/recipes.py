# SPDX-License-Identifier: Apache-2.0
"""The default training recipe of every model: the one place that decides what
``adrec-fast train DATA --model NAME`` does when no tuning flag is given.

A recipe is the model's keyword arguments (``build_model``), the trainer's (``Trainer``) and the
number of epochs. The values were chosen by measurement against FuxiCTR 2.3.10 with its BARS
recipe (``bench/quality.py``; the table and the runs behind each choice are in
``bench/RESULTS_models.md``).

    model, trainer, epochs = recipes.build("deepfm", schema, seed=0)
    trainer.fit(train, valid, epochs=epochs)

Any setting can be overridden by name (``build(..., embedding_l2=0.0, batch_size=1024)``):
names that the model takes go to the model, the others to the trainer.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from ..models.registry import build_model, canonical_name, model_kwargs, model_names
from .loop import Trainer


@dataclass(frozen=True)
class Recipe:
    model: dict = field(default_factory=dict)  # build_model keyword arguments
    trainer: dict = field(default_factory=dict)  # Trainer keyword arguments
    epochs: int = 100  # an upper bound: early stopping ends the run


#: shared by every model: early stopping on validation AUC with the best epoch restored,
#: lr x0.1 after every epoch without improvement, dense gradients clipped at norm 10, the
#: logits shifted at the end so that the mean prediction matches the validation positive rate.
#: Batch 4096 as the peer's recipe (DeepFM on Frappe, L2 0.5: 0.9477 at 4096, 0.9476 at 1024).
_TRAINER = {"lr": 1e-3, "batch_size": 4096, "patience": 2, "plateau_factor": 0.1,
            "clip_grad_norm": 10.0, "schedule": "constant", "calibrate": True}
#: embeddings keep the table's default N(0, 0.1/sqrt(D)) start: the peer's N(0, 1e-4) costs
#: DeepFM 0.013 AUC under row-wise Adagrad (0.9302 vs 0.9428, Frappe, batch 1024)
_MODEL = {"embedding_dim": 16, "dense_init": "xavier"}
_TOWER = {"hidden": (400, 400, 400), "dropout": 0.2, "batch_norm": True}

# Frappe split, seed 1, test AUC / logloss (bench/RESULTS_models.md has the 3-seed table):
#   LR     embedding lr 0.05: 0.9152 / 0.4166, 0.2: 0.9222 / 0.3221; L2 0.02: 0.9202 / 0.3536
#   FM     lr 0.2, no L2: 0.9348 / 0.3115, L2 0.02: 0.9397 / 0.2668, 0.1: 0.9218, 1.0: 0.9009
#   DeepFM embedding L2 0: 0.9102 (stopped at epoch 6), 0.5: 0.9477 / 0.3417, 1.0: 0.9470 /
#          0.3055, 2.0: 0.9441 / 0.3289; without batch norm 0.9294; at L2 1.0 embedding lr
#          0.02: 0.9502 / 0.3251, 0.03: 0.9498 / 0.3105 (3 seeds 0.9497 / 0.3189), 0.05: 0.9470,
#          0.1: 0.9447; batch 2048: 0.9432
#   DCN-v2 L2 0.5: 0.9462 / 0.3421, 1.0: 0.9484 / 0.3098; without batch norm 0.9300
#   DLRM   with batch norm 0.9130 / 0.627 (unstable), without 0.9504 / 0.2797; L2 0.1: 0.9342
# DLRM, chosen on the validation AUC (seeds 1-6; test AUC after the slash), Frappe: dropout 0.2:
#   0.9484 / 0.9445, 0.1: 0.9515 / 0.9493 (better on validation at 5 of the 6 seeds, equal at
#   the sixth), 0: 0.9468 / 0.9434; embedding lr 0.03: 0.9514 / 0.9472, 0.1: 0.9499 / 0.9470; L2
#   0.5: 0.9509 / 0.9465, 2.0: 0.9338; layer norm 0.9486 / 0.9430; dropout 0.1 with embedding
#   lr 0.03: 0.9488 / 0.9444. Synthetic (seeds 1-3): dropout 0.2 0.7550 / 0.7537, 0.1 0.7551 /
#   0.7522.
# DIN, chosen on the validation AUC (3 seeds each; test AUC after the slash), Frappe / synthetic:
#   L2 1.0: 0.9511 / 0.9460, 0.7556 / 0.7520; L2 0.5: 0.9507 / 0.9482, 0.7555 / 0.7545; L2 2.0,
#   embedding lr 0.03 or 0.1, dropout 0.1 or 0.3 no better on validation. Checked on fresh seeds
#   4-6: L2 1.0 0.9505 / 0.9473, 0.7486 / 0.7454; L2 0.5 0.9525 / 0.9479, 0.7532 / 0.7513.
RECIPES: dict[str, Recipe] = {
    "lr": Recipe(model={**_MODEL}, trainer={**_TRAINER, "embedding_lr": 0.2}),
    "fm": Recipe(model={**_MODEL, "embedding_l2": 0.02},
                 trainer={**_TRAINER, "embedding_lr": 0.2}),
    "deepfm": Recipe(model={**_MODEL, **_TOWER, "embedding_l2": 1.0},
                     trainer={**_TRAINER, "embedding_lr": 0.03}),
    "dcnv2": Recipe(model={**_MODEL, **_TOWER, "cross_layers": 3, "embedding_l2": 1.0},
                    trainer={**_TRAINER}),
    "dlrm": Recipe(model={**_MODEL, "top": (400, 400, 400), "dropout": 0.1, "batch_norm": False,
                          "embedding_l2": 1.0}, trainer={**_TRAINER}),
    "din": Recipe(model={**_MODEL, **_TOWER, "embedding_l2": 0.5}, trainer={**_TRAINER}),
}


def recipe(name: str) -> Recipe:
    """The default recipe of model ``name`` (aliases as in ``build_model``)."""
    return copy.deepcopy(RECIPES[canonical_name(name)])


def resolve(name: str, **overrides) -> tuple[dict, dict, int]:
    """(build_model kwargs incl. embedding_dim, Trainer kwargs, epochs) of ``name``'s recipe
    with ``overrides`` applied: a name the model takes goes to the model, ``epochs`` to the
    epochs, anything else to the trainer (which rejects what it does not know)."""
    key = canonical_name(name)
    r = recipe(key)
    model_kw, trainer_kw, epochs = copy.deepcopy(r.model), dict(r.trainer), r.epochs
    takes = set(model_kwargs(key)) | {"embedding_dim"}
    any_model = set().union(*(model_kwargs(n) for n in model_names()))
    for k, v in overrides.items():
        if k == "epochs":
            epochs = int(v)
        elif k in takes:
            model_kw[k] = v
        elif k in any_model:
            raise ValueError(f"model {key!r} takes no option {k!r}; its options: "
                             f"{sorted(takes)}")
        else:
            trainer_kw[k] = v
    model_kw.setdefault("embedding_dim", 16)
    return model_kw, trainer_kw, epochs


def build(name: str, schema, *, seed: int = 0, progress: bool = True, **overrides):
    """(model, trainer, epochs) of ``name``'s recipe with ``overrides`` applied. Seed torch's
    RNG before calling for a reproducible initialisation."""

    model_kw, trainer_kw, epochs = resolve(name, **overrides)
    model = build_model(canonical_name(name), schema, **model_kw)
    trainer = Trainer(model, seed=seed, progress=progress, **trainer_kw)
    return model, trainer, epochs
