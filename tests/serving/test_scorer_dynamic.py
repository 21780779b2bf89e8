# SPDX-License-Identifier: Apache-2.0
"""The Scorer on a model with dynamic tables: keys hashed as in training, scores equal to the
model's forward, an unknown value scored as a new key, nothing inserted by serving."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast.models.checkpoint import save_checkpoint
from adrec_fast.models.registry import build_model
from adrec_fast.serving.scorer import Scorer
from tests.models.test_dynamic_models import KW, _rows, _schemas, _steps


@pytest.fixture(scope="module", params=["deepfm", "din", "lr"])
def served(request, tmp_path_factory):
    name = request.param
    _, dyn = _schemas("all")
    torch.manual_seed(4)
    m = build_model(name, dyn, embedding_dim=4, embedding_l2=0.0, **KW.get(name, {}))
    _steps(m, [dyn.encode(_rows(64, s)) for s in range(4)])
    path = tmp_path_factory.mktemp(name) / "ck"
    save_checkpoint(path, m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = Scorer.load(path)
    assert any("dynamic tables" in str(w.message) for w in caught)
    m.eval()
    return m, dyn, scorer


USER = {"user": "u3", "site": "s1", "hist": "i2|i5|i7", "price": 0.25}
CANDS = {"item": ["i1", "i4", "brand-new", "i9", "also-new"],
         "tags": ["t1|t2", "", "t0", "t4|t3|t1", "t2"]}


def _expected(model, schema, user, cands) -> np.ndarray:
    n = len(next(iter(cands.values())))
    cols = {**cands, **{k: [v] * n for k, v in user.items()}}
    with torch.no_grad():
        return torch.sigmoid(model(schema.encode(cols))).numpy()


def test_scores_equal_the_model_forward(served):
    model, schema, scorer = served
    assert not scorer.native
    got = scorer.score(USER, CANDS)
    np.testing.assert_allclose(got, _expected(model, schema, USER, CANDS), rtol=0, atol=1e-5)


def test_an_unknown_value_scores_as_a_new_key(served):
    import pyarrow as pa

    model, schema, scorer = served
    keys = [t.num_keys for t in model.dynamic_embeddings()]
    # two values never seen in training score alike: both read the unadmitted row
    got = scorer.score(USER, {"item": ["brand-new", "also-new", "i1"], "tags": ["t0"] * 3})
    assert got[0] == got[1]
    assert got[2] != got[0]  # a known value reads its own row
    for t in model.dynamic_embeddings():
        unknown = schema.lookup("item", pa.array(["brand-new", "also-new"]))
        assert t.rows(torch.from_numpy(unknown)).tolist() == [0, 0]
    assert [t.num_keys for t in model.dynamic_embeddings()] == keys  # serving inserted none


def test_score_ids_takes_the_keys(served):
    import pyarrow as pa

    model, schema, scorer = served
    key = {f: int(schema.lookup(f, pa.array([USER.get(f, "t1")]))[0])
           for f in ("user", "site", "tags")}
    items = schema.lookup("item", pa.array(CANDS["item"]))
    hist = schema.lookup("hist", pa.array(USER["hist"].split("|")))
    dense = schema.dense_values("price", [USER["price"]])
    got = scorer.score_ids(key, {"item": items}, dense=dense, seqs=[hist])
    want = _expected(model, schema, USER, {"item": CANDS["item"], "tags": ["t1"] * 5})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
