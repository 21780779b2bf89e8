# SPDX-License-Identifier: Apache-2.0
"""Synthetic default data and the metrics."""

import numpy as np
import pytest
import torch

from adrec_fast.data import Batch, Schema, auc, infer_schema, load_all, logloss
from adrec_fast.data.metrics import calibration
from adrec_fast.data.synthetic import BLOCK_ROWS, SyntheticCTR


@pytest.fixture(scope="module")
def gen():
    return SyntheticCTR(n_rows=20000, seed=3)


def test_deterministic_and_independent_of_chunking(gen):
    a = gen.generate(12000)
    b = SyntheticCTR(n_rows=20000, seed=3).generate(12000)
    assert a.equals(b)
    pieces = list(gen.chunks(12000, chunk_rows=5000))
    assert [t.num_rows for t in pieces] == [5000, 5000, 2000]
    import pyarrow as pa

    assert pa.concat_tables(pieces).combine_chunks().equals(a)
    assert gen.generate(BLOCK_ROWS + 5).slice(0, 100).equals(a.slice(0, 100))
    assert not SyntheticCTR(n_rows=100, seed=4).generate(100).equals(a.slice(0, 100))


def test_ctr_and_oracle_auc_in_range(gen):
    t = gen.generate()
    y = t.column("label").to_numpy()
    p = gen.true_probability()
    assert p.shape == (20000,) and ((p > 0) & (p < 1)).all()
    assert 0.2 <= y.mean() <= 0.3 and abs(p.mean() - y.mean()) < 0.02
    oracle = gen.oracle_auc()
    assert 0.75 <= oracle <= 0.85
    assert oracle == pytest.approx(auc(y, p))
    # the true model is calibrated: logloss of p beats the constant predictor
    assert logloss(y, p) < logloss(y, np.full_like(p, y.mean())) - 0.05


def test_each_component_carries_signal(gen):
    y = gen.generate().column("label").to_numpy()
    raw, parts = gen._rows(np.random.default_rng([3, 2, 0]), BLOCK_ROWS)
    y0 = y[:BLOCK_ROWS]
    for k, name in enumerate(["first order", "fm", "dense", "attention"]):
        assert auc(y0, parts[:, k]) > 0.55, name


def test_schema_and_batches(gen):
    schema = gen.schema()
    assert schema.fitted
    assert schema.sequence_fields() == [("hist", schema.table_of("item"))]
    assert len(schema.sparse_fields()) == gen.n_sparse and schema.n_dense == gen.n_dense
    batches = list(gen.batches(4096, n=10000))
    assert [b.batch_size for b in batches] == [4096, 4096, 1808]
    whole = schema.encode(gen.generate(10000))
    again = Batch.concat(batches)
    assert torch.equal(again.indices, whole.indices) and torch.equal(again.labels, whole.labels)
    assert (whole.indices > 0).all()  # full vocabularies: no OOV
    lengths = whole.seq_offsets["hist"].diff()
    assert lengths.max() <= gen.max_len and lengths.min() == 0
    # dense statistics of the ready schema agree with fitting on the data
    fitted = gen.schema(fit=False).fit(gen.generate(10000))
    for name in gen.dense_names:
        assert fitted.field(name).mean == pytest.approx(schema.field(name).mean, abs=0.05)
    assert fitted.field("item").vocabulary is not None


def test_write_csv_reads_back_through_inference(gen, tmp_path):
    path = tmp_path / "syn.csv.gz"
    gen.write_csv(path, n=3000, chunk_rows=1000)
    schema = infer_schema(
        path,
        overrides={
            "hist": {
                "type": "multi_categorical",
                "sequence": True,
                "share_with": "item",
                "max_len": gen.max_len,
            }
        },
    )
    types = {f.name: f.type for f in schema.fields}
    assert (
        types["user"] == "categorical"
        and types["d0"] == "dense"
        and types["hist"] == "multi_categorical"
    )
    batch = load_all(path, schema)
    direct = gen.schema().encode(gen.generate(3000))
    assert batch.batch_size == 3000 and torch.equal(batch.labels, direct.labels)
    torch.testing.assert_close(batch.seq_offsets["hist"], direct.seq_offsets["hist"])


def test_auc_handles_ties_and_matches_pair_counting():
    assert auc([0, 1], [0.1, 0.9]) == 1.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auc([1, 0, 1, 0], [0.2, 0.2, 0.9, 0.1]) == pytest.approx(0.875)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 10, 300).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(y, s) == pytest.approx(brute)
    assert np.isnan(auc([1, 1], [0.2, 0.3]))
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))
    assert calibration([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.0)


def test_item_effect_default_is_the_pinned_generator():
    # numbers of the generator before item_effect existed: the default stays bit for bit
    for g in (SyntheticCTR(n_rows=20000, seed=3, item_text=True),
              SyntheticCTR(n_rows=20000, seed=3, item_text=True, item_effect=0.0)):
        t = g.generate(10000)
        assert int(t.column("label").to_numpy().sum()) == 2464
        assert t.column("item").to_pylist()[:6] == ["679", "235", "194", "739", "704", "287"]
        assert g.bias == -1.7895349563312184
        assert g.titles[:2] == ["Dr. Lee Silver! Gold Necklace Official",
                                "PROFESSIONAL, CHEF COOKWARE PAN KNIFE"]
    with pytest.raises(ValueError, match="item_effect"):
        SyntheticCTR(item_effect=-0.5)
    with pytest.raises(ValueError, match="item_effect"):
        SyntheticCTR(item_effect=float("nan"))


def test_item_effect_term_and_titles():
    base = SyntheticCTR(n_rows=20000, seed=5, item_text=True)
    g = SyntheticCTR(n_rows=20000, seed=5, item_text=True, item_effect=1.0)
    a, b = base.generate(BLOCK_ROWS), g.generate(BLOCK_ROWS)
    # the same rows: only the labels, the bias and the titles' quality words change
    assert a.drop_columns(["label", "title"]).equals(b.drop_columns(["label", "title"]))
    assert not a.column("label").equals(b.column("label"))
    raw, parts = g._rows(np.random.default_rng([5, 1]), 32768)  # the calibration sample
    assert parts.shape[1] == 5
    scaled = parts * g._scale
    assert scaled[:, 4].std() == pytest.approx(1.0, rel=1e-9)
    np.testing.assert_allclose(parts[:, 4], g.cluster_effect[g.item_cluster[raw["ids"][1]]]
                               + g.item_bias[raw["ids"][1]])
    y = b.column("label").to_numpy()
    assert 0.2 <= y.mean() <= 0.3
    item = np.array(b.column("item").to_pylist(), dtype=np.int64)
    assert auc(y, g.item_term[item]) > 0.6 > auc(y, base.w[1][item])
    # the titles' quality words follow the item's own effect, the first-order weight + its bias
    own = g.item_own_effect()
    np.testing.assert_allclose(own, g._scale[0] * g.w[1] + g._scale[4] * g.item_bias)
    lo, hi = np.quantile(own, [1 / 3, 2 / 3])
    premium = {"premium", "official", "original", "deluxe", "professional", "award"}
    budget = {"clearance", "used", "generic", "refurbished", "budget", "basic"}
    for t, e in zip(g.titles, own):
        words = {w.strip(",.!:|/()-").lower() for w in t.split()}
        if words & premium:
            assert e > hi, t
        if words & budget:
            assert e < lo, t
    has = np.array([bool({w.strip(",.!:|/()-").lower() for w in t.split()} & premium)
                    for t in g.titles])
    assert has[own > hi].mean() > 0.5 and not has[own < lo].any()
