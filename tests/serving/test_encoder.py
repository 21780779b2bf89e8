# SPDX-License-Identifier: Apache-2.0
"""The native request encoder against the training encoder: every output equals
``Schema.encode_columns`` of the same rows (user values repeated per candidate), bit for bit."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from adrec_fast.data import columns as C
from adrec_fast.data.schema import Schema
from adrec_fast.serving.encoder import EncodedRequest, RequestEncoder

USERS = [f"u{i}" for i in range(30)]
ITEMS = [f"item{i}" for i in range(40)] + ["élan", "数据", "emoji😀", "a b"]
FLOATS = [5042.0, 0.1, 1e10, -0.0, 2.5, 1e-7, 3.0, 1.5e15, -7.25, 1e-6]

FIELDS = [
    {"name": "user", "column": "user_id", "type": "categorical"},
    {"name": "item", "type": "categorical", "min_count": 2},
    {"name": "last_item", "type": "categorical", "share_with": "item"},
    {"name": "adcat", "type": "categorical", "vocab": "hash", "hash_size": 97, "salt": "ad"},
    {"name": "code", "type": "categorical", "vocab": "hash", "hash_size": 2**40, "salt": "é"},
    {"name": "flag", "type": "categorical"},
    {"name": "num", "type": "categorical"},
    {"name": "cnt", "type": "dense", "transform": "log1p_standardize", "fill": 0.0},
    {"name": "price", "type": "dense", "transform": "standardize", "fill": 1.5},
    {"name": "age", "type": "dense", "transform": "log1p", "fill": -2.0},
    {"name": "ctr", "type": "dense", "transform": "none", "fill": 0.25},
    {"name": "hist", "type": "multi_categorical", "sequence": True, "share_with": "item",
     "max_len": 5},
    {"name": "tags", "type": "multi_categorical", "sequence": True, "vocab": "hash",
     "hash_size": 1000, "sep": ",", "salt": "t"},
]
CATEGORICAL = ["user_id", "item", "last_item", "adcat", "code", "flag", "num"]
DENSE = ["cnt", "price", "age", "ctr"]
SEQUENCE = ["hist", "tags"]


def _train(rng, n=500) -> dict:
    def hist():
        return "|".join(rng.choice(ITEMS, int(rng.integers(0, 8))).tolist())

    return {
        "user_id": rng.choice(USERS, n).tolist(),
        "item": rng.choice(ITEMS, n).tolist(),
        "last_item": rng.choice(ITEMS, n).tolist(),
        "adcat": rng.integers(0, 60, n).tolist(),
        "code": rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64).tolist(),
        "flag": rng.choice([True, False], n).tolist(),
        "num": rng.choice(FLOATS, n).tolist(),
        "cnt": rng.integers(0, 5000, n).astype(float).tolist(),
        "price": rng.normal(10, 3, n).tolist(),
        "age": rng.integers(-3, 90, n).tolist(),
        "ctr": [None if rng.random() < 0.1 else float(x) for x in rng.random(n)],
        "hist": [hist() for _ in range(n)],
        "tags": [[int(x) for x in rng.integers(0, 30, int(rng.integers(0, 4)))] for _ in range(n)],
        "label": rng.integers(0, 2, n).tolist(),
    }


@pytest.fixture(scope="module")
def schema() -> Schema:
    s = Schema(FIELDS, label="label")
    s.fit(_train(np.random.default_rng(0)))
    return s


# ------------------------------------------------------------------------------ reference
def _reference(schema: Schema, user: dict, cands, n: int):
    """(ids [T, N], dense [N, Kd], histories) from the training encoder."""
    if isinstance(cands, list):
        keys = list(dict.fromkeys(k for c in cands for k in c))
        cols = {k: [c.get(k) for c in cands] for k in keys}
    else:
        cols = dict(cands)
    for k, v in user.items():
        cols[k] = [v] * n
    cols[schema.label] = [0] * n  # fixes the row count when no field column is given
    b = schema.encode_columns(cols)
    T = len(schema.sparse_fields())
    ids = b.indices.numpy().reshape(T, n)
    seqs = []
    for name, _ in schema.sequence_fields():
        o = b.seq_offsets[name].numpy()
        s = b.seq_indices[name].numpy()
        rows = [s[o[i]:o[i + 1]] for i in range(n)]
        assert all(np.array_equal(r, rows[0]) for r in rows)
        seqs.append(rows[0])
    return ids, b.dense.numpy(), seqs


def _check(schema: Schema, enc: RequestEncoder, user: dict, cands, n: int):
    got = enc.encode(user, cands)
    ids, dense, seqs = _reference(schema, user, cands, n)
    T = ids.shape[0]
    assert isinstance(got, EncodedRequest)
    assert got.n == n
    assert got.user_ids.dtype == np.int64 and got.user_ids.shape == (T,)
    assert got.cand_ids.dtype == np.int64 and got.cand_ids.shape == (n, len(got.cand_slots))
    assert got.cand_ids.flags.c_contiguous
    assert list(got.cand_slots) == sorted(got.cand_slots)
    for t in range(T):
        if t in got.cand_slots:
            assert got.user_ids[t] == 0
            np.testing.assert_array_equal(got.cand_ids[:, got.cand_slots.index(t)], ids[t])
        else:
            assert (ids[t] == ids[t, 0]).all()
            assert got.user_ids[t] == ids[t, 0], schema.sparse_fields()[t]
    assert got.dense.dtype == np.float32
    nd = n if got.dense_cand else 1
    assert got.dense.shape == (nd, dense.shape[1])
    want = dense if got.dense_cand else dense[:1]
    assert (dense == dense[0]).all() or got.dense_cand
    np.testing.assert_array_equal(got.dense.view(np.uint32), want.view(np.uint32))
    assert len(got.seqs) == len(seqs)
    for g, w in zip(got.seqs, seqs):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)
    return got


# ------------------------------------------------------------------------------ random requests
def _value(rng, col: str):
    """One raw value of column ``col`` (None now and then)."""
    r = rng.random()
    if r < 0.08:
        return None
    if col == "user_id":
        return "" if r < 0.12 else ("nobody" if r < 0.2 else str(rng.choice(USERS)))
    if col in ("item", "last_item"):
        return "" if r < 0.12 else ("zz-unseen" if r < 0.2 else str(rng.choice(ITEMS)))
    if col == "adcat":
        return int(rng.integers(0, 80))
    if col == "code":
        return int(rng.integers(-2**63, 2**63 - 1, dtype=np.int64))
    if col == "flag":
        return bool(r < 0.5)
    if col == "num":
        if r < 0.7:
            return float(rng.choice(FLOATS))
        return float(rng.normal() * 10.0 ** rng.integers(-9, 18))
    if col == "cnt":
        return float(rng.integers(0, 6000)) if r < 0.6 else int(rng.integers(-5, 6000))
    if col == "price":
        return f" {rng.normal(10, 3):.6g} " if r < 0.3 else float(rng.normal(10, 3))
    if col == "age":
        return int(rng.integers(-3, 100)) if r < 0.7 else "" if r < 0.8 else "7.5e1"
    if col == "ctr":
        return float(rng.random())
    if col == "hist":
        vals = rng.choice(ITEMS + ["", "zz"], int(rng.integers(0, 9))).tolist()
        return "|".join(vals) if r < 0.5 else vals
    if col == "tags":
        vals = [int(x) for x in rng.integers(0, 40, int(rng.integers(0, 6)))]
        return ",".join(map(str, vals)) if r < 0.4 else vals
    raise AssertionError(col)


def _as_array(rng, col: str, vals: list):
    """A numpy version of a candidate column when the values allow one, else the list."""
    if any(v is None for v in vals) or rng.random() < 0.4:
        return vals if rng.random() < 0.8 else tuple(vals)
    if col in ("user_id", "item", "last_item"):
        return np.array(vals, dtype=str) if rng.random() < 0.7 else np.array(vals, dtype=object)
    if col in ("adcat", "code"):
        return np.array(vals, dtype=np.int64)
    if col == "flag":
        return np.array(vals, dtype=bool)
    if col == "num":
        return np.array(vals, dtype=np.float64 if rng.random() < 0.5 else np.float32)
    if col in ("cnt", "ctr") and all(isinstance(v, float) for v in vals):
        return np.array(vals, dtype=np.float64)
    return vals


def _request(rng, n: int, every: bool = True):
    cols = CATEGORICAL + DENSE
    cand_cols = [c for c in cols if rng.random() < 0.4]
    if not cand_cols and rng.random() < 0.5:
        cand_cols = ["item"]
    user = {c: _value(rng, c) for c in cols + SEQUENCE
            if c not in cand_cols and (every or rng.random() < 0.7)}
    cands = {c: [_value(rng, c) for _ in range(n)] for c in cand_cols}
    if rng.random() < 0.3 and cand_cols:
        # a key absent from a dict is a missing value there (kept in dict 0: the column is given)
        return user, [{c: cands[c][i] for c in cand_cols if i == 0 or cands[c][i] is not None}
                      for i in range(n)]
    if not cands:
        return user, [{} for _ in range(n)]
    return user, {c: _as_array(rng, c, v) for c, v in cands.items()}


@pytest.mark.parametrize("n", [1, 2, 7, 17, 64])  # 17: the lookups run in blocks of 16
def test_random_requests_match_training(schema, n):
    rng = np.random.default_rng(n)
    enc = RequestEncoder(schema)
    for _ in range(40):
        user, cands = _request(rng, n)
        _check(schema, enc, user, cands, n)


@pytest.mark.parametrize("n", [1, 5])
def test_missing_default_matches_training(schema, n):
    """missing='default': an absent column is what the training encoder makes of an absent
    column (id 0, the transformed fill, an empty history); missing='error' names it."""
    rng = np.random.default_rng(10 + n)
    enc = RequestEncoder(schema, missing="default")
    strict = RequestEncoder(schema)
    absent_seen = 0
    for _ in range(40):
        user, cands = _request(rng, n, every=False)
        _check(schema, enc, user, cands, n)
        given = set(user) | (set(cands) if isinstance(cands, dict)
                             else {k for c in cands for k in c})
        absent = [c for c in CATEGORICAL + DENSE + SEQUENCE if c not in given]
        if absent:
            absent_seen += 1
            with pytest.raises(ValueError, match="missing field") as e:
                strict.encode(user, cands)
            for c in absent:
                assert repr(c) in str(e.value)
    assert absent_seen > 10


def test_all_missing_default(schema):
    enc = RequestEncoder(schema, missing="default")
    got = _check(schema, enc, {}, [{}], 1)
    assert (got.user_ids == 0).all() and got.cand_slots == () and got.dense_cand == ()
    assert [s.size for s in got.seqs] == [0, 0]
    # the dense defaults are the fills, transformed
    want = [schema.dense_values(f, [None])[0] for f in schema.dense_fields()]
    np.testing.assert_array_equal(got.dense[0], np.array(want, dtype=np.float32))


# ------------------------------------------------------------------------------ token rules
def _hash_schema(size=2**62 - 57) -> Schema:
    s = Schema([{"name": "h", "type": "categorical", "vocab": "hash", "hash_size": size,
                 "salt": "x"}])
    return s


def _hashed(schema, arrow_tokens) -> np.ndarray:
    return C.stable_hash(arrow_tokens, "x", schema.field("h").hash_size)


def test_float_tokens_match_arrow():
    """Floats become the text training's Arrow cast gives them (a hash of ~2**62 values tells
    the tokens apart): random bit patterns, decimal values of every magnitude, powers of ten,
    integral values, zeros, inf and nan; float64 and float32, arrays and Python floats."""
    rng = np.random.default_rng(1)
    s = _hash_schema()
    enc = RequestEncoder(s)
    bits = rng.integers(0, 2**63, 20000, dtype=np.int64).view(np.float64)
    bits = bits[np.isfinite(bits)]
    bits = bits * np.where(rng.random(bits.size) < 0.5, -1, 1)
    dec = np.array([float(f"{x:.{k}g}") for x, k in  # short decimals of every magnitude
                    zip(rng.normal(size=20000) * 10.0 ** rng.integers(-12, 25, 20000),
                        rng.integers(1, 18, 20000))])
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 2.0**53, 2.0**53 + 2, 1e-7, 1e-6,
                        999999999.0, 1e9, 1e10, 5e-324, 1.7976931348623157e308, 5042.0, 0.1]
                       + [10.0**k for k in range(-20, 25)] + [1.5 * 10.0**k for k in range(-9, 17)])
    for vals in (bits, dec, special):
        for dtype in (np.float64, np.float32):
            with np.errstate(over="ignore"):
                arr = vals.astype(dtype)
            want = _hashed(s, pc.cast(pa.array(arr), pa.string()))
            got = enc.encode({}, {"h": arr})
            np.testing.assert_array_equal(got.cand_ids[:, 0], want)
        # Python floats (and the user side) take the same path
        lst = special.tolist()
        got = enc.encode({}, {"h": lst}).cand_ids[:, 0]
        np.testing.assert_array_equal(got, _hashed(s, pc.cast(pa.array(lst), pa.string())))
    for v in special.tolist():
        got = enc.encode({"h": v}, [{}]).user_ids[0]
        assert got == _hashed(s, pc.cast(pa.array([v]), pa.string()))[0], v


def test_float16_and_numpy_scalars():
    s = _hash_schema()
    enc = RequestEncoder(s)
    h = np.array([0.1, 1e4, 65504, 3e-5, -0.0, 2.5], dtype=np.float16)
    want = _hashed(s, pc.cast(pa.array(h), pa.string()))
    np.testing.assert_array_equal(enc.encode({}, {"h": h}).cand_ids[:, 0], want)
    # numpy scalars in lists: each as its own dtype, as Arrow types a list of them
    for vals in ([np.float32(0.1), np.float32(3.0)], [np.int16(-5), np.uint64(2**64 - 1)],
                 [np.float64(0.1), np.float64(1e10)], [np.bool_(True), np.bool_(False)]):
        want = _hashed(s, C.tokens(vals)[0])
        np.testing.assert_array_equal(enc.encode({}, {"h": vals}).cand_ids[:, 0], want)


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16",
                                   "uint32", "uint64", "bool", "float32", "float64", "U", "S",
                                   "object", ">i4", ">f8", "strided"])
def test_numpy_columns(dtype):
    s = _hash_schema()
    enc = RequestEncoder(s)
    rng = np.random.default_rng(2)
    if dtype in ("U", "S", "object"):
        vals = ["a", "", "zz", "5042", "b c", "x" * 40]
        if dtype != "S":
            vals += ["élan", "数据😀"]
        arr = np.array(vals, dtype=dtype)
    elif dtype == "strided":
        arr = np.arange(40, dtype=np.int64)[::3]
    elif dtype == "bool":
        arr = rng.random(9) < 0.5
    elif np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        arr = np.array([info.min, info.max, 0, 1, -1 if info.min < 0 else 7], dtype=dtype)
    else:
        arr = (rng.normal(size=9) * 1e3).astype(dtype)
        arr[:3] = [5042.0, 0.1, -0.0]
    # Arrow (training) reads no byte-swapped array: the reference takes the native order
    want = s.lookup("h", C.tokens(arr.astype(arr.dtype.newbyteorder("=")))[0])
    np.testing.assert_array_equal(enc.encode({}, {"h": arr}).cand_ids[:, 0], want)
    # and the same values one by one on the user side (numpy scalars / Python values)
    for i in range(len(arr)):
        v = arr[i]
        if dtype == "S":  # bytes are not a categorical value (text is)
            with pytest.raises(TypeError, match="'h'.*got bytes"):
                enc.encode({"h": v}, [{}])
            continue
        got = enc.encode({"h": v}, [{}]).user_ids[0]
        assert got == want[i], (dtype, v)


def test_tokens_edge_values(schema):
    enc = RequestEncoder(schema, missing="default")
    item = schema.field("item")
    voc = item.vocabulary
    last = voc[-1]
    n = len(voc)
    users = [{"item": None}, {"item": ""}, {"item": last}, {"item": voc[0]}, {"item": "zz"},
             {"flag": True}, {"flag": False}, {"flag": np.bool_(True)},
             {"num": 5042}, {"num": 5042.0}, {"num": 0.1}, {"num": np.float32(0.1)},
             {"num": -0.0}, {"num": 1e10}, {"code": 2**63 - 1}, {"code": -2**63},
             {"code": 2**70}, {"code": np.uint64(2**64 - 1)}, {"user_id": "数据"}]
    for u in users:
        got = _check(schema, enc, u, [{}, {}], 2)
        if u.get("item") == last:
            assert got.user_ids[1] == n  # the largest id of the table
    # hashed ids stay in [1, hash_size)
    ids = enc.encode({}, {"adcat": list(range(2000))}).cand_ids[:, 0]
    assert ids.min() >= 1 and ids.max() <= 96 and np.unique(ids).size == 96


def test_dense_text_matches_training():
    """Dense text is parsed as the training reader parses it: trimmed of Unicode whitespace,
    optional sign, exponent, inf/infinity/nan in any case; '' and 'nan' are missing."""
    s = Schema([{"name": "d", "type": "dense", "transform": "none", "fill": -1.0},
                {"name": "e", "type": "dense", "transform": "log1p", "fill": 3.0}])
    enc = RequestEncoder(s)
    rng = np.random.default_rng(3)
    texts = ["+1", "1.", ".5", "1e5", "1E+5", "Infinity", "-infinity", "INF", "-nan", "NaN",
             "00012", "+.5e-3", "1e400", "-1e400", "1e-400", "5e-324", "", "  ", "\u3000 7\u2028",
             "\t-3.25e-2\n", "\xa01\x85", "0", "-0", "123456789012345678901234567890"]
    texts += [f"{x:.{int(rng.integers(1, 18))}g}" for x in rng.normal(size=300) * 10.0 **
              rng.integers(-30, 30, 300)]
    for cols in ({"d": texts, "e": texts}, {"d": np.array(texts), "e": np.array(texts)}):
        got = enc.encode({}, cols).dense
        want = np.stack([s.dense_values("d", texts), s.dense_values("e", texts)], 1)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    for bad in ["0x10", "1_000", "1e", "e5", ".", "-", "1.5.2", "1d", "١", "cheap", "1e+"]:
        with pytest.raises(TypeError, match="'d'.*non-numeric"):
            enc.encode({"e": 1}, {"d": ["1", bad]})
        with pytest.raises(DataErrorOrType):
            s.dense_values("d", ["1", bad])


DataErrorOrType = Exception  # the training reader raises DataError (or Arrow's error)


def test_dense_numbers(schema):
    enc = RequestEncoder(schema, missing="default")
    for vals in ([True, False, None], [0, -3, 2**40], [np.int8(5), np.uint16(7), np.float32(2.5)],
                 np.array([1, 2, 3], dtype=np.uint8), np.array([0.5, -2.0], dtype=np.float16),
                 np.array([1.5, np.inf, -np.inf]), np.array([True, False]),
                 np.array([1, None, "2.5"], dtype=object)):
        for col in DENSE:
            _check(schema, enc, {}, {col: vals}, len(vals))
    # a dense field on both sides of one request: user-side values repeat per candidate
    got = _check(schema, enc, {"cnt": 12, "price": None}, {"age": [1, 2, 3], "ctr": [None] * 3}, 3)
    assert got.dense_cand == (2, 3) and got.dense.shape == (3, 4)


# ------------------------------------------------------------------------------ histories
def test_sequences(schema):
    enc = RequestEncoder(schema, missing="default")
    voc = schema.field("item").vocabulary
    for hist in [None, "", "||", voc[0], "|".join(voc[:9]), voc[:9], tuple(voc[:3]),
                 np.array(voc[:7]), np.array(voc[:7], dtype=object), [None, "", voc[1], "zz"],
                 "zz|" + voc[2] + "||" + voc[3]]:
        for tags in [None, 5, "1,2,,3", [1, 2, 3], np.array([4, 5], dtype=np.int32), 2.5, True]:
            got = _check(schema, enc, {"hist": hist, "tags": tags}, {"item": [voc[0]]}, 1)
            assert got.seqs[0].size <= 5
    # truncation keeps the LAST max_len values
    got = enc.encode({"hist": voc[:9]}, [{}]).seqs[0]
    np.testing.assert_array_equal(got, np.arange(5, 10))
    with pytest.raises(ValueError, match="'hist'.*history"):
        enc.encode({}, {"hist": ["a"], "item": ["b"]})
    with pytest.raises(ValueError, match="'tags'.*history"):
        enc.encode({}, [{"tags": "1,2"}])
    with pytest.raises(TypeError, match="'hist'"):
        enc.encode({"hist": {"a": 1}}, [{}])
    with pytest.raises(TypeError, match="'hist'"):
        enc.encode({"hist": ["a", ["b"]]}, [{}])


# ------------------------------------------------------------------------------ errors
def _full_user(schema, skip=()):
    return {c: None for c in CATEGORICAL + DENSE + SEQUENCE if c not in skip}


def test_errors(schema):
    enc = RequestEncoder(schema)
    user = _full_user(schema, skip=("item", "price"))
    cands = {"item": ["i1", "i2"], "price": [1.0, 2.0]}
    enc.encode(user, cands)
    with pytest.raises(ValueError, match=r"unknown field 'colour'; the schema's fields are \["):
        enc.encode({**user, "colour": "red"}, cands)
    with pytest.raises(ValueError, match="unknown fields 'colour', 'size'"):
        enc.encode(user, {**cands, "colour": ["a", "b"], "size": [1, 2]})
    with pytest.raises(ValueError, match="'label' is the label column"):
        enc.encode({**user, "label": 1}, cands)
    with pytest.raises(ValueError, match=r"both for the user and per candidate: \['user_id'\]"):
        enc.encode(user, {**cands, "user_id": ["a", "b"]})
    with pytest.raises(ValueError, match="candidate column 'price' has 1 values, expected 2"):
        enc.encode(user, {**cands, "price": [1.0]})
    with pytest.raises(ValueError, match="empty"):
        enc.encode(user, {})
    with pytest.raises(ValueError, match="empty"):
        enc.encode(user, [])
    with pytest.raises(ValueError, match="empty"):
        enc.encode(user, {"item": [], "price": []})
    with pytest.raises(ValueError, match="empty"):
        enc.encode(user, {"item": np.array([], dtype=str), "price": []})
    with pytest.raises(TypeError, match="user must be a dict"):
        enc.encode(["u1"], cands)
    with pytest.raises(TypeError, match="candidates must be"):
        enc.encode(user, "item")
    with pytest.raises(TypeError, match="candidate 1 must be a dict"):
        enc.encode(user, [{"item": "a"}, "b"])
    with pytest.raises(TypeError, match="'item'.*list or 1-D array"):
        enc.encode(user, {**cands, "item": "ab"})
    with pytest.raises(ValueError, match="'item'.*1-D"):
        enc.encode(user, {**cands, "item": np.array([["a"], ["b"]])})
    with pytest.raises(TypeError, match="'item'.*dtype"):
        enc.encode(user, {**cands, "item": np.array([1 + 2j, 3j])})
    # values of a wrong type name the field
    with pytest.raises(TypeError, match="field 'user' \\(column 'user_id'\\)"):
        enc.encode({**user, "user_id": {"a": 1}}, cands)
    with pytest.raises(TypeError, match="'item'.*expected str"):
        enc.encode(user, {**cands, "item": ["i1", ["x"]]})
    with pytest.raises(TypeError, match="'ctr'.*expected a number"):
        enc.encode({**user, "ctr": [1.0]}, cands)
    with pytest.raises(TypeError, match="'price'.*non-numeric text 'cheap'"):
        enc.encode(user, {**cands, "price": ["cheap", "dear"]})
    with pytest.raises(TypeError, match="'price'.*dtype"):
        enc.encode(user, {**cands, "price": np.array(["2020-01-01"] * 2, dtype="datetime64[D]")})
    # NaN: None is the missing value
    with pytest.raises(ValueError, match="'ctr': NaN dense value \\(pass None"):
        enc.encode({**user, "ctr": float("nan")}, cands)
    with pytest.raises(ValueError, match="'price': NaN"):
        enc.encode(user, {**cands, "price": [1.0, float("nan")]})
    with pytest.raises(ValueError, match="'price': NaN"):
        enc.encode(user, {**cands, "price": np.array([1.0, np.nan], dtype=np.float32)})
    with pytest.raises(ValueError, match="'ctr': NaN"):
        enc.encode({**user, "ctr": np.float64("nan")}, cands)
    # a field in neither side: every one named
    short = {k: v for k, v in user.items() if k not in ("user_id", "cnt", "tags")}
    with pytest.raises(ValueError, match="missing fields 'user_id', 'cnt', 'tags'"):
        enc.encode(short, cands)
    got = RequestEncoder(schema, missing="default").encode(short, cands)
    assert got.n == 2
    # a surrogate cannot be a UTF-8 token
    with pytest.raises(TypeError, match="'item'.*UTF-8"):
        enc.encode(user, {**cands, "item": ["\ud800", "a"]})


def test_threads(schema):
    """Concurrent requests on one encoder give what the same requests give one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    enc = RequestEncoder(schema)
    rng = np.random.default_rng(4)
    reqs = [_request(rng, int(rng.integers(1, 40))) for _ in range(60)]
    alone = [enc.encode(u, c) for u, c in reqs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda r: enc.encode(*r), reqs * 3))
    for a, b in zip(alone * 3, together):
        assert a.n == b.n and a.cand_slots == b.cand_slots and a.dense_cand == b.dense_cand
        for x, y in zip(a[2:5], b[2:5]):
            np.testing.assert_array_equal(x, y)
        for x, y in zip(a.seqs, b.seqs):
            np.testing.assert_array_equal(x, y)


def test_constructor_checks(schema):
    with pytest.raises(ValueError, match="missing must be"):
        RequestEncoder(schema, missing="zero")
    with pytest.raises(NotImplementedError, match="'tags'"):
        RequestEncoder(Schema([{"name": "tags", "type": "multi_categorical", "vocab": "hash",
                                "hash_size": 10}]))
    with pytest.raises(NotImplementedError, match="'emb'"):
        RequestEncoder(Schema([{"name": "emb", "type": "vector", "dim": 4}]))
    with pytest.raises(RuntimeError, match="fit"):
        RequestEncoder(Schema([{"name": "c", "type": "categorical"}]))


def test_shared_column():
    """Two fields reading one column (a vocabulary and a hash of it) both get its values."""
    s = Schema([{"name": "a", "type": "categorical", "column": "x"},
                {"name": "b", "type": "categorical", "column": "x", "vocab": "hash",
                 "hash_size": 50},
                {"name": "c", "type": "dense", "column": "x", "transform": "log1p"}])
    s.fit({"x": [1, 2, 3, 2, 5]})
    enc = RequestEncoder(s)
    assert enc.columns == ["x"]
    got = _check(s, enc, {}, {"x": [2, 5, 9, None]}, 4)
    assert got.cand_slots == (0, 1) and got.dense_cand == (0,)
    got = _check(s, enc, {"x": 3}, [{}], 1)
    assert got.cand_slots == ()


def test_closed_vocabulary():
    """A closed field (a text field's cached values) takes its vocabulary's values and None;
    anything else raises UnknownValue (a KeyError) naming the field, on either side and in
    every column form; an open field's unseen value stays id 0."""
    from adrec_fast import _C
    from adrec_fast.serving.encoder import UnknownValue

    def field(name, slot, closed):
        return {"name": name, "column": name, "kind": "categorical", "slot": slot,
                "table": slot, "vocabulary": ["a", "b", "c"], "salt": "", "hash_size": 0,
                "closed": closed}

    enc = _C.RequestEncoder([field("item", 0, False), field("title", 1, True)], "label", False)
    r = enc.encode({"item": "zz"}, {"title": ["b", None, "a", "c"]})
    np.testing.assert_array_equal(r.cand_ids[:, 0], [2, 0, 1, 3])
    assert r.user_ids[0] == 0  # open: unseen -> 0
    r = enc.encode({"title": "c"}, [{"item": "a"}, {"item": "q"}])
    assert r.user_ids[1] == 3 and r.cand_ids[:, 0].tolist() == [1, 0]
    np.testing.assert_array_equal(
        enc.encode({"item": "a"}, {"title": np.array(["c", "a"])}).cand_ids[:, 0], [3, 1])
    assert issubclass(UnknownValue, KeyError)
    for user, cands in [({"item": "a"}, {"title": ["a", "zz"]}),
                        ({"item": "a"}, {"title": [""]}),
                        ({"item": "a"}, {"title": [5]}),
                        ({"item": "a"}, {"title": np.array(["a", "q"])}),
                        ({"item": "a"}, {"title": np.array(["a", ""])}),
                        ({"title": ""}, {"item": ["a"]}),
                        ({"item": "a"}, {"title": np.array([1, 2])}),
                        ({"item": "a"}, [{"title": "a"}, {"title": 2.5}]),
                        ({"title": "zz"}, {"item": ["a"]}),
                        ({"item": "a"}, {"title": ["a", None] * 10 + ["zz"]}),  # 2nd block
                        ({"item": "a"}, {"title": ["c"] * 17 + [""]}),
                        ({"item": "a"}, {"title": ["b"] * 33 + [7]})]:
        with pytest.raises(UnknownValue, match="field 'title'"):
            enc.encode(user, cands)
    titles = ["c", None, "a", "b"] * 9 + ["a"]  # 37 rows: three blocks, the last of one
    np.testing.assert_array_equal(enc.encode({"item": "b"}, {"title": titles}).cand_ids[:, 0],
                                  [{"a": 1, "b": 2, "c": 3, None: 0}[t] for t in titles])
    with pytest.raises(ValueError, match="closed"):
        _C.RequestEncoder([{**field("title", 0, True), "vocabulary": None, "hash_size": 7}],
                          "label", False)
