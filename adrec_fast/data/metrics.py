# SPDX-License-Identifier: Apache-2.0
"""Ranking and calibration metrics on numpy arrays (shared by the data layer and the trainer)."""

from __future__ import annotations

import numpy as np


def _as_1d(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def auc(labels, scores) -> float:
    """Area under the ROC curve, rank based (Mann-Whitney U); tied scores get average ranks.

    labels [N] in {0, 1}, scores [N] any real. Deterministic. Returns nan when only one class
    is present.
    """
    y = _as_1d(labels)  # [N]
    s = _as_1d(scores)  # [N]
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    n_pos = float((y > 0.5).sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # each run of tied scores gets its average rank, whatever order the sort leaves it in:
    # the unstable sort (about twice as fast) gives the same ranks
    order = np.argsort(s, kind="quicksort")
    s_sorted = s[order]  # [N]
    # average rank of each run of equal scores: ranks are 1-based positions in sorted order
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # [R]
    ends = np.r_[starts[1:], s.size]  # [R] exclusive
    avg_rank = (starts + 1 + ends) / 2.0  # mean of starts+1 .. ends
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    rank_sum_pos = ranks[y > 0.5].sum()
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probs are clipped to [eps, 1-eps]."""
    y = _as_1d(labels)
    p = np.clip(_as_1d(probs), eps, 1.0 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def calibration(labels, probs) -> float:
    """Mean prediction over positive rate (1.0 is perfectly calibrated on average)."""
    y = _as_1d(labels)
    p = _as_1d(probs)
    rate = y.mean() if y.size else float("nan")
    return float(p.mean() / rate) if rate > 0 else float("nan")
