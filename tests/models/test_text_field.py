# SPDX-License-Identifier: Apache-2.0
"""A text field in every zoo model: it enters the interactions, survives a checkpoint, and the
Scorer serves it from precomputed rows (known values) or the torch path (new values), with the
scores of the model's forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from adrec_fast.data.schema import Schema  # noqa: E402
from adrec_fast.data.text import cache_for  # noqa: E402
from adrec_fast.models import build_model  # noqa: E402
from adrec_fast.models.checkpoint import load_model, save_checkpoint  # noqa: E402
from adrec_fast.serving.scorer import Scorer  # noqa: E402

from ..data._tiny_encoder import tiny_encoder  # noqa: E402

MODELS = [("lr", {}), ("fm", {}), ("deepfm", {}), ("dcnv2", {"linear": True}), ("dcnv2", {}),
          ("dlrm", {}), ("din", {})]
TITLES = ["Red shoe, 2019!", "blue hat", "Acme: garden hose (2021)"]


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    enc = tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny", hidden=8, seed=2)
    s = Schema([{"name": "user", "type": "categorical"}, {"name": "item", "type": "categorical"},
                {"name": "hist", "type": "multi_categorical", "sequence": True,
                 "share_with": "item", "max_len": 4},
                {"name": "title", "type": "text", "encoder": str(enc)},
                {"name": "d", "type": "dense", "transform": "standardize"}])
    s.fit({"user": ["u1", "u2", "u1", "u3"], "item": ["a", "b", "c", "a"],
           "hist": [["a"], ["b", "c"], [], ["a", "b"]], "title": TITLES + [None],
           "d": [1.0, 2.0, 3.0, 4.0], "label": [1, 0, 1, 0]})
    return s


def _model(name, kw, schema):
    torch.manual_seed(0)
    m = build_model(name, schema, **kw).eval()
    with torch.no_grad():  # away from the zero first-order start, so every term counts
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name,kw", MODELS, ids=lambda x: str(x))
def test_text_enters_the_model(name, kw, schema):
    m = _model(name, kw, schema)
    if name != "lr":
        assert m.text.proj[0].out_features == m.embedding_dim
    rows = {"user": ["u1"] * 3, "item": ["a"] * 3, "hist": [["a", "b"]] * 3,
            "title": [TITLES[0], TITLES[1], None], "d": [1.0] * 3}
    out = m(schema.encode(rows)).detach()
    # only the title differs between the rows: every model's score moves with it
    assert len({round(float(x), 6) for x in out}) == 3
    # and the text gets gradients, the frozen encoder's vectors none
    m.train()
    m(schema.encode(rows)).sum().backward()
    w = m.text.proj[0].weight if m.text.proj is not None else m.text.first[0].weight
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("name,kw", MODELS, ids=lambda x: str(x))
def test_checkpoint_and_scorer(name, kw, schema, tmp_path):
    m = _model(name, kw, schema)
    save_checkpoint(tmp_path / "ck", m)
    m2, s2, _ = load_model(tmp_path / "ck")
    user = {"user": "u1", "hist": ["a", "b"], "d": 1.5}
    cands = {"item": ["a", "b", "c", "zz"], "title": [TITLES[0], TITLES[2], None, TITLES[1]]}

    def ref(c):
        n = len(c["item"])
        b = schema.encode({**{k: [v] * n for k, v in user.items()}, **c})
        return torch.sigmoid(m(b)).detach().numpy()

    b2 = s2.encode({**{k: [v] * 4 for k, v in user.items()}, **cands})
    np.testing.assert_array_equal(torch.sigmoid(m2(b2)).detach().numpy(), ref(cands))
    sc = Scorer.load(tmp_path / "ck")
    assert sc.native
    got = sc.score(user, cands)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(ref(cands)))
    # a list of dicts, and the text on the user side
    rows = [{"item": i, "title": t} for i, t in zip(cands["item"], cands["title"])]
    torch.testing.assert_close(torch.from_numpy(sc.score(user, rows)), torch.from_numpy(got))
    # a value never cached: encoded once (the torch path), then cached
    cache = cache_for(schema.field("title").encoder)
    new = f"never seen {name} {kw} title"
    assert not cache.known(new)
    c2 = {"item": ["a", "b"], "title": [new, TITLES[0]]}
    torch.testing.assert_close(torch.from_numpy(sc.score(user, c2)), torch.from_numpy(ref(c2)))
    assert cache.known(new)
    # a reload packs the values cached since: the new title is then a row of the executor
    sc.swap(tmp_path / "ck")
    assert new in sc._version.text_known["title"] and sc.native
    torch.testing.assert_close(torch.from_numpy(sc.score(user, c2)), torch.from_numpy(ref(c2)))
    # bad text in a request names the field
    with pytest.raises(TypeError, match="title"):
        sc.score(user, {"item": ["a"], "title": [""]})
    with pytest.raises(TypeError, match="title"):
        sc.score(user, {"item": ["a"], "title": [5]})
