# SPDX-License-Identifier: Apache-2.0
"""Pretrain, then fine-tune: ``init_from`` field and value matching (renamed, new, dropped
fields; reordered vocabularies; hashed fields), the dense copy by input column, ``freeze``,
LoRA adapters (counts, identity at creation, merged save), and bad input, in Python and through
``adrec-fast train --init-from``."""
from __future__ import annotations

import json

import numpy as np

import pyarrow as pa
import pytest
import torch

from adrec_fast.cli import main
from adrec_fast.data.schema import Schema
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.models import build_model
from adrec_fast.models.checkpoint import load_model, load_state, save_checkpoint
from adrec_fast.nn.lora import LoRALinear, merge_lora
from adrec_fast.training import transfer as T
from adrec_fast.training.loop import fit

MODELS = ["lr", "fm", "deepfm", "dcnv2", "dlrm", "din"]


@pytest.fixture(scope="module")
def gen():
    return SyntheticCTR(n_rows=4000, seed=3, n_sparse=5, n_dense=3, max_len=6,
                        max_cardinality=60, n_users=40, n_items=50)


@pytest.fixture(scope="module")
def raw(gen):
    return gen.generate(1500)


def _model(name, schema, seed, **kw):
    torch.manual_seed(seed)
    kw.setdefault("embedding_dim", 8)
    if name in ("deepfm", "dcnv2", "din"):
        kw.setdefault("hidden", [16, 8])
    if name == "dlrm":
        kw.setdefault("top", [16, 8])
    return build_model(name, schema, **kw)


def _randomize_first_order(model, seed):
    """First-order tables start at zero: give them distinct rows so a copy is visible."""
    g = torch.Generator().manual_seed(seed)
    for lk in model.fused_lookups():
        with torch.no_grad():
            lk.ebc.weight.copy_(torch.randn(lk.ebc.weight.shape, generator=g))


def _rows(model, schema, lookup, field):
    """{raw value: row tensor} of ``field``'s table in ``model`` (value None: row 0)."""
    lk = dict(model.named_modules())[lookup]
    base = int(lk.ebc.table_offsets[schema.table_of(field)])
    vocab = schema.owner(field).vocabulary
    out = {None: lk.ebc.weight[base].clone()}
    for i, v in enumerate(vocab):
        out[v] = lk.ebc.weight[base + 1 + i].clone()
    return out


def _spec(name, vocab, **kw):
    return {"name": name, "type": "categorical", "vocabulary": list(vocab), **kw}


# ------------------------------------------------------------------------- field matching
@pytest.mark.parametrize("name", MODELS)
def test_reordered_fields_and_vocabulary_give_the_same_model(gen, raw, name):
    """Fields in reverse order and a reversed vocabulary: every value reads the source's row,
    every input column of the dense part lands on its field, so the scores are the same."""
    src_schema = gen.schema()
    src = _model(name, src_schema, 0)
    _randomize_first_order(src, 5)
    d = src_schema.to_dict()
    fields = d["fields"][::-1]
    for f in fields:
        if f["name"] in ("user", "c3"):
            f["vocabulary"] = f["vocabulary"][::-1]
    tgt_schema = Schema(fields, label="label")
    tgt = _model(name, tgt_schema, 1)
    report = T.init_from(tgt, src)
    assert all(v == "copied" for v in report.dense.values()), report.dense
    assert report.fields["user"]["rows"] == report.fields["user"]["of"] == 41
    p_src = src.predict(src_schema.encode(raw))
    p_tgt = tgt.predict(tgt_schema.encode(raw))
    torch.testing.assert_close(p_tgt, p_src, rtol=0, atol=1e-6)


def test_renamed_new_and_dropped_fields():
    src_schema = Schema([_spec("user", "abcd"), _spec("old", "xyz"), _spec("gone", "pq"),
                         {"name": "d0", "type": "dense"}])
    tgt_schema = Schema([_spec("user", ["d", "zz", "b", "a"]), _spec("renamed", "zyx"),
                         _spec("fresh", "mn"), {"name": "d0", "type": "dense"},
                         {"name": "d1", "type": "dense"}])
    src = _model("deepfm", src_schema, 0)
    _randomize_first_order(src, 7)
    tgt = _model("deepfm", tgt_schema, 1)
    before = {lk: {f: _rows(tgt, tgt_schema, lk, f) for f in ("user", "fresh")}
              for lk in ("lookup", "linear")}
    report = T.init_from(tgt, src, rename={"old": "renamed"})
    for lk in ("lookup", "linear"):
        s_user = _rows(src, src_schema, lk, "user")
        t_user = _rows(tgt, tgt_schema, lk, "user")
        for v in (None, "a", "b", "d"):  # matched by value, row 0 included
            assert torch.equal(t_user[v], s_user[v]), (lk, v)
        assert torch.equal(t_user["zz"], before[lk]["user"]["zz"])  # new value: fresh
        s_old, t_new = _rows(src, src_schema, lk, "old"), _rows(tgt, tgt_schema, lk, "renamed")
        for v in "xyz":
            assert torch.equal(t_new[v], s_old[v])
        t_fresh = _rows(tgt, tgt_schema, lk, "fresh")
        for v in (None, "m", "n"):  # a new field keeps its fresh rows
            assert torch.equal(t_fresh[v], before[lk]["fresh"][v])
    assert report.fields["user"] == {"source": "user", "rows": 4, "of": 5, "how": "vocabulary"}
    assert report.fields["renamed"]["source"] == "old"
    assert report.fields["renamed"]["rows"] == 4
    assert report.fields["fresh"]["source"] is None and report.fields["fresh"]["rows"] == 0
    assert report.fields["d1"]["source"] is None
    assert report.dropped == ["gone"]
    assert "renamed: from 'old'" in report.summary()
    # the first layer: columns [user*8, old*8, gone*8, d0] -> [user*8, renamed*8, fresh*8,
    # d0, d1]: the matched columns hold the source's weights, the others stay fresh
    ws, wt = src.deep[0].weight, tgt.deep[0].weight  # [16, 25], [16, 26]
    D = 8
    assert torch.equal(wt[:, :2 * D], ws[:, :2 * D])
    assert torch.equal(wt[:, 3 * D], ws[:, 3 * D])  # d0
    assert not torch.equal(wt[:, 2 * D:3 * D], ws[:, 2 * D:3 * D])
    assert report.dense["deep.0.weight"] == "copied 272 of 416 entries (matched columns)"
    assert torch.equal(tgt.deep[2].weight, src.deep[2].weight)  # hidden layer: same shape
    assert report.dense["dense_linear.weight"].startswith("copied 1 of 2")


def test_hashed_fields():
    values = [str(i) for i in range(30)]
    src_schema = Schema([{"name": "h", "type": "categorical", "vocab": "hash", "hash_size": 17,
                          "salt": "s"}, _spec("v", values)])
    tgt_schema = Schema([{"name": "h", "type": "categorical", "vocab": "hash", "hash_size": 17,
                          "salt": "s"},
                         {"name": "v", "type": "categorical", "vocab": "hash", "hash_size": 11}])
    src, tgt = _model("fm", src_schema, 0), _model("fm", tgt_schema, 1)
    report = T.init_from(tgt, src)
    assert torch.equal(tgt.lookup.ebc.weight[:17], src.lookup.ebc.weight[:17])  # same hash
    assert report.fields["h"]["rows"] == 17 and report.fields["h"]["how"] == "hash"
    # vocabulary -> hash: a value's source row lands at its hash; collisions keep the first
    # (most frequent) value's row
    ids = tgt_schema.lookup("v", pa.array(values))
    seen = set()
    for i, h in enumerate(ids):
        if h in seen:
            continue
        seen.add(h)
        assert torch.equal(tgt.lookup.ebc.weight[17 + h], src.lookup.ebc.weight[17 + 1 + i])
    assert report.fields["v"]["rows"] == len(seen) + 1
    other = Schema([{"name": "h", "type": "categorical", "vocab": "hash", "hash_size": 17,
                     "salt": "t"}, _spec("v", values)])
    tgt2 = _model("fm", other, 2)
    before = tgt2.lookup.ebc.weight[:17].clone()
    rep2 = T.init_from(tgt2, src)
    assert torch.equal(tgt2.lookup.ebc.weight[:17], before)
    assert rep2.fields["h"]["how"] == "fresh" and "hash settings differ" in rep2.fields["h"]["note"]


def test_dense_shapes_that_do_not_fit(gen):
    schema = gen.schema()
    src = _model("deepfm", schema, 0, hidden=[16, 8])
    tgt = _model("deepfm", schema, 1, hidden=[12, 8])
    before = tgt.deep[0].weight.clone()
    report = T.init_from(tgt, src)
    assert torch.equal(tgt.deep[0].weight, before)
    assert report.dense["deep.0.weight"] == "skipped: size 16 in the source, 12 in the target"
    assert report.dense["deep.2.weight"].startswith("skipped: shape (8, 16)")
    other = _model("fm", schema, 2)
    rep = T.init_from(other, src)  # another model: embeddings only
    assert all(v.startswith("skipped: the source model is deepfm") for v in rep.dense.values())
    with pytest.raises(ValueError, match="16 in the target.*embedding_dim=8"):
        T.init_from(_model("deepfm", schema, 3, embedding_dim=16), src)


def test_copy_optimizer_state(gen):
    schema = gen.schema()
    src = _model("fm", schema, 0)
    with torch.no_grad():
        src.lookup.ebc.state.uniform_(1.0, 2.0)
    tgt = _model("fm", schema, 1)
    T.init_from(tgt, src)
    assert torch.count_nonzero(tgt.lookup.ebc.state) == 0  # fresh accumulators by default
    T.init_from(tgt, src, copy_optimizer_state=True)
    assert torch.equal(tgt.lookup.ebc.state, src.lookup.ebc.state)


def test_dynamic_tables_copy_by_key(gen, raw):
    """vocabulary -> dynamic (keys of the source's values), dynamic -> dynamic (the same keys),
    dynamic -> vocabulary (the source keys of the target's values): every hop keeps the rows,
    so the scores stay the source's."""
    static_schema = gen.schema()
    d = static_schema.to_dict()  # the same fields and dense statistics, dynamic tables
    for f in d["fields"]:
        if "vocabulary" in f:
            f.update(vocab="dynamic")
            del f["vocabulary"], f["min_count"]
    dyn_schema = Schema.from_dict(d)
    assert dyn_schema.field("user").vocab == "dynamic"
    src = _model("deepfm", static_schema, 0)
    _randomize_first_order(src, 9)
    want = src.predict(static_schema.encode(raw))
    dyn = _model("deepfm", dyn_schema, 1)
    rep = T.init_from(dyn, src)
    assert rep.fields["user"]["how"] == "keys-from-vocabulary"
    assert rep.fields["user"]["rows"] == 40 and rep.fields["user"]["of"] is None
    # row 0 differs (one unadmitted row for all dynamic tables, one OOV row per static
    # table); the generator's rows never read it
    torch.testing.assert_close(dyn.predict(dyn_schema.encode(raw)), want, rtol=0, atol=1e-6)
    dyn2 = _model("deepfm", dyn_schema, 2)
    rep2 = T.init_from(dyn2, dyn)
    assert rep2.fields["item"]["how"] == "keys"
    assert dyn2.lookup.dyn.num_keys == dyn.lookup.dyn.num_keys
    torch.testing.assert_close(dyn2.predict(dyn_schema.encode(raw)), want, rtol=0, atol=1e-6)
    back = _model("deepfm", static_schema, 3)
    rep3 = T.init_from(back, dyn2)
    assert rep3.fields["user"]["how"] == "vocabulary-from-keys"
    assert rep3.fields["user"]["rows"] == 40
    torch.testing.assert_close(back.predict(static_schema.encode(raw)), want, rtol=0,
                               atol=1e-6)
    with pytest.raises(NotImplementedError, match="already holds keys"):
        T.init_from(dyn2, dyn)


TITLES = ["Red shoe, 2019!", "blue hat", "Acme: garden hose (2021)", "tent for camping"]


@pytest.mark.parametrize("name", ["deepfm", "dcnv2", "dlrm", "din"])
def test_text_field_columns_follow_the_field(tmp_path, name):
    """A text field joins the model's fields after the bags: with the fields reordered (a new
    field first), its projection and its columns in the first layer are still the source's,
    and ``freeze text`` keeps its projection as it is while the rest trains."""
    pytest.importorskip("transformers")
    from tests.data._tiny_encoder import tiny_encoder

    enc = str(tiny_encoder(tmp_path / "enc", hidden=8, seed=2))
    rows = {"user": ["u1", "u2", "u1", "u3"] * 8, "item": ["a", "b", "c", "a"] * 8,
            "hist": [["a"], ["b", "c"], [], ["a", "b"]] * 8, "title": TITLES * 8,
            "d": [1.0, 2.0, 3.0, 4.0] * 8, "label": [1, 0, 1, 0] * 8}
    fields = [{"name": "user", "type": "categorical"}, {"name": "item", "type": "categorical"},
              {"name": "hist", "type": "multi_categorical", "sequence": True,
               "share_with": "item", "max_len": 4},
              {"name": "title", "type": "text", "encoder": enc},
              {"name": "d", "type": "dense", "transform": "standardize"}]
    src_schema = Schema(fields).fit(rows)
    src = _model(name, src_schema, 0)
    trows = {**rows, "new": ["x", "y"] * 16}
    tgt_schema = Schema([{"name": "new", "type": "categorical"}] + fields[::-1]).fit(trows)
    tgt = _model(name, tgt_schema, 1)
    report = T.init_from(tgt, src)
    assert report.fields["title"] == {"source": "title", "how": "text"}
    assert not [k for k, v in report.dense.items() if v.startswith("skipped")], report.dense
    assert torch.equal(tgt.text.proj[0].weight, src.text.proj[0].weight)
    # the "new" field's embedding is the only difference: zero it in both and compare
    with torch.no_grad():
        base = int(tgt.lookup.ebc.table_offsets[tgt_schema.table_of("new")])
        n = tgt_schema.cardinality("new")
        tgt.lookup.ebc.weight[base:base + n] = 0
        first = dict(tgt.named_parameters()).get("deep.0.weight")
        if first is not None:
            first[:, :8] = 0  # the new field's columns (the first bag)
    if name in ("deepfm", "din"):
        torch.testing.assert_close(tgt.predict(tgt_schema.encode(trows)),
                                   src.predict(src_schema.encode(rows)), rtol=0, atol=1e-6)
    before = {k: v.clone() for k, v in tgt.state_dict().items()}
    frozen = {k: v for k, v in before.items() if k.startswith("text.")}
    assert frozen
    T.freeze(tgt, "text")
    data = tgt_schema.encode(trows)
    fit(tgt, data, None, epochs=2, batch_size=8, lr=1e-2, progress=False)
    after = tgt.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert not torch.equal(after["head.head.weight"], before["head.head.weight"])  # trained


# ------------------------------------------------------------------------- freeze, LoRA
def _fit(model, gen, epochs=1):
    schema = model.schema
    data = schema.encode(gen.generate(1200))
    return fit(model, data.slice(0, 1000), data.slice(1000, 1200), epochs=epochs,
               batch_size=128, lr=1e-2, progress=False)


@pytest.mark.parametrize("parts", ["embeddings", "dense"])
def test_freeze_leaves_frozen_parts_bit_identical(gen, parts):
    model = _model("deepfm", gen.schema(), 0, batch_norm=True)
    T.freeze(model, parts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fit(model, gen)
    after = model.state_dict()
    emb = {k for k in before if ".ebc." in k}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = set()
    if "embeddings" in parts:
        frozen |= emb
    if "dense" in parts:
        frozen |= set(before) - emb  # parameters and batch-norm statistics
    assert not (changed & frozen), sorted(changed & frozen)
    # what is not frozen trains
    assert ("lookup.ebc.weight" in changed) == ("embeddings" not in parts)
    assert ("deep.0.weight" in changed) == ("dense" not in parts)
    assert ("deep.1.running_mean" in changed) == ("dense" not in parts)


def test_freeze_text_and_unknown_part(gen):
    model = _model("fm", gen.schema(), 0)
    with pytest.raises(ValueError, match="nothing would train"):
        T.freeze(_model("fm", gen.schema(), 0), "embeddings,dense")
    with pytest.raises(ValueError, match="no text field"):
        T.freeze(model, "text")
    with pytest.raises(ValueError, match="unknown part 'embedings'"):
        T.freeze(model, "dense,embedings")
    with pytest.raises(ValueError, match="at least one part"):
        T.parse_parts(" , ")


@pytest.mark.parametrize("rank", [1, 3])
def test_lora_parameter_counts(gen, rank):
    schema = gen.schema()
    model = _model("deepfm", schema, 0, hidden=[16, 8])
    dense_before = sum(p.numel() for p in model.dense_parameters())
    layers = T.add_adapters(model, rank)
    assert layers == ["deep.0", "deep.2"]
    K = 5 * 8 + 3  # 5 bags of width 8, 3 dense features
    adapters = rank * (K + 16) + rank * (16 + 8)
    c = T.trainable_counts(model)
    assert c["adapter"] == adapters
    assert c["dense"] == dense_before
    assert c["dense_trainable"] == adapters + 1  # + the head's bias
    assert sum(p.numel() for p in model.dense_parameters()) == adapters + 1
    assert c["embedding_trainable"] == c["embedding"] > 0
    m2 = _model("deepfm", schema, 0, hidden=[16, 8])
    T.add_adapters(m2, rank, train_head_bias=False)
    assert T.trainable_counts(m2)["dense_trainable"] == adapters
    # with every bias and norm vector: the towers' biases (16 + 8) and the head's bias, not
    # the head's weight (a vector too); with batch norm its shift and scale instead of biases
    m3 = _model("deepfm", schema, 0, hidden=[16, 8])
    T.add_adapters(m3, rank, train_biases=True)
    assert T.trainable_counts(m3)["dense_trainable"] == adapters + 16 + 8 + 1
    assert not m3.head.head.weight.requires_grad
    m4 = _model("deepfm", schema, 0, hidden=[16, 8], batch_norm=True)
    T.add_adapters(m4, rank, train_biases=True)
    trained = sorted(n for n, p in m4.named_parameters()
                     if p.requires_grad and p.dim() < 2)  # adapters and tables are matrices
    assert trained == ["deep.1.bias", "deep.1.weight", "deep.4.bias", "deep.4.weight",
                       "head.head.bias"]
    assert T.trainable_counts(m4)["dense_trainable"] == adapters + 2 * (16 + 8) + 1


@pytest.mark.parametrize("name", ["deepfm", "dcnv2", "dlrm", "din"])
def test_lora_identity_at_creation_and_merged_save(gen, raw, name, tmp_path):
    schema = gen.schema()
    model = _model(name, schema, 0)
    batch = schema.encode(raw)
    p0 = model.predict(batch)
    dense0 = {n: p.clone() for n, p in model.named_parameters()}
    T.add_adapters(model, 2)
    assert torch.equal(model.predict(batch), p0)  # B = 0: exactly the base model
    _fit(model, gen)
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert lora and all(torch.count_nonzero(m.lora_B) > 0 for m in lora)  # adapters trained
    for n, p in model.named_parameters():  # base weights untouched
        if "lora_" not in n and n in dense0 and n not in ("head.head.bias", "head.bias"):
            assert torch.equal(p, dense0[n]), n
    p_adapted = model.predict(batch)
    save_checkpoint(tmp_path / "ck", model)
    plain, _, _ = load_model(tmp_path / "ck")
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain.predict(batch), p_adapted, rtol=0, atol=1e-6)
    assert merge_lora(model) == len(lora)
    torch.testing.assert_close(model.predict(batch), p_adapted, rtol=0, atol=1e-6)


def test_lora_gradient_reaches_adapters_float64():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3).double()
    lora = LoRALinear.from_linear(lin, 2).double()
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.autograd.gradcheck(lambda a, b: torch.nn.functional.linear(
        x, lora.weight + lora.scaling * b @ a, lora.bias), (lora.lora_A, lora.lora_B))
    from adrec_fast.models.base import run_mlp

    seq = torch.nn.Sequential(lora, torch.nn.ReLU())
    run_mlp(seq, x.float().double()).sum().backward()
    assert lora.lora_A.grad is not None and lora.lora_B.grad is not None
    assert lora.weight.grad is None


@pytest.mark.parametrize("spec", ["lora:0", "lora:-2", "lora:1.5", "lora:x", "lora:", "lorax:4",
                                  "4"])
def test_bad_adapter_spec(spec):
    with pytest.raises(ValueError, match="adapter"):
        T.parse_adapter(spec)


def test_bad_rank_and_no_tower(gen):
    with pytest.raises(ValueError, match="integer >= 1"):
        LoRALinear(4, 3, 0)
    with pytest.raises(ValueError, match="integer >= 1"):
        T.add_adapters(_model("deepfm", gen.schema(), 0), 2.0)
    with pytest.raises(ValueError, match="no MLP tower"):
        T.add_adapters(_model("fm", gen.schema(), 0), 2)


def test_bad_source(tmp_path, gen):
    model = _model("fm", gen.schema(), 0)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        T.init_from(model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a trained model"):
        T.init_from(model, tmp_path / "empty")
    with pytest.raises(ValueError, match="source has no field 'nope'"):
        T.init_from(model, _model("fm", gen.schema(), 1), rename={"nope": "user"})
    with pytest.raises(ValueError, match="target has no field 'nope'"):
        T.init_from(model, _model("fm", gen.schema(), 1), rename={"user": "nope"})


# ------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def runs(tmp_path_factory, gen):
    d = tmp_path_factory.mktemp("transfer")
    gen.write_csv(d / "src.csv", n=2000)
    lines = (d / "src.csv").read_text().splitlines()
    header = [h.strip('"') for h in lines[0].split(",")]
    # the target: column c2 renamed to ad, c4 dropped
    keep = [i for i, h in enumerate(header) if h != "c4"]
    rows = [["ad" if h == "c2" else h for h in header]] + [
        line.split(",") for line in lines[1:1001]]
    (d / "tgt.csv").write_text("\n".join(",".join(r[i] for i in keep) for r in rows) + "\n")
    rc = main(["train", str(d / "src.csv"), "--model", "deepfm", "--out", str(d / "src"),
               "--epochs", "1", "--batch-size", "256", "--embedding-dim", "8", "--no-progress"])
    assert rc == 0
    return d


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_fine_tune_with_lora(runs, capsys):
    d = runs
    rc = main(["train", str(d / "tgt.csv"), "--model", "deepfm", "--out", str(d / "ft"),
               "--init-from", str(d / "src"), "--rename-field", "c2=ad", "--adapter", "lora:4",
               "--epochs", "1", "--batch-size", "256", "--no-progress", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    res = _last_json(out)
    tr = res["transfer"]
    assert tr["fields"]["ad"]["source"] == "c2" and tr["fields"]["ad"]["rows"] > 1
    assert tr["dropped"] == ["c4"]
    c = tr["trainable"]
    assert 0 < c["adapter"] < c["dense_trainable"] <= 0.05 * c["dense"]
    assert "ad: from 'c2'" in out and "LoRA adapters" in out
    model, schema, config = load_model(d / "ft")
    assert config["embedding_dim"] == 8  # taken from the source
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert main(["eval", str(d / "ft"), str(d / "tgt.csv")]) == 0


def test_cli_online_fine_tune_with_frozen_embeddings(runs, capsys):
    d = runs
    rc = main(["train", str(d / "src.csv"), "--model", "deepfm", "--out", str(d / "on"),
               "--online", "--init-from", str(d / "src"), "--freeze", "embeddings",
               "--batch-size", "256", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    res = _last_json(out)
    assert res["transfer"]["freeze"] == ["embeddings"]
    assert res["transfer"]["trainable"]["embedding_trainable"] == 0
    assert res["transfer"]["fields"]["user"]["rows"] == 40  # every source user, by key
    src, src_schema, _ = load_model(d / "src")
    on, on_schema, _ = load_model(d / "on")
    assert on_schema.field("user").vocab == "dynamic"  # --online's default tables
    for field in ("user", "item", "c2"):
        values = src_schema.field(field).vocabulary
        base = int(src.lookup.ebc.table_offsets[src_schema.table_of(field)])
        rows = on.lookup.dyn.rows(torch.from_numpy(on_schema.lookup(field, pa.array(values))))
        assert bool((rows > 0).all())  # frozen: the copied rows are read, never updated
        torch.testing.assert_close(on.lookup.dyn.weight[rows],
                                   src.lookup.ebc.weight[base + 1: base + 1 + len(values)],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("args,msg", [
    (["--init-from", "NOTARUN"], "not a trained model"),
    (["--init-from", "SRC", "--freeze", "embeddings,bias"], "--freeze: freeze: unknown part"),
    (["--init-from", "SRC", "--adapter", "lora:0"], "--adapter: adapter 'lora:0'"),
    (["--init-from", "SRC", "--adapter", "lora:2.5"], "rank must be an integer"),
    (["--init-from", "SRC", "--rename-field", "c2"], "expected SRC=DST"),
    (["--freeze", "dense"], "add --init-from"),
    (["--init-from", "SRC", "--freeze", "text"], "no text field"),
    (["--init-from", "SRC", "--rename-field", "zz=ad"], "source has no field 'zz'"),
])
def test_cli_bad_input(runs, capsys, args, msg):
    d = runs
    args = [str(d / "src") if x == "SRC" else str(d / "nothing") if x == "NOTARUN" else x
            for x in args]
    rc = main(["train", str(d / "tgt.csv"), "--model", "deepfm", "--out", str(d / "bad"),
               "--epochs", "1", "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert not (d / "bad").exists()


def test_cli_init_from_refused_in_a_distributed_run(runs, capsys, monkeypatch):
    d = runs
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29999")):
        monkeypatch.setenv(k, v)
    rc = main(["train", str(d / "tgt.csv"), "--out", str(d / "dist"), "--init-from",
               str(d / "src"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--init-from" in err and "one process" in err, err
    assert not (d / "dist").exists()


def test_cli_lora_with_deltas(runs, capsys):
    """An adapted online run exports its dense weights with the adapters folded in, as its
    checkpoint holds them: a Scorer following the deltas ends at the saved model's scores."""
    import time

    import pyarrow.csv as pcsv

    from adrec_fast.serving import Scorer

    d = runs
    out, export = d / "lora_online", d / "lora_deltas"
    rc = main(["train", str(d / "tgt.csv"), "--out", str(out), "--online", "--model", "deepfm",
               "--init-from", str(d / "src"), "--rename-field", "c2=ad", "--adapter", "lora:2",
               "--batch-size", "128", "--export-every", "300", "--export-dir", str(export),
               "--no-progress", "--json"])
    assert rc == 0, capsys.readouterr().err
    n = _last_json(capsys.readouterr().out)["export"]["deltas"]
    with pytest.warns(UserWarning):  # dynamic tables: the Scorer serves by the forward
        sc, want = Scorer.load(export / "base"), Scorer.load(out / "best")
    with sc.follow(export, poll_s=0.005) as f:
        t0 = time.monotonic()
        while f.applied < n and time.monotonic() - t0 < 20:
            time.sleep(0.005)
    assert f.applied == n and f.errors == []
    table = pcsv.read_csv(d / "tgt.csv")
    cols = [c for c in table.column_names if c != "label"]
    rows = table.select(cols).slice(0, 16).to_pylist()
    user = {cols[0]: rows[0][cols[0]]}
    cands = [{k: v for k, v in r.items() if k != cols[0]} for r in rows]
    got, ref = sc.score(user, cands), want.score(user, cands)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_lora_run_resumes_exactly_and_saves_plain(gen, tmp_path, interrupt_after):
    """An adapter run interrupted after epoch 1 and resumed from last/ ends bit-identical to the
    uninterrupted run (adapters, frozen bases, optimizer state); every saved directory still
    loads as the plain merged model."""
    schema = gen.schema()
    data = schema.encode(gen.generate(1400))
    train, valid = data.slice(0, 1200), data.slice(1200, 1400)
    kw = {"epochs": 3, "batch_size": 200, "lr": 5e-3, "seed": 3, "patience": 5,
          "progress": False}

    def adapted(seed):
        m = _model("deepfm", schema, seed, batch_norm=True)
        T.add_adapters(m, 2)
        return m

    full = adapted(0)
    r_full = fit(full, train, valid, checkpoint_dir=tmp_path / "full", **kw)
    with pytest.raises(interrupt_after.error):
        fit(adapted(0), train, valid, checkpoint_dir=tmp_path / "part",
            callbacks=[interrupt_after(1)], **kw)
    resumed = adapted(7)  # another draw of base and adapters: resume overwrites them
    r_res = fit(resumed, train, valid, checkpoint_dir=tmp_path / "part", resume=True, **kw)
    assert [h["train_loss"] for h in r_res.history] == [h["train_loss"] for h in r_full.history]
    sd_full, sd_res = full.state_dict(), resumed.state_dict()
    assert any("lora_A" in k for k in sd_full)
    for k in sd_full:
        assert torch.equal(sd_full[k], sd_res[k]), k
    plain, _, _ = load_model(tmp_path / "part" / "last")
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain.predict(valid), resumed.predict(valid), rtol=0, atol=1e-6)
    # a plain checkpoint cannot pose as an adapter run: the error names the layer
    save_checkpoint(tmp_path / "plain", plain)
    m = adapted(0)
    with pytest.raises(ValueError, match="no unmerged adapters"):
        load_state(m, tmp_path / "plain")
