# SPDX-License-Identifier: Apache-2.0
"""PNG plots of a run: learning curves and a reliability (calibration) diagram.

matplotlib (the optional extra ``plot``) is imported lazily, with the non-interactive Agg
backend; without it, training skips the plots (``missing_matplotlib`` says so).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def missing_matplotlib() -> str | None:
    """None when matplotlib can be imported, else a one-line note that the plots are skipped."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("matplotlib is not installed: no plots written "
                "(pip install matplotlib, or the extra adrec_fast[plot])")
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_learning_curves(history: list[dict], path) -> Path:
    """Train loss and validation logloss (left), validation AUC (right) per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
        if history and "valid_logloss" in history[0]:
            a.plot(epochs, [h["valid_logloss"] for h in history], "o-", label="valid logloss")
            b.plot(epochs, [h["valid_auc"] for h in history], "o-", color="C2", label="valid AUC")
        a.set_xlabel("epoch")
        a.set_ylabel("logloss")
        a.legend()
        a.grid(alpha=0.3)
        b.set_xlabel("epoch")
        b.set_ylabel("AUC")
        b.legend()
        b.grid(alpha=0.3)
        fig.suptitle("learning curves")
        return _save(fig, path)
    finally:
        plt.close(fig)


def reliability(labels, probs, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width bins of the prediction: (mean prediction, positive rate, count) per
    non-empty bin."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    sp = np.bincount(which, weights=p, minlength=bins)
    sy = np.bincount(which, weights=y, minlength=bins)
    keep = count > 0
    return sp[keep] / count[keep], sy[keep] / count[keep], count[keep]


def plot_calibration(labels, probs, path, bins: int = 10) -> Path:
    """Reliability diagram: positive rate against mean prediction per bin, with counts."""
    plt = _pyplot()
    mp, rate, count = reliability(labels, probs, bins)
    fig, (a, b) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]},
                               sharex=True)
    try:
        a.plot([0, 1], [0, 1], "--", color="gray", label="perfect")
        a.plot(mp, rate, "o-", label="model")
        a.set_ylabel("positive rate")
        a.set_xlim(0, 1)
        a.set_ylim(0, 1)
        a.legend()
        a.grid(alpha=0.3)
        ratio = float(np.mean(probs) / np.mean(labels)) if len(labels) and np.mean(labels) > 0 else float("nan")
        a.set_title(f"calibration (mean prediction / positive rate = {ratio:.3f})")
        b.bar(mp, count, width=0.8 / bins)
        b.set_xlabel("mean prediction")
        b.set_ylabel("rows")
        return _save(fig, path)
    finally:
        plt.close(fig)
