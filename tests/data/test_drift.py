# SPDX-License-Identifier: Apache-2.0
"""Drift mode of the synthetic generator: ads born and retired, drifting click rates, shifting
interests, the per-window oracle AUC; deterministic and independent of chunking."""

import numpy as np
import pyarrow as pa
import pytest

from adrec_fast.data.metrics import auc
from adrec_fast.data.synthetic import BLOCK_ROWS, SyntheticCTR

P = 2 * BLOCK_ROWS  # rows per period: two blocks


@pytest.fixture(scope="module")
def gen():
    return SyntheticCTR(seed=11, drift=True, period_rows=P, drift_periods=7)


def test_deterministic_and_chunk_independent(gen):
    a = gen.generate(3 * P)
    b = SyntheticCTR(seed=11, drift=True, period_rows=P, drift_periods=7).generate(3 * P)
    assert a.equals(b)
    pieces = list(gen.chunks(3 * P, chunk_rows=7000))
    assert pa.concat_tables(pieces).combine_chunks().equals(a)
    assert not SyntheticCTR(seed=12, drift=True, period_rows=P).generate(P).equals(a.slice(0, P))
    # drift changes the rows: the same seed without drift gives another stream
    assert not SyntheticCTR(seed=11).generate(P).equals(a.slice(0, P))


def test_stream_time_is_block_start(gen):
    assert gen.stream_time(0) == 0.0
    assert gen.stream_time(BLOCK_ROWS - 1) == 0.0
    assert gen.stream_time(BLOCK_ROWS) == 0.5
    assert gen.stream_time(3 * P + 5) == 3.0
    assert SyntheticCTR(seed=11).stream_time(10**6) == 0.0


def test_ads_are_born_and_retire(gen):
    items = lambda lo, hi: set(  # noqa: E731
        np.asarray(gen.generate(hi).column("item").slice(lo).to_pylist(), dtype=np.int64))
    early, late = items(0, P), items(6 * P, 7 * P)
    alive0, alive6 = gen.alive_items(0.0), gen.alive_items(6.0)
    # every candidate drawn in a period is alive at that period's clock (block start times)
    assert early <= set(np.flatnonzero(alive0 | gen.alive_items(0.5)))
    assert late <= set(np.flatnonzero(gen.alive_items(6.0) | gen.alive_items(6.5)))
    # lifetimes are at most 3 periods: nothing alive at 0 is alive at 6
    assert not (alive0 & alive6).any()
    assert not (early & late)
    assert 50 < alive0.sum() < 400 and 50 < alive6.sum() < 400


def test_click_rates_and_interests_change(gen):
    u0, u4 = gen.user_clusters(0.0), gen.user_clusters(4.0)
    assert (u0 != u4).mean() > 0.5  # most users moved (one cluster in 16 stays by chance)
    _, _, _, d0 = gen._state(0.0)
    _, _, _, d1 = gen._state(1.0)
    assert set(d0) == {1, 2, 3}
    for f in d0:
        assert np.abs(d1[f] - d0[f]).mean() > 0.2 * gen.w[f].std()
    # after the horizon no ad is born and interests stay put
    assert (gen.user_clusters(7.0) == gen.user_clusters(20.0)).all()
    assert not (gen.alive_items(20.0) & ~gen.alive_items(7.0)).any()


def test_window_oracle_auc(gen):
    n = 3 * P + 100
    w = gen.window_oracle_auc(n, window_rows=P)
    assert [(x["start"], x["stop"]) for x in w] == [(0, P), (P, 2 * P), (2 * P, 3 * P),
                                                   (3 * P, 3 * P + 100)]
    table, p = next(gen.chunks(n, chunk_rows=n, with_probability=True))
    y = table.column("label").to_numpy()
    for x in w:
        assert x["oracle_auc"] == auc(y[x["start"]:x["stop"]], p[x["start"]:x["stop"]])
        assert x["ctr"] == pytest.approx(y[x["start"]:x["stop"]].mean())
        assert x["time"] == gen.stream_time(x["start"])
    for x in w[:3]:
        assert 0.74 <= x["oracle_auc"] <= 0.86
    # an offset window agrees with oracle_auc
    w2 = gen.window_oracle_auc(P, window_rows=P, offset=P)
    assert w2[0]["oracle_auc"] == gen.oracle_auc(P, offset=P) == w[1]["oracle_auc"]
    with pytest.raises(ValueError, match="window_rows"):
        gen.window_oracle_auc(10, window_rows=0)


def test_ctr_near_target_and_schema_encodes(gen):
    t = gen.generate(2 * P)
    y = t.column("label").to_numpy()
    assert 0.18 <= y.mean() <= 0.32
    b = gen.schema().encode(t)
    assert b.batch_size == 2 * P and int(b.indices.min()) >= 1  # every id in the vocabulary


def test_bad_drift_options():
    with pytest.raises(ValueError, match="period_rows"):
        SyntheticCTR(drift=True, period_rows=0)
    with pytest.raises(ValueError, match="drift_periods"):
        SyntheticCTR(drift=True, drift_periods=0)
