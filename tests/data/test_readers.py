# SPDX-License-Identifier: Apache-2.0
"""Readers: every format on small hand-written files, gzip, bad rows, and the real files."""

import gzip
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from adrec_fast.data import (
    DataError,
    Schema,
    criteo_schema,
    fit_schema,
    infer_schema,
    iter_batches,
    load_all,
    open_reader,
)
from adrec_fast.data.readers import detect_format

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"real data file {p} is absent (only present in the dev workspace)")
    return p


def write(path: Path, text: str, gz: bool = False) -> Path:
    data = text.encode()
    if gz:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


CSV_SCHEMA = Schema(
    [
        {"name": "user", "type": "categorical"},
        {"name": "price", "type": "dense", "transform": "none", "fill": -1.0},
        {"name": "tags", "type": "multi_categorical", "max_len": 3},
    ]
)


def rows(reader) -> list[dict]:
    return [r for chunk in reader for r in chunk.to_pylist()]


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_csv_values_crlf_gzip_and_chunks(tmp_path, gz, eol):
    lines = ["label,user,price,tags", "1,u1,2.5,a|b", "0,u2,,", "1,u1,7,c", "0,u3,1e2,a"]
    p = write(tmp_path / ("x.csv.gz" if gz else "x.csv"), eol.join(lines) + eol, gz)
    reader = open_reader(p, schema=CSV_SCHEMA, chunk_rows=2)
    chunks = list(reader)
    assert [c.num_rows for c in chunks] == [1, 2, 1]  # the header takes a line of the first block
    got = rows(reader)
    assert [r["user"] for r in got] == ["u1", "u2", "u1", "u3"]
    assert got[0]["price"] == 2.5 and np.isnan(got[1]["price"]) and got[3]["price"] == 100.0
    assert [r["label"] for r in got] == [1.0, 0.0, 1.0, 0.0]
    assert got[0]["tags"] == "a|b"
    assert reader.rows == 4 and reader.bad_rows == 0


def test_csv_blank_lines_and_missing_final_newline(tmp_path):
    p = write(tmp_path / "x.csv", "label,user,price,tags\n1,u1,1,a\n\n0,u2,2,b")
    assert [r["user"] for r in rows(open_reader(p, schema=CSV_SCHEMA))] == ["u1", "u2"]


def test_csv_without_schema_keeps_text_and_checks_label(tmp_path):
    p = write(tmp_path / "x.csv", "label,a,b\n1,3,x\n0,,y\n")
    got = rows(open_reader(p))
    assert got == [{"label": 1.0, "a": "3", "b": "x"}, {"label": 0.0, "a": "", "b": "y"}]


def test_csv_missing_schema_column_is_named(tmp_path):
    p = write(tmp_path / "x.csv", "label,user,tags\n1,u,a\n")
    with pytest.raises(DataError, match=r"x\.csv, line 1: .*'price'"):
        list(open_reader(p, schema=CSV_SCHEMA))


CRITEO_ROW = "\t".join(["1"] + [str(i) for i in range(13)] + [f"{i:08x}" for i in range(26)])


@pytest.mark.parametrize("gz", [False, True])
def test_criteo_tsv_no_header(tmp_path, gz):
    row2 = CRITEO_ROW.split("\t")
    row2[0], row2[1], row2[14] = "0", "", ""  # missing I1 and C1
    p = write(
        tmp_path / ("day.txt.gz" if gz else "day.txt"),
        CRITEO_ROW + "\n" + "\t".join(row2) + "\n",
        gz,
    )
    assert detect_format(p) == "criteo"
    got = rows(open_reader(p))
    assert len(got) == 2 and set(got[0]) == {
        "label",
        *[f"I{i}" for i in range(1, 14)],
        *[f"C{i}" for i in range(1, 27)],
    }
    assert got[0]["I13"] == 12.0 and got[0]["C26"] == f"{25:08x}"
    assert np.isnan(got[1]["I1"]) and got[1]["C1"] == "" and got[1]["label"] == 0.0


def test_criteo_csv_form_with_header(tmp_path):
    names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    p = write(tmp_path / "c.csv", ",".join(names) + "\n" + CRITEO_ROW.replace("\t", ",") + "\n")
    got = rows(open_reader(p, fmt="criteo"))
    assert got[0]["I2"] == 1.0 and got[0]["C1"] == "00000000"


def test_libsvm_position_and_bag(tmp_path):
    p = write(tmp_path / "x.libsvm", "1 3:1 10:1 7:1\r\n0 4:1 11:1\n\n1 3:1 12:1 8:0.5\n")
    got = rows(open_reader(p))
    assert got == [
        {"label": 1.0, "f0": "3", "f1": "10", "f2": "7"},
        {"label": 0.0, "f0": "4", "f1": "11", "f2": None},
        {"label": 1.0, "f0": "3", "f1": "12", "f2": "8"},
    ]
    bag = rows(open_reader(p, layout="bag"))
    assert [r["features"] for r in bag] == [["3", "10", "7"], ["4", "11"], ["3", "12", "8"]]


def test_libffm_fields_become_list_columns(tmp_path):
    p = write(tmp_path / "x.ffm", "1 0:5:1 2:9:0.5 2:8:0.5\n0 1:7:1 0:6:1\n")
    got = rows(open_reader(p))
    assert got == [
        {"label": 1.0, "f0": ["5"], "f1": [], "f2": ["9", "8"]},
        {"label": 0.0, "f0": ["6"], "f1": ["7"], "f2": []},
    ]
    schema = infer_schema(p)
    assert [(f.name, f.type) for f in schema.fields] == [
        ("f0", "categorical"),
        ("f1", "categorical"),
        ("f2", "multi_categorical"),
    ]
    batch = load_all(p, schema)
    # bags: f0 one id per row, f1 one id (row 0: missing -> 0), f2 two ids then none
    assert batch.bag_lengths().tolist() == [[1, 1], [1, 1], [2, 0]]
    assert batch.indices[2].item() == 0 and batch.indices[3].item() != 0


def test_parquet_lists_vectors_and_row_numbers(tmp_path):
    t = pa.table(
        {
            "label": [1, 0, 1],
            "user": ["a", "b", None],
            "tags": [["x", "y"], [], None],
            "emb": [[0.1, 0.2], [0.3, 0.4], None],
            "price": [1.0, None, 3.0],
        }
    )
    p = tmp_path / "x.parquet"
    pq.write_table(t, p)
    schema = Schema(
        [
            {"name": "user", "type": "categorical"},
            {"name": "tags", "type": "multi_categorical", "max_len": 4},
            {"name": "emb", "type": "vector", "dim": 2},
            {"name": "price", "type": "dense", "fill": 2.0},
        ]
    )
    batch = load_all(p, schema, chunk_rows=2)
    assert batch.batch_size == 3 and batch.labels.tolist() == [1.0, 0.0, 1.0]
    torch.testing.assert_close(batch.vectors, torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.0, 0.0]]))
    assert batch.dense[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert batch.bag_lengths().tolist() == [[1, 1, 1], [2, 0, 0]]
    pq.write_table(
        pa.table(
            {
                "label": [0, 1, 3],
                "user": ["a", "b", "c"],
                "tags": [[], [], []],
                "emb": [None, None, None],
                "price": [1.0, 2.0, 3.0],
            }
        ),
        p,
    )
    with pytest.raises(
        DataError, match=r"x\.parquet, row 3, field 'label': label must be 0 or 1, got 3"
    ):
        load_all(p, schema)


def test_iter_batches_recuts_chunks(tmp_path):
    body = "".join(f"{i % 2},u{i % 5},{i},t{i % 3}|t{i % 4}\n" for i in range(23))
    p = write(tmp_path / "x.csv", "label,user,price,tags\n" + body)
    schema = fit_schema(CSV_SCHEMA.copy(), p)
    sizes = [b.batch_size for b in iter_batches(p, schema, 5, chunk_rows=7)]
    assert sizes == [5, 5, 5, 5, 3]
    whole = load_all(p, schema)
    streamed = list(iter_batches(p, schema, 5, chunk_rows=7))
    from adrec_fast.data import Batch

    again = Batch.concat(streamed)
    assert torch.equal(again.indices, whole.indices) and torch.equal(again.offsets, whole.offsets)
    assert torch.equal(again.dense, whole.dense)
    shuffled = Batch.concat(list(iter_batches(p, schema, 5, chunk_rows=7, shuffle=True, seed=1)))
    assert sorted(shuffled.dense[:, 0].tolist()) == sorted(whole.dense[:, 0].tolist())
    assert shuffled.dense[:, 0].tolist() != whole.dense[:, 0].tolist()


# ---------------------------------------------------------------- bad rows


BAD = "label,user,price,tags\n1,u1,1.5,a\n0,u2,2,b\n"


@pytest.mark.parametrize(
    "row,line_re",
    [
        ("1,u3,3,c,extra", r"x\.csv, line 4: expected 4 columns, found 5"),
        ("1,u3", r"x\.csv, line 4: expected 4 columns, found 2"),
        ("1,u3,abc,c", r"x\.csv, line 4, field 'price': non-numeric value 'abc'"),
        ("2,u3,3,c", r"x\.csv, line 4, field 'label': label must be 0 or 1, got '2'"),
        (",u3,3,c", r"x\.csv, line 4, field 'label': label must be 0 or 1"),
    ],
)
def test_bad_row_names_file_line_field(tmp_path, row, line_re):
    p = write(tmp_path / "x.csv", BAD + row + "\n0,u9,1,d\n")
    with pytest.raises(DataError, match=line_re) as e:
        list(open_reader(p, schema=CSV_SCHEMA))
    assert e.value.line == 4 and e.value.path == str(p)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("tail", [b"1,u\xff3,3,c", b"1,u3,3,\xe9t\xe9", b"1,\xff,3"])
def test_non_utf8_row_is_a_bad_row_naming_line_and_field(tmp_path, tail):
    """A row that is not UTF-8 (a Latin-1 export, a stray byte) fails with the file, line and
    field (the column holding the byte, also in a row with the wrong column count), or is
    skipped and counted; the rows after it keep their line numbers, in every chunk size,
    and schema inference leaves it out of its sample."""
    p = tmp_path / "x.csv"
    p.write_bytes(BAD.encode() + tail + b"\n0,u9,1,d\n1,u\xc3\xa9,2,e\n")
    field = {b"1,u\xff3,3,c": "user", b"1,u3,3,\xe9t\xe9": "tags", b"1,\xff,3": "user"}[tail]
    byte = re.search(rb"[\x80-\xff]", tail).group()[0]
    where = rf"x\.csv, line 4, field '{field}'"
    for chunk_rows in (1, 2, 1000):
        with pytest.raises(DataError, match=where + rf": not UTF-8 text \(byte 0x{byte:02x}\)"):
            list(open_reader(p, schema=CSV_SCHEMA, chunk_rows=chunk_rows))
        r = open_reader(p, schema=CSV_SCHEMA, chunk_rows=chunk_rows, skip_bad_rows=True)
        with pytest.warns(RuntimeWarning, match="skipped 1 bad row"):
            users = [u for t in r for u in t.column("user").to_pylist()]
        assert users == ["u1", "u2", "u9", "u\u00e9"] and r.bad_rows == 1
    assert [f.name for f in infer_schema(p).fields] == ["user", "price", "tags"]


def test_bad_row_line_numbers_across_chunks(tmp_path):
    body = "".join(f"0,u,{i},t\n" for i in range(2, 30))
    p = write(tmp_path / "x.csv", "label,user,price,tags\n" + body.replace("0,u,17,t", "0,u,1x7,t"))
    with pytest.raises(DataError, match=r"line 17, field 'price'"):
        list(open_reader(p, schema=CSV_SCHEMA, chunk_rows=4))


def test_criteo_bad_dense_without_user_schema(tmp_path):
    bad = CRITEO_ROW.split("\t")
    bad[5] = "4.x"
    p = write(tmp_path / "day.tsv", CRITEO_ROW + "\n" + "\t".join(bad) + "\n")
    with pytest.raises(DataError, match=r"day\.tsv, line 2, field 'I5': non-numeric value '4\.x'"):
        list(open_reader(p))
    p = write(tmp_path / "short.tsv", CRITEO_ROW + "\n" + "\t".join(bad[:30]) + "\n")
    with pytest.raises(DataError, match=r"short\.tsv, line 2: expected 40 columns, found 30"):
        list(open_reader(p))


@pytest.mark.parametrize("name", ["x.csv.gz", "day.txt.gz", "x.libsvm.gz"])
def test_truncated_gzip_names_the_file(tmp_path, name):
    text = {
        "x.csv.gz": "label,user,price,tags\n" + "1,u,2,a\n" * 5000,
        "day.txt.gz": (CRITEO_ROW + "\n") * 2000,
        "x.libsvm.gz": "1 1:1 2:1\n" * 5000,
    }[name]
    data = gzip.compress(text.encode())
    p = tmp_path / name
    cut = data[: len(data) // 2]
    p.write_bytes(cut)
    # the error is at the last line the broken stream still holds completely
    complete = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    assert 0 < complete < text.count("\n")
    schema = CSV_SCHEMA if name.startswith("x.csv") else None
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}, line {complete}: truncated "
                                        "or corrupt gzip stream after this line") as e:
        list(open_reader(p, schema=schema, skip_bad_rows=True))
    assert e.value.line == complete
    p.write_bytes(data[:10] + b"\x00" * 50 + data[60:])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        list(open_reader(p, schema=schema))


def test_gzip_broken_within_the_first_line(tmp_path):
    data = gzip.compress(("label,user\n" + "1,u\n" * 10).encode())
    p = tmp_path / "x.csv.gz"
    p.write_bytes(data[:12])
    with pytest.raises(DataError, match=r"line 1: truncated or corrupt gzip stream within"):
        list(open_reader(p))


def test_libsvm_and_libffm_bad_tokens(tmp_path):
    p = write(tmp_path / "x.libsvm", "1 1:1 2:1\n0 1:1 2\n")
    with pytest.raises(
        DataError, match=r"x\.libsvm, line 2: malformed feature '2' \(expected idx:value\)"
    ):
        list(open_reader(p))
    p = write(tmp_path / "y.libsvm", "1 1:1 2:1\n7 1:1 2:1\n")
    with pytest.raises(DataError, match=r"y\.libsvm, line 2, field 'label'"):
        list(open_reader(p))
    p = write(tmp_path / "z.libsvm", "1 1:1 2:1\n0 1:1 2:1 3:1\n")
    # the column count comes from the first chunk (here its one row)
    with pytest.raises(DataError, match=r"z\.libsvm, line 2: 3 features, more than the 2 columns"):
        list(open_reader(p, chunk_rows=1))
    p = write(tmp_path / "x.ffm", "1 0:1:1\n0 a:1:1\n")
    with pytest.raises(DataError, match=r"x\.ffm, line 2: field id 'a'"):
        list(open_reader(p))


def test_skip_bad_rows_counts_warns_and_has_a_ceiling(tmp_path):
    body = ["1,u1,1,a", "1,u2,x,a", "0,u3,3", "2,u4,4,a", "0,u5,5,a", "1,u6,6,a,z", "0,u7,7,b"]
    p = write(tmp_path / "x.csv", "label,user,price,tags\r\n" + "\r\n".join(body) + "\r\n")
    reader = open_reader(p, schema=CSV_SCHEMA, skip_bad_rows=True, chunk_rows=3)
    with pytest.warns(RuntimeWarning, match=r"skipped 4 bad rows"):
        got = rows(reader)
    assert [r["user"] for r in got] == ["u1", "u5", "u7"]
    assert reader.bad_rows == 4 and len(reader.bad_row_messages) == 4
    assert reader.bad_row_messages[0].startswith("line 3, field 'price'")
    with pytest.raises(DataError, match=r"more than max_bad_rows=3 bad rows"):
        list(open_reader(p, schema=CSV_SCHEMA, skip_bad_rows=True, max_bad_rows=3))


def test_skipped_rows_warned_once_per_reader(tmp_path):
    p = write(tmp_path / "x.csv", "label,user,price,tags\n1,u1,1,a\nx,u2,2,a\n0,u3,3\n")
    reader = open_reader(p, schema=CSV_SCHEMA, skip_bad_rows=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = rows(reader), rows(reader)  # e.g. fitting, then encoding
    assert [r["user"] for r in first] == [r["user"] for r in second] == ["u1"]
    assert reader.bad_rows == 2
    assert [str(w.message) for w in caught] == [
        f"{p}: skipped 2 bad rows (first: line 3, field 'label': label must be 0 or 1, got 'x')"
    ]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "libsvm"])
def test_keep_carries_raw_columns_and_names_a_missing_one(tmp_path, fmt):
    if fmt == "libsvm":
        p = write(tmp_path / "x.libsvm", "1 3:1 9:1\n0 4:1\n")
        keep, want = ["f1"], [{"f1": "9"}, {"f1": None}]
        schema = Schema([{"name": "f0", "type": "categorical"},
                         {"name": "f1", "type": "categorical"}])
    else:
        p = write(tmp_path / "x.csv", "id,label,user,price,tags\n007,1,u1,1,a\n008,x,u2,2,a\n"
                                      "009,0,u3,3,b\n")
        if fmt == "parquet":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(p, convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in ("id", "label", "tags")}))
            p = tmp_path / "x.parquet"
            pq.write_table(table, p)
        keep, want = ["id"], [{"id": "007"}, {"id": "009"}]
        schema = CSV_SCHEMA
    with pytest.warns(RuntimeWarning, match="skipped 1 bad rows") if fmt != "libsvm" else \
            warnings.catch_warnings():
        got = rows(open_reader(p, schema=schema, keep=keep, skip_bad_rows=True))
    assert [{k: r[k] for k in keep} for r in got] == want  # the raw text: 007 stays 007
    with pytest.raises(DataError, match=rf"{p.name}.*no column 'nope' to keep \(columns: "):
        list(open_reader(p, schema=schema, keep=["nope"]))


# ---------------------------------------------------------------- real files


def test_real_frappe_csv_and_libsvm_agree():
    csv_path = shared("frappe/valid.csv.gz")
    svm_path = shared("frappe/valid.libsvm.gz")
    schema = infer_schema(csv_path)
    assert schema.names == [
        "user",
        "item",
        "daytime",
        "weekday",
        "isweekend",
        "homework",
        "cost",
        "weather",
        "country",
        "city",
    ]
    assert all(f.type == "categorical" for f in schema.fields) and schema.label == "label"
    fit_schema(schema, csv_path)
    a = load_all(csv_path, schema)
    assert a.batch_size == 57722 and int(a.labels.sum()) == 19063
    # the libsvm copy holds the same rows: rename its positional columns to the CSV names
    renamed = Schema([{**f.to_dict(), "column": f"f{k}"} for k, f in enumerate(schema.fields)])
    b = load_all(svm_path, renamed)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
    assert (a.indices > 0).all()  # every value was seen while fitting


def test_real_criteo_sample_and_xlearn_ffm():
    schema = criteo_schema()
    path = shared("criteo_sample/criteo_sample.csv")
    batch = load_all(path, schema, fmt="criteo")
    assert batch.batch_size == 200 and int(batch.labels.sum()) == 49
    assert batch.dense.shape == (200, 13) and torch.isfinite(batch.dense).all()
    # I12 is missing in 157 rows: those all become the filled value, standardised
    assert (batch.dense[:, 11] == batch.dense[:, 11].min()).sum() >= 157
    missing_c = (batch.indices.view(26, 200) == 0).sum(1)
    assert missing_c.max() >= 9 and missing_c.min() == 0
    ffm = load_all(
        shared("criteo_sample/xlearn_small_train.ffm"),
        infer_schema(shared("criteo_sample/xlearn_small_train.ffm")),
    )
    assert ffm.batch_size == 200 and int(ffm.labels.sum()) == 48
    assert ffm.num_bags == 18
