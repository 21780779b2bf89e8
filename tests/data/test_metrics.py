# SPDX-License-Identifier: Apache-2.0
"""auc against the pair-counting definition (ties count one half), with many ties."""
from __future__ import annotations

import math

import numpy as np
import pytest

from adrec_fast.data.metrics import auc


def _pairs(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y > 0.5], s[y <= 0.5]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


@pytest.mark.parametrize("levels", [3, 50, None])  # heavy ties, some, almost none
@pytest.mark.parametrize("n", [2, 7, 1000])
def test_auc_matches_pair_counting(levels, n):
    rng = np.random.default_rng(n + (levels or 0))
    y = (rng.random(n) < 0.4).astype(np.float32)
    y[:2] = [0, 1]  # both classes
    s = rng.random(n).astype(np.float32)
    if levels is not None:
        s = np.round(s * levels) / levels
    assert math.isclose(auc(y, s), _pairs(y, s), rel_tol=0, abs_tol=1e-12)
    # the order of the rows does not change it (ties included)
    p = rng.permutation(n)
    assert auc(y[p], s[p]) == auc(y, s)


def test_auc_one_class_is_nan():
    assert math.isnan(auc(np.ones(4), np.arange(4.0)))
