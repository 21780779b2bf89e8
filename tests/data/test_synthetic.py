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
