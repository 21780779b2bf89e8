# SPDX-License-Identifier: Apache-2.0
"""Vector fields: Parquet list-of-float columns and .npy files keyed by an id column."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adrec_fast.data.errors import DataError
from adrec_fast.data.pipeline import load_all
from adrec_fast.data.schema import Schema

VEC = np.arange(12, dtype=np.float32).reshape(4, 3) / 7


def _item():
    return {"name": "item", "type": "categorical", "vocab": "hash", "hash_size": 5}


def test_parquet_list_column(tmp_path):
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"label": [1, 0, 1], "item": ["a", "b", "c"],
                             "img": pa.array([VEC[0].tolist(), None, VEC[2].tolist()],
                                             type=pa.list_(pa.float32()))}), path)
    s = Schema([_item(), {"name": "img", "type": "vector", "dim": 3}])
    b = load_all(path, s)
    np.testing.assert_array_equal(b.vectors.numpy(), np.stack([VEC[0], np.zeros(3), VEC[2]]))


def test_parquet_width_varies_names_row_and_field(tmp_path):
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"label": [1, 0, 1], "item": ["a", "b", "c"],
                             "img": [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0]]}), path)
    s = Schema([_item(), {"name": "img", "type": "vector", "dim": 3}])
    with pytest.raises(DataError, match=r"row 3.*field 'img'.*expected 3 numeric values") as e:
        load_all(path, s)
    assert e.value.field == "img" and e.value.line == 3


def test_npy_keyed(tmp_path):
    st = np.array([("a", VEC[0]), ("b", VEC[1]), ("17", VEC[2])],
                  dtype=[("id", "U8"), ("vector", "f4", 3)])
    np.save(tmp_path / "s.npy", st)
    np.save(tmp_path / "p.npy", VEC)
    s = Schema([_item(),
                {"name": "img", "type": "vector", "dim": 3, "npy": str(tmp_path / "s.npy"),
                 "key": "item"},
                {"name": "pos", "type": "vector", "dim": 3, "npy": str(tmp_path / "p.npy"),
                 "key": "n"}])
    assert s.raw_columns() == ["item", "n"]
    b = s.encode({"item": ["a", "zz", None, 17], "n": [0, 3, 9, None]})
    z = np.zeros(3, dtype=np.float32)
    want = np.stack([np.r_[VEC[0], VEC[0]], np.r_[z, VEC[3]], np.r_[z, z], np.r_[VEC[2], z]])
    np.testing.assert_array_equal(b.vectors.numpy(), want)
    assert Schema.from_dict(s.to_dict()) == s
    # through a file reader: the key column is read, the vector field has no column of its own
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"label": [1, 0], "item": ["b", "a"], "n": [1, 2]}), path)
    np.testing.assert_array_equal(load_all(path, s).vectors.numpy(),
                                  np.stack([np.r_[VEC[1], VEC[1]], np.r_[VEC[0], VEC[2]]]))


def test_npy_bad(tmp_path):
    np.save(tmp_path / "w.npy", VEC)
    s = Schema([_item(), {"name": "img", "type": "vector", "dim": 4,
                          "npy": str(tmp_path / "w.npy"), "key": "item"}])
    with pytest.raises(DataError, match=r"field 'img'.*w.npy: vectors of shape \[3\], the field "
                                        r"declares dim 4"):
        s.encode({"item": ["a"]})
    dup = np.array([("a", VEC[0]), ("a", VEC[1])], dtype=[("id", "U8"), ("vector", "f4", 3)])
    np.save(tmp_path / "d.npy", dup)
    s = Schema([_item(), {"name": "img", "type": "vector", "dim": 3,
                          "npy": str(tmp_path / "d.npy"), "key": "item"}])
    with pytest.raises(DataError, match="ids repeat"):
        s.encode({"item": ["a"]})
    with pytest.raises(ValueError, match="npy and key go together"):
        Schema([_item(), {"name": "img", "type": "vector", "dim": 3, "npy": "x.npy"}])


def test_vector_width_varies_in_memory():
    s = Schema([_item(), {"name": "img", "type": "vector", "dim": 3}])
    with pytest.raises(DataError, match=r"row 2: expected 3 numeric values") as e:
        s.encode({"item": ["a", "b"], "img": [[1.0, 2.0, 3.0], [1.0, 2.0]]})
    assert e.value.field == "img"
