# SPDX-License-Identifier: Apache-2.0
"""Training: ``fit``/``Trainer`` (progress bar, per-epoch AUC/logloss/calibration, early
stopping, lr schedules, seeds), exact resume from checkpoints, PNG plots, and one-pass online
training with progressive validation (``train_online``).
``save_checkpoint``/``load_model`` come from :mod:`adrec_fast.models.checkpoint`, which holds
the format beside the models so that serving needs nothing of this package."""
from ..models.checkpoint import load_model, save_checkpoint
from .loop import FitResult, InMemory, Trainer, evaluate, fit, lr_factor, metrics_of, predict
from .online import train_online
from .plots import plot_calibration, plot_learning_curves

__all__ = [
    "FitResult", "InMemory", "Trainer", "evaluate", "fit", "load_model", "lr_factor",
    "metrics_of", "plot_calibration", "plot_learning_curves", "predict", "save_checkpoint",
    "train_online",
]
