# SPDX-License-Identifier: Apache-2.0
"""Vector fields read from a ``.npy`` file keyed by an id column.

A ``vector`` field with ``npy: PATH`` and ``key: COLUMN`` takes its vectors from the file
instead of a column of the data: row r's vector is the file's vector of the id in column
``key`` of row r. The file is one of

- a structured array with fields ``id`` (integers or strings) and ``vector`` (``dim`` floats):
  ``np.save(path, np.array(list(zip(ids, vecs)), dtype=[("id", "U32"), ("vector", "f4", 512)]))``;
- a plain 2-D float array [K, dim]: the id is the row number (ids 0..K-1 in the key column).

Ids are compared as text (the key column's categorical tokens: 17, 17.0 and "17" are the same
id). An id the file lacks, and a missing id, give the zero vector, as a missing vector does.
A file whose vectors are not ``dim`` wide, or whose ids repeat, is refused naming the field and
the file. Files are read once per process (memory-mapped when plain).
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from . import columns as C
from .errors import DataError

_FILES: dict = {}
_LOCK = threading.Lock()


def _load(path: str, field: str, dim: int):
    """(ids as a pyarrow string array or None for row numbers, vectors [K, dim] float32)."""
    import pyarrow as pa

    key = (str(Path(path).resolve()), dim)
    with _LOCK:
        got = _FILES.get(key)
        if got is not None:
            return got
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the vectors file {path} ({e})", field=field) from None
    if arr.dtype.names:
        if set(arr.dtype.names) != {"id", "vector"}:
            raise DataError(f"{path}: a structured vectors file needs fields 'id' and 'vector', "
                            f"not {list(arr.dtype.names)}", field=field)
        vecs = np.asarray(arr["vector"], dtype=np.float32)
        ids = pa.array([str(x) for x in arr["id"].tolist()], type=pa.string())
        if len(set(ids.to_pylist())) != len(ids):
            raise DataError(f"{path}: ids repeat", field=field)
    else:
        vecs, ids = np.asarray(arr, dtype=np.float32), None
    if vecs.ndim != 2 or vecs.shape[1] != dim:
        raise DataError(f"{path}: vectors of shape {list(vecs.shape[1:])}, the field declares "
                        f"dim {dim}", field=field)
    with _LOCK:
        _FILES[key] = (ids, vecs)
    return ids, vecs


def keyed_vectors(col, field) -> np.ndarray:
    """The key column of an ``npy`` vector field -> float32 [n, dim]."""
    import pyarrow.compute as pc

    ids, vecs = _load(field.npy, field.name, field.dim)
    toks, bad = C.tokens(col)
    if bad.any():
        row = int(np.flatnonzero(bad)[0]) + 1
        raise DataError(f"row {row}: the key column {field.key!r} holds several values",
                        field=field.name)
    n = len(toks)
    out = np.zeros((n, field.dim), dtype=np.float32)
    if ids is None:
        x, nonnum = C.to_float(toks)
        ok = ~np.isnan(x) & ~nonnum & (x >= 0) & (x < vecs.shape[0]) & (x == np.floor(x))
        out[ok] = vecs[x[ok].astype(np.int64)]
    else:
        pos = pc.index_in(toks, value_set=ids).fill_null(-1).to_numpy(zero_copy_only=False)
        ok = pos >= 0
        out[ok] = vecs[pos[ok]]
    return out


__all__ = ["keyed_vectors"]
