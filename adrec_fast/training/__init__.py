# SPDX-License-Identifier: Apache-2.0
"""Training: ``fit``/``Trainer`` (progress bar, per-epoch AUC/logloss/calibration, early
stopping, lr schedules, seeds), atomic safetensors+JSON checkpoints with exact resume,
``load_model`` for serving, and PNG plots."""
from .checkpoint import load_model, save_checkpoint
from .loop import FitResult, InMemory, Trainer, evaluate, fit, lr_factor, metrics_of, predict
from .plots import plot_calibration, plot_learning_curves

__all__ = [
    "FitResult", "InMemory", "Trainer", "evaluate", "fit", "load_model", "lr_factor",
    "metrics_of", "plot_calibration", "plot_learning_curves", "predict", "save_checkpoint",
]
