# SPDX-License-Identifier: Apache-2.0
"""Schema: declaration checks, fitting, encoding, the Batch layout, hashing, persistence."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from adrec_fast.data import (Batch, DataError, Schema, fit_schema, infer_schema, load_all,
                              stable_hash)
from adrec_fast.data import columns as C

FIELDS = [
    {"name": "user", "type": "categorical", "min_count": 2},
    {"name": "item", "type": "categorical"},
    {"name": "site", "type": "categorical", "vocab": "hash", "hash_size": 11, "salt": "s"},
    {"name": "tags", "type": "multi_categorical", "max_len": 2},
    {
        "name": "hist",
        "type": "multi_categorical",
        "sequence": True,
        "share_with": "item",
        "max_len": 2,
    },
    {"name": "price", "type": "dense", "transform": "log1p_standardize", "fill": 0.0},
    {"name": "age", "type": "dense", "transform": "none", "fill": -1.0},
    {"name": "emb", "type": "vector", "dim": 2},
]

TRAIN = {
    "label": [1, 0, 0, 1],
    "user": ["u1", "u1", "u2", "u1"],
    "item": ["i1", "i2", "i1", "i3"],
    "site": ["a", "b", "c", "a"],
    "tags": ["t1|t2|t3", "", "t2", "t1"],
    "hist": ["i4|i1|i2", "i4", "", "i2"],
    "price": [0.0, 1.0, np.e - 1.0, None],
    "age": [20.0, 30.0, None, 40.0],
    "emb": ["1 2", "3|4", "", "5 6"],
}


@pytest.fixture
def schema():
    return Schema(FIELDS).fit(TRAIN)


def test_vocabulary_min_count_order_and_sharing(schema):
    # user: u1 x3, u2 x1 -> only u1 with min_count 2
    assert schema.field("user").vocabulary == ["u1"]
    # item counts include the shared history: i1 x3, i2 x3, i4 x2, i3 x1 (ties by value)
    assert schema.field("item").vocabulary == ["i1", "i2", "i4", "i3"]
    assert schema.tables() == [("user", 2), ("item", 5), ("site", 11), ("tags", 4)]
    assert schema.sparse_fields() == [("user", 0), ("item", 1), ("site", 2), ("tags", 3)]
    assert schema.sequence_fields() == [("hist", 1)]
    assert schema.table_of("hist") == 1
    assert schema.table_offsets().tolist() == [0, 2, 7, 18, 22]
    assert schema.bag_tables().tolist() == [0, 1, 2, 3]
    assert schema.n_dense == 2 and schema.vector_dim == 2
    # price after fill and log1p: [0, log 2, 1, 0]
    z = np.array([0.0, np.log(2.0), 1.0, 0.0])
    assert schema.field("price").mean == pytest.approx(z.mean())
    assert schema.field("price").std == pytest.approx(z.std())


def test_batch_layout_matches_tbe_definition(schema):
    b = schema.encode(TRAIN)
    B = 4
    assert b.batch_size == B and b.num_bags == 4
    h = stable_hash(["a", "b", "c", "a"], "s", 11).tolist()
    # hand-computed: user [u1,u1,u2(OOV),u1]; item ids i1=1,i2=2,i4=3,i3=4;
    # tags t1=1,t2=2,t3=3 (t1,t2 twice each... counts t1 2, t2 2, t3 1), first max_len=2 kept
    expected_bags = [
        [1],
        [1],
        [0],
        [1],  # user
        [1],
        [2],
        [1],
        [4],  # item
        [h[0]],
        [h[1]],
        [h[2]],
        [h[3]],  # site (hashed)
        [1, 2],
        [],
        [2],
        [1],  # tags: "t1|t2|t3" truncated to the first 2
    ]
    assert b.offsets.tolist() == list(np.cumsum([0] + [len(x) for x in expected_bags]))
    for t in range(4):
        for r in range(B):
            bag = b.indices[b.offsets[t * B + r] : b.offsets[t * B + r + 1]].tolist()
            assert bag == expected_bags[t * B + r], (t, r)
    # history keeps the LAST max_len items, within the item table
    assert b.seq_indices["hist"].tolist() == [1, 2, 3, 2]
    assert b.seq_offsets["hist"].tolist() == [0, 2, 3, 3, 4]
    assert b.indices.dtype == torch.long and b.offsets.dtype == torch.long
    f = schema.field("price")
    z = (np.array([0.0, np.log(2.0), 1.0, 0.0]) - f.mean) / f.std
    torch.testing.assert_close(b.dense[:, 0], torch.tensor(z, dtype=torch.float32))
    assert b.dense[:, 1].tolist() == [20.0, 30.0, -1.0, 40.0]
    assert b.vectors.tolist() == [[1, 2], [3, 4], [0, 0], [5, 6]]
    assert b.labels.tolist() == [1, 0, 0, 1]
    # ids stay inside their tables
    card = torch.tensor([c for _, c in schema.tables()])
    per_bag = torch.repeat_interleave(
        card[schema.bag_tables()].repeat_interleave(B), b.bag_lengths().reshape(-1)
    )
    assert (b.indices < per_bag).all() and (b.indices >= 0).all()


def test_serving_rows_match_training_encoding(schema):
    train = schema.encode(TRAIN)
    rows = [{k: v[i] for k, v in TRAIN.items()} for i in range(4)]
    served = schema.encode_rows(rows)
    for name in ("indices", "offsets", "dense", "vectors", "labels"):
        assert torch.equal(getattr(served, name), getattr(train, name)), name
    assert torch.equal(served.seq_indices["hist"], train.seq_indices["hist"])


def test_unseen_and_missing_values_at_serving(schema):
    b = schema.encode_rows(
        [
            {
                "user": "nobody",
                "item": "i999",
                "site": "zzz",
                "tags": ["t1", "zzz"],
                "hist": ["i3", "new"],
            },
            {},
        ]
    )
    B = 2
    bags = [b.indices[b.offsets[i] : b.offsets[i + 1]].tolist() for i in range(4 * B)]
    assert bags[0] == [0] and bags[2] == [0]  # user, item: OOV -> 0
    assert bags[1] == [0] and bags[3] == [0]  # missing -> 0
    assert bags[4] != [0] and bags[5] == [0]  # site: hashed value vs missing
    assert bags[6] == [1, 0] and bags[7] == []  # unseen tag stays as OOV, missing list is empty
    assert b.seq_indices["hist"].tolist() == [4, 0]
    assert b.dense[1].tolist() == [
        pytest.approx((0 - schema.field("price").mean) / schema.field("price").std),
        -1.0,
    ]
    assert torch.isnan(b.labels).all()
    assert b.vectors.tolist() == [[0, 0], [0, 0]]


def test_serving_numbers_and_text_are_the_same_token():
    s = Schema([{"name": "c", "type": "categorical"}]).fit({"c": ["5042", "7", "7"]})
    a = s.encode_columns({"c": [5042, 7, 3]}).indices
    b = s.encode_columns({"c": ["5042", "7", "3"]}).indices
    c = s.encode_columns({"c": np.array([5042.0, 7.0, 3.0])}).indices
    assert a.tolist() == b.tolist() == c.tolist() == [2, 1, 0]


def test_bad_values_at_encode_time(schema):
    with pytest.raises(DataError, match=r"field 'age': non-numeric value in dense field \(row 2"):
        schema.encode_rows([{"age": 1}, {"age": "old"}])
    with pytest.raises(DataError, match=r"field 'emb': row 1: expected 2 numeric values"):
        schema.encode_rows([{"emb": "1 2 3"}])
    with pytest.raises(DataError, match=r"field 'label': row 1: label must be 0 or 1"):
        schema.encode_rows([{"label": 3}])
    with pytest.raises(DataError, match="no column 'site'"):
        schema.encode({k: v for k, v in TRAIN.items() if k != "site"})


def test_hashing_is_stable_and_salted():
    toks = ["05db9164", "68fd1e64", "", None, "é", "a" * 100]
    ids = stable_hash(toks, "C1", 1000)
    # frozen values: a change here breaks every saved hashed model
    assert ids.tolist() == stable_hash(np.array(toks, dtype=object), "C1", 1000).tolist()
    assert (
        ids[2] == 0
        and ids[3] == 0
        and ((ids[[0, 1, 4, 5]] >= 1) & (ids[[0, 1, 4, 5]] < 1000)).all()
    )
    assert ids.tolist() == FROZEN_HASH
    assert stable_hash(toks, "C2", 1000).tolist() != ids.tolist()
    many = stable_hash([str(i) for i in range(20000)], "", 101)
    counts = np.bincount(many, minlength=101)[1:]
    assert counts.min() > 120 and counts.max() < 290  # about 200 per bucket


FROZEN_HASH = [103, 52, 0, 0, 660, 665]  # FNV-1a 64 + fmix64, salt "C1", size 1000


def test_hash_schema_needs_no_fit():
    s = Schema([{"name": "c", "type": "categorical", "vocab": "hash", "hash_size": 64}])
    assert s.fitted and s.tables() == [("c", 64)]
    assert (
        s.encode_columns({"c": ["x", "y"]}).indices.tolist()
        == stable_hash(["x", "y"], "", 64).tolist()
    )


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_round_trip_gives_identical_tensors(schema, tmp_path, suffix):
    path = tmp_path / f"schema{suffix}"
    schema.save(path)
    back = Schema.load(path)
    assert back == schema
    a, b = schema.encode(TRAIN), back.encode(TRAIN)
    for name in ("indices", "offsets", "dense", "vectors", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    if suffix == ".json":
        assert json.loads(path.read_text())["fields"][0]["vocabulary"] == ["u1"]
    assert Schema.from_json(schema.to_json()) == schema


def test_declaration_errors():
    with pytest.raises(ValueError, match="unknown type"):
        Schema([{"name": "a", "type": "cat"}])
    with pytest.raises(ValueError, match="hash_size"):
        Schema([{"name": "a", "type": "categorical", "vocab": "hash"}])
    with pytest.raises(ValueError, match="share_with"):
        Schema([{"name": "a", "type": "multi_categorical", "share_with": "b"}])
    with pytest.raises(ValueError, match="sequence"):
        Schema([{"name": "a", "type": "categorical", "sequence": True}])
    with pytest.raises(ValueError, match="duplicate"):
        Schema([{"name": "a", "type": "dense"}, {"name": "a", "type": "dense"}])
    with pytest.raises(ValueError, match="label"):
        Schema([{"name": "label", "type": "dense"}])
    with pytest.raises(ValueError, match="unknown keys"):
        Schema([{"name": "a", "type": "dense", "bins": 3}])
    with pytest.raises(RuntimeError, match="fit"):
        Schema([{"name": "a", "type": "categorical"}]).encode({"a": ["x"]})


def test_infer_from_csv_types_overrides_and_drop(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("label,id,name,score,n,extra\r\n1,3,a,0.5,7,z\r\n0,4,b,1.5,800,z\r\n")
    s = infer_schema(p)
    assert [(f.name, f.type) for f in s.fields] == [
        ("id", "categorical"),
        ("name", "categorical"),
        ("score", "dense"),
        ("n", "categorical"),
        ("extra", "categorical"),
    ]
    s = infer_schema(
        p, overrides={"n": "dense", "score": {"transform": "none"}}, drop=["extra"]
    )
    assert [(f.name, f.type) for f in s.fields][2:] == [("score", "dense"), ("n", "dense")]
    assert s.field("score").transform == "none"
    with pytest.raises(ValueError, match="absent"):
        infer_schema(p, drop=["nope"])


def test_infer_reads_joined_lists_as_multi_categorical(tmp_path):
    """A text column of '|'-joined lists (a genre list) is multi_categorical, as long as its
    longest sampled list; its values are then pooled as a bag. Text with spaces around a '|',
    and a column where the separator is rarer than JOINED_LIST_SHARE, stay categorical."""
    from adrec_fast.data.schema import JOINED_LIST_SHARE

    rare = max(1, int(JOINED_LIST_SHARE * 300))  # rows with a '|' in column 'r': just too few
    lines = ["label,genre,title,r"]
    for i in range(300):
        genre = ["Action|Comedy", "Drama", "", "Comedy|Drama|Horror"][i % 4]
        title = "Heat | 1995" if i == 7 else f"film {i}"
        r = "a|b" if i < rare - 1 else f"v{i % 5}"
        lines.append(f"{i % 2},{genre},{title},{r}")
    p = tmp_path / "movies.csv"
    p.write_text("\n".join(lines) + "\n")
    s = infer_schema(p)
    assert [(f.name, f.type, f.max_len) for f in s.fields] == [
        ("genre", "multi_categorical", 3), ("title", "categorical", 0), ("r", "categorical", 0)]
    fit_schema(s, p)
    assert sorted(s.field("genre").vocabulary) == ["Action", "Comedy", "Drama", "Horror"]
    b = load_all(p, s)
    vocab = s.field("genre").vocabulary
    ids = [vocab.index(t) + 1 for t in ("Action", "Comedy", "Drama", "Comedy", "Drama", "Horror")]
    bag = next(k for k, (name, _) in enumerate(s.sparse_fields()) if name == "genre")
    # the first 4 rows' bags hold 2 values, 1, none and 3, in the file's order
    assert b.bag_lengths()[bag, :4].tolist() == [2, 1, 0, 3]
    start = int(b.offsets[bag * b.batch_size])
    assert b.indices[start:start + 6].tolist() == ids


def test_joined_list_length_leaves_out_empty_pieces():
    """Stray separators (``|z|``, ``a||b``) hold no values: the inferred max_len counts the
    values only, and a column of separators alone is no list."""
    from adrec_fast.data.schema import _joined_lists

    pad = ["x"] * 10
    assert _joined_lists(pa.array(["|z|", "a|b"] + pad)) == 2
    assert _joined_lists(pa.array(["a||b|c|", "a|b", None, ""] + pad)) == 3
    assert _joined_lists(pa.array(["||", "|"] + pad)) == 0


def _column_file(tmp_path, values, extra_line=None):
    """A CSV of label, an integer id and ``values`` as column x; ``extra_line`` is inserted as
    line 5 (after the header and three rows)."""
    lines = ["label,id,x"] + [f"{i % 2},{i},{v}" for i, v in enumerate(values)]
    if extra_line is not None:
        lines.insert(4, extra_line)
    p = tmp_path / "x.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_infer_leaves_out_rows_with_a_wrong_column_count(tmp_path):
    p = _column_file(tmp_path, [f"{i}.5" for i in range(200)], extra_line="1,7")
    s = infer_schema(p)  # the reader reports (or skips) the short row later
    assert [(f.name, f.type) for f in s.fields] == [("id", "categorical"), ("x", "dense")]


def test_infer_warns_of_a_stray_value_in_a_decimal_column(tmp_path):
    values = [f"{i}.25" for i in range(300)]
    values[150] = "abc"  # line 152
    p = _column_file(tmp_path, values)
    with pytest.warns(UserWarning) as caught:
        s = infer_schema(p)
    assert [str(w.message) for w in caught] == [
        f"{p}: column 'x' holds decimal numbers but line 152 has 'abc' (1 such value in the "
        "first 300 rows); inferred as dense, so rows with a non-numeric 'x' are bad rows (skip "
        "them with --skip-bad-rows / skip_bad_rows=True, or declare the column's type in a "
        "schema)"
    ]
    assert s.field("x").type == "dense" and s.field("x").transform == "log1p_standardize"
    # the reader then names the line, or skips it
    with pytest.raises(DataError, match=r"x\.csv, line 152, field 'x': non-numeric value 'abc'"):
        fit_schema(s, p)
    # an override or a drop of the column silences the warning
    assert infer_schema(p, overrides={"x": "categorical"}).field("x").type == "categorical"


@pytest.mark.parametrize("values", [
    [str(i) for i in range(300)],                      # integers: categorical either way
    [f"{i}.5" for i in range(290)] + ["a", "b", "c", "d"] * 3,   # 4% text: a text column
])
def test_infer_keeps_other_text_columns_categorical_without_a_warning(tmp_path, values):
    values = list(values)
    values[10] = "abc"
    p = _column_file(tmp_path, values)
    s = infer_schema(p)  # filterwarnings = error: any warning fails here
    assert s.field("x").type == "categorical"


def test_batch_slice_take_concat(schema):
    b = schema.encode(TRAIN)
    parts = [b.slice(0, 1), b.slice(1, 3), b.slice(3, 4)]
    again = Batch.concat(parts)
    for name in ("indices", "offsets", "dense", "vectors", "labels"):
        assert torch.equal(getattr(again, name), getattr(b, name)), name
    assert torch.equal(again.seq_indices["hist"], b.seq_indices["hist"])
    assert torch.equal(again.seq_offsets["hist"], b.seq_offsets["hist"])
    sub = b.take(torch.tensor([3, 0]))
    direct = schema.encode({k: [v[3], v[0]] for k, v in TRAIN.items()})
    assert torch.equal(sub.indices, direct.indices) and torch.equal(sub.offsets, direct.offsets)
    assert torch.equal(sub.seq_indices["hist"], direct.seq_indices["hist"])
    empty = b.slice(2, 2)
    assert empty.batch_size == 0 and empty.offsets.tolist() == [0] and empty.dense.shape == (0, 2)


def test_fit_streams_chunks_and_accepts_arrow(schema):
    t = pa.table({k: v for k, v in TRAIN.items()})
    halves = [t.slice(0, 2), t.slice(2)]
    s2 = Schema(FIELDS).fit(halves)
    assert s2 == schema
    assert Schema(FIELDS).fit(t, max_rows=2).field("item").vocabulary == ["i1", "i2", "i4"]


def test_public_lookup_and_dense_values_match_encode(schema):
    """The steps the Scorer takes one field at a time give what ``encode`` gives."""
    rows = {"user": ["u1", "u9", None], "item": ["i3", "i1", "zz"], "site": ["a", "b", ""],
            "tags": ["t2", "t9", "t1"], "hist": ["i4", "", "i2|i1"],
            "price": [3.0, None, -2.0], "age": [None, 50.0, 0.0], "emb": ["", "", ""]}
    b = schema.encode(rows)
    assert b.offsets.tolist() == list(range(13))  # one id per bag in this input
    ids = b.indices.view(4, 3)  # [T, B]
    for t, name in enumerate(["user", "item", "site", "tags"]):
        got = schema.lookup(name, C.tokens(rows[name])[0])
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ids[t].numpy())
    assert ids[0].tolist() == [1, 0, 0] and ids[1].tolist() == [4, 1, 0]
    # the history field reads the item table: i4 is id 3 there, i2 id 2
    assert schema.lookup("hist", pa.array(["i4", "i2", "nope"])).tolist() == [3, 2, 0]
    for k, name in enumerate(["price", "age"]):
        got = schema.dense_values(name, rows[name])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, b.dense[:, k].numpy())
    # price: fill 0 -> log1p -> standardised with the fitted mean/std
    f = schema.field("price")
    x = np.sign([3.0, 0.0, -2.0]) * np.log1p(np.abs([3.0, 0.0, -2.0]))
    np.testing.assert_allclose(schema.dense_values("price", rows["price"]),
                               ((x - f.mean) / f.std).astype(np.float32), rtol=1e-6)


def test_public_lookup_and_dense_values_name_bad_input(schema):
    with pytest.raises(ValueError, match="field 'price' is dense, not categorical"):
        schema.lookup("price", pa.array(["1"]))
    with pytest.raises(ValueError, match="field 'user' is categorical, not dense"):
        schema.dense_values("user", [1.0])
    with pytest.raises(DataError, match="field 'age'.*non-numeric"):
        schema.dense_values("age", ["x"])
    with pytest.raises(KeyError):
        schema.lookup("nope", pa.array(["1"]))
    unfitted = Schema(FIELDS)
    with pytest.raises(RuntimeError, match="'item': vocabulary not built yet"):
        unfitted.lookup("hist", pa.array(["i1"]))
    with pytest.raises(RuntimeError, match="'price': statistics not fitted"):
        unfitted.dense_values("price", [1.0])


def test_fit_takes_chunks_and_fit_schema_takes_a_file(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("label,c,x\n1,a,1.5\n0,b,2.5\n1,a,3.5\n")
    fields = [{"name": "c", "type": "categorical"},
              {"name": "x", "type": "dense", "transform": "standardize"}]
    with pytest.raises(TypeError, match=r"not the path .*d\.csv.*fit_schema\(schema, path\)"):
        Schema(fields).fit(p)
    with pytest.raises(TypeError, match="fit_schema"):
        Schema(fields).fit(str(p))
    s = fit_schema(Schema(fields), p)
    assert s.fitted and s.field("c").vocabulary == ["a", "b"]
    assert s.field("x").mean == pytest.approx(2.5)
    assert s == Schema(fields).fit({"label": [1, 0, 1], "c": ["a", "b", "a"], "x": [1.5, 2.5, 3.5]})
    assert fit_schema(Schema(fields), p, max_rows=1).field("c").vocabulary == ["a"]


def test_infer_reads_a_history_column_as_a_sequence_when_asked(tmp_path):
    """With histories=True a '|'-joined column whose values follow a categorical column's
    distribution becomes that column's behaviour sequence (shared table, sequence: true); a
    genre list follows no column and stays a pooled bag. A user column over the same integers
    as the items, but with another distribution, is not taken for the owner. Without
    histories both stay bags."""
    from adrec_fast.data.schema import HISTORY_OVERLAP, _history_owner

    g = np.random.default_rng(0)
    pop = 1.0 / np.arange(1, 101) ** 1.2
    pop /= pop.sum()
    lines = ["label,user,item,hist,genre"]
    for i in range(2000):
        user = g.integers(0, 100)  # uniform over the same integers as the items
        item = g.choice(100, p=pop)
        hist = "|".join(str(v) for v in g.choice(100, size=g.integers(0, 6), p=pop))
        genre = ["Action|Comedy", "Drama", "Comedy|Drama|Horror"][i % 3]
        lines.append(f"{i % 2},{user},{item},{hist},{genre}")
    p = tmp_path / "clicks.csv"
    p.write_text("\n".join(lines) + "\n")
    s = infer_schema(p, histories=True)
    h, genre = s.field("hist"), s.field("genre")
    assert (h.type, h.sequence, h.share_with, h.max_len) == ("multi_categorical", True, "item", 5)
    assert (genre.type, genre.sequence, genre.share_with) == ("multi_categorical", False, None)
    plain = infer_schema(p)
    assert not plain.field("hist").sequence and plain.field("hist").share_with is None
    # the fitted schema puts the history in Batch.seq_*, in the item table, last values kept
    fit_schema(s, p)
    assert [name for name, _ in s.sequence_fields()] == ["hist"]
    assert s.table_of("hist") == s.table_of("item")
    b = load_all(p, s)
    vocab = s.field("item").vocabulary
    first = lines[1].split(",")[3].split("|")
    n0 = int(b.seq_offsets["hist"][1])
    assert b.seq_indices["hist"][:n0].tolist() == [vocab.index(v) + 1 for v in first if v]
    # the overlap rule itself: the same distribution -> that column; disjoint or below the
    # threshold -> none
    from adrec_fast.data.schema import _frequencies

    def owner(values, **cands):
        return _history_owner(_frequencies(pa.array(values, pa.string())),
                              {k: _frequencies(pa.array(v, pa.string())) for k, v in cands.items()})

    vals = ["1", "1", "2", "3"]
    assert owner(vals, a=["1", "2", "3", "1"], b=["9"]) == "a"
    assert owner(vals, b=["9", "8"]) is None
    k = round(100 * HISTORY_OVERLAP)  # the candidate's share of "1": k / 100
    assert owner(["1"], h=["1"] * k + ["x"] * (100 - k)) == "h"
    assert owner(["1"], h=["1"] * (k - 1) + ["x"] * (101 - k)) is None
    assert owner([], a=vals) is None
