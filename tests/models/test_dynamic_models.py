# SPDX-License-Identifier: Apache-2.0
"""Every zoo model on dynamic tables (``vocab: dynamic`` fields): training against the same
model on a static vocabulary (rows initialised alike), eval mode never inserts, checkpoints."""
from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

import adrec_fast  # noqa: F401
from adrec_fast.data.schema import Schema
from adrec_fast.models.checkpoint import load_model, save_checkpoint
from adrec_fast.models.registry import build_model
from adrec_fast.nn.dynamic_table import DynamicEmbedding

MODELS = ["lr", "fm", "deepfm", "dcnv2", "dlrm", "din"]
# the model settings under test: small towers, no dropout (train-mode logits are comparable)
KW = {"dcnv2": {"hidden": [8]}, "deepfm": {"hidden": [8]}, "din": {"hidden": [8]},
      "dlrm": {"bottom": [8], "top": [8]}}

VOCAB = {"user": [f"u{i}" for i in range(7)], "item": [f"i{i}" for i in range(11)],
         "site": [f"s{i}" for i in range(3)], "tags": [f"t{i}" for i in range(5)]}


def _fields(kinds: dict) -> list[dict]:
    """The schema's fields; ``kinds`` maps a table owner to "build" or "dynamic"."""
    def vocab(name):
        if kinds[name] == "dynamic":
            return {"vocab": "dynamic"}
        return {"vocab": "build", "vocabulary": VOCAB[name]}

    return [
        {"name": "user", "type": "categorical", **vocab("user")},
        {"name": "item", "type": "categorical", **vocab("item")},
        {"name": "site", "type": "categorical", **vocab("site")},
        {"name": "tags", "type": "multi_categorical", "max_len": 3, **vocab("tags")},
        {"name": "hist", "type": "multi_categorical", "sequence": True, "share_with": "item",
         "max_len": 4},
        {"name": "price", "type": "dense"},
    ]


def _schemas(mode: str) -> tuple[Schema, Schema]:
    static = Schema(_fields(dict.fromkeys(VOCAB, "build")))
    dyn = {"all": dict.fromkeys(VOCAB, "dynamic"),
           "mixed": {"user": "build", "item": "dynamic", "site": "dynamic", "tags": "build"}}[mode]
    return static, Schema(_fields(dyn))


def _rows(n: int, seed: int, unknown: bool = False) -> pa.Table:
    """Raw rows whose values are all in VOCAB (``unknown``: the items are new values)."""
    rng = np.random.default_rng(seed)

    def pick(name, k):
        return [VOCAB[name][j] for j in rng.integers(0, len(VOCAB[name]), k)]

    items = [f"new{j}" for j in rng.integers(0, 1000, n)] if unknown else pick("item", n)
    return pa.table({
        "user": pick("user", n), "item": items, "site": pick("site", n),
        "tags": ["|".join(pick("tags", int(rng.integers(0, 4)))) for _ in range(n)],
        "hist": ["|".join(pick("item", int(rng.integers(0, 5)))) for _ in range(n)],
        "price": rng.normal(size=n), "label": rng.integers(0, 2, n),
    })


def _copy_rows(static_model, dyn_model, static: Schema, dyn: Schema) -> None:
    """Dense weights from the static model; every dynamic key starts as its value's static
    row (the initializer), so both models hold the same numbers."""
    sp = dict(static_model.named_parameters())
    with torch.no_grad():
        for name, p in dyn_model.named_parameters():
            p.copy_(sp[name])
    for name in ("lookup", "linear"):
        s_lk, d_lk = getattr(static_model, name, None), getattr(dyn_model, name, None)
        if d_lk is None:
            continue
        rows = {}
        tofs = {n: t for t, (n, _) in enumerate(static.tables())}
        for owner, values in VOCAB.items():
            if not dyn.is_dynamic(owner):
                continue
            toks = pa.array(values)
            keys = dyn.lookup(owner, toks)
            ids = static.lookup(owner, toks)
            base = int(s_lk.ebc.table_offsets[tofs[owner]])
            for k, i in zip(keys.tolist(), ids.tolist()):
                rows[k] = s_lk.ebc.weight[base + i].clone()
        d_lk.dyn.initializer = lambda keys, rows=rows: torch.stack([rows[k]
                                                                     for k in keys.tolist()])
        if d_lk.ebc is not None:  # the static tables of a mixed schema: the same rows
            st = [n for n, _ in static.tables() if not dyn.is_dynamic(n)]
            w = torch.cat([s_lk.ebc.weight[int(s_lk.ebc.table_offsets[tofs[n]]):
                                            int(s_lk.ebc.table_offsets[tofs[n] + 1])]
                           for n in st])
            with torch.no_grad():
                d_lk.ebc.weight.copy_(w)


def _steps(model, batches, lr=0.05):
    opt = torch.optim.SGD(model.dense_parameters(), lr=lr)
    for c in model.embedding_collections():
        c.optimizer.lr = lr
    model.train()
    out = []
    for b in batches:
        opt.zero_grad()
        logits = model(b)
        model.loss(logits, b.labels).backward()
        opt.step()
        out.append(logits.detach())
    return out


@pytest.mark.parametrize("mode", ["all", "mixed"])
@pytest.mark.parametrize("name", MODELS)
def test_dynamic_model_equals_static_model(name, mode):
    """Every key admitted at once, rows initialised as the static rows: the same logits at
    every training step and in eval mode afterwards."""
    static, dyn = _schemas(mode)
    torch.manual_seed(0)
    ms = build_model(name, static, embedding_dim=4, embedding_l2=0.0, **KW.get(name, {}))
    md = build_model(name, dyn, embedding_dim=4, embedding_l2=0.0, **KW.get(name, {}))
    assert md.dynamic_embeddings(), "the dynamic schema builds dynamic tables"
    _copy_rows(ms, md, static, dyn)
    data = [_rows(n, seed) for seed, n in enumerate([16, 1, 9, 16])]  # batch 1 included
    out_s = _steps(ms, [static.encode(t) for t in data])
    out_d = _steps(md, [dyn.encode(t) for t in data])
    for a, b in zip(out_s, out_d):
        torch.testing.assert_close(b, a)
    test = _rows(20, 99)
    ms.eval(), md.eval()
    with torch.no_grad():
        torch.testing.assert_close(md(dyn.encode(test)), ms(static.encode(test)))


@pytest.mark.parametrize("name", MODELS)
def test_eval_mode_never_inserts(name):
    _, dyn = _schemas("all")
    torch.manual_seed(1)
    m = build_model(name, dyn, embedding_dim=4, embedding_l2=0.0, **KW.get(name, {}))
    _steps(m, [dyn.encode(_rows(32, 0))])
    tables = m.dynamic_embeddings()
    keys = [t.num_keys for t in tables]
    state = [copy.deepcopy(t.state_dict()) for t in tables]
    new = dyn.encode(_rows(32, 5, unknown=True))
    m.eval()
    with torch.no_grad():
        a = m(new)
    m.train()
    with torch.no_grad():  # no grad: read-only as well
        b = m(new)
    torch.testing.assert_close(a, b)
    assert [t.num_keys for t in tables] == keys
    for t, sd in zip(tables, state):
        for k, v in t.state_dict().items():
            assert torch.equal(v, sd[k]), f"{k} changed in a read-only forward"
    # an unknown item reads the unadmitted row: every unknown value scores alike
    one = dyn.encode(_rows(1, 5, unknown=True))
    other = _rows(1, 5, unknown=True).set_column(1, "item", pa.array(["never-seen"]))
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(one), m(dyn.encode(other)))


@pytest.mark.parametrize("name", ["deepfm", "din"])
def test_checkpoint_round_trip(name, tmp_path):
    _, dyn = _schemas("all")
    torch.manual_seed(2)
    m = build_model(name, dyn, embedding_dim=4, embedding_l2=0.0,
                    dynamic_tables={"capacity": 8, "min_count": 2, "ttl": 50},
                    **KW.get(name, {}))
    _steps(m, [dyn.encode(_rows(32, s)) for s in range(3)])  # grows past 8 keys
    save_checkpoint(tmp_path / "ck", m)
    back, schema, config = load_model(tmp_path / "ck")
    assert config["dynamic_tables"]["min_count"] == 2
    for a, b in zip(m.dynamic_embeddings(), back.dynamic_embeddings()):
        assert a.num_keys == b.num_keys and a.num_rows == b.num_rows
        for k, v in a.state_tensors().items():
            assert torch.equal(v, b.state_tensors()[k]), k
    test = schema.encode(_rows(20, 7))
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(test), m(test))
    # training on from the loaded copy continues exactly as the original
    more = [dyn.encode(_rows(16, s)) for s in (11, 12)]
    m2 = copy.deepcopy(m)
    for x, y in zip(_steps(m2, more), _steps(back, more)):
        torch.testing.assert_close(x, y)


def test_missing_value_is_key_zero_and_options_are_checked():
    _, dyn = _schemas("all")
    b = dyn.encode({"user": [None, "u1"], "item": ["", "i1"], "site": ["s0", "s1"],
                    "tags": ["", "t1"], "hist": ["", ""], "price": [0.0, 1.0]})
    assert b.indices[0].item() == 0 and b.indices[2].item() == 0  # user, item of row 0
    assert (b.indices[[1, 3]] != 0).all()
    with pytest.raises(ValueError, match="unknown options"):
        build_model("fm", dyn, embedding_l2=0.0, dynamic_tables={"capasity": 4})
    with pytest.raises(ValueError, match="embedding_l2"):
        build_model("fm", dyn, embedding_l2=0.5)
    with pytest.raises(ValueError, match="fused embedding optimizer"):
        build_model("fm", dyn, embedding_optimizer="none")
    with pytest.raises(ValueError, match="capacity"):
        build_model("fm", dyn, embedding_l2=0.0, dynamic_tables={"capacity": 0})
    static, _ = _schemas("all")
    with pytest.raises(ValueError, match="no vocab 'dynamic'"):
        build_model("fm", static, dynamic_tables={"capacity": 4})


def test_shared_table_shares_keys_and_rows():
    """A history shares its target's dynamic table: the same value, the same row."""
    _, dyn = _schemas("all")
    b = dyn.encode({"user": ["u1"], "item": ["i3"], "site": ["s0"], "tags": [""],
                    "hist": ["i3|i4"], "price": [0.0]})
    assert b.seq_indices["hist"][0] == b.indices[1]  # item is the second bag
    m = build_model("din", dyn, embedding_dim=4, embedding_l2=0.0, hidden=[])
    m.train()
    m(b).sum().backward()
    t: DynamicEmbedding = m.lookup.dyn
    assert t.num_keys == 4  # u1, i3, s0, i4 (the empty tags bag holds no key)
    rows = t.rows(torch.tensor([int(b.indices[1]), int(b.seq_indices["hist"][1])]))
    assert rows.unique().numel() == 2 and (rows > 0).all()


def test_compact_rows_keep_the_keys():
    """The encoded-data cache holds the 64-bit keys whole (int64)."""
    from adrec_fast.data.stream import EncodedRows, index_dtype

    _, dyn = _schemas("mixed")
    b = dyn.encode(_rows(8, 3))
    assert index_dtype(dyn) == torch.int64
    back = EncodedRows.from_batch(b, index_dtype(dyn)).to_batch()
    assert torch.equal(back.indices, b.indices)
    assert torch.equal(back.seq_indices["hist"], b.seq_indices["hist"])
