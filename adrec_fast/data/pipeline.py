# SPDX-License-Identifier: Apache-2.0
"""From files to batches: open a file's reader, infer a schema from it, fit a schema on it, and
iterate encoded ``Batch``es.

The two layers below stay apart: :mod:`~adrec_fast.data.readers` turn files into Arrow chunks
and know nothing of encoding, and :class:`~adrec_fast.data.schema.Schema` declares, fits and
encodes columns in memory and never opens a file. This module joins them. Files larger than
memory, with an encoded cache and a validation split, go through
:func:`adrec_fast.data.stream.load_training_data`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from . import columns as C
from .batch import Batch
from .criteo import criteo_schema
from .errors import DataError
from .readers import Reader, detect_format, open_reader, sniff_csv
from .schema import Schema

# A text column is read as dense when at most this share of its sampled values are not numbers.
STRAY_SHARE = 0.01


def infer_schema(path, fmt: str | None = None, label: str = "label", overrides=None, drop=(),
                 sep: str | None = None, sample_rows: int = 20000, histories: bool = False,
                 **reader_kwargs) -> Schema:
    """A schema declared from a file's sample (not fitted): ``Schema.infer_from_table`` on the
    first ``sample_rows`` rows of a CSV (pyarrow's types; ``sep`` as the reader takes it), on
    the first chunk of the other formats, and ``criteo_schema`` for a Criteo file.

    A CSV column of decimal numbers with a few stray non-numeric values (at most
    ``STRAY_SHARE`` of its sampled values, e.g. one ``abc``) is still inferred as dense, and a
    ``UserWarning`` names the column, the first stray value and its line: reading the file then
    treats such rows as bad rows (an error naming the line, or skipped with ``skip_bad_rows``).
    ``overrides`` maps a column to a type name or a partial spec; ``drop`` leaves columns out;
    ``histories`` reads behaviour-history columns as sequences (``Schema.infer_from_table``).
    """
    fmt = fmt or detect_format(path)
    if fmt == "csv":
        table, line_of = sniff_csv(path, sep=sep, rows=sample_rows)
        skip = set(overrides or ()) | set(drop or ()) | {label}
        for name in table.column_names:
            if name not in skip:
                table = _dense_despite_strays(table, name, line_of, path)
        return Schema.infer_from_table(table, label, overrides, drop, histories)
    if fmt == "criteo" and not overrides and not drop:
        return criteo_schema(label=label)
    reader = open_reader(path, fmt=fmt, label=label, **reader_kwargs)
    first = next(iter(reader), None)
    if first is None:
        raise DataError("no rows to infer a schema from", path=path)
    return Schema.infer_from_table(first, label, overrides, drop, histories)


def fit_schema(schema: Schema, source, max_rows: int | None = None, **reader_kwargs) -> Schema:
    """``schema.fit`` on ``source``: a path (read with ``open_reader``; ``reader_kwargs`` go to
    it), a reader, or chunks. Returns ``schema``, fitted."""
    if isinstance(source, (str, Path)):
        source = open_reader(source, schema=schema, label=schema.label, **reader_kwargs)
    return schema.fit(source, max_rows=max_rows)


def iter_batches(
    path,
    schema: Schema,
    batch_size: int,
    *,
    fmt: str | None = None,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    **reader_kwargs,
):
    """Encoded ``Batch``es of ``batch_size`` rows streamed from ``path`` (or a ``Reader``) with
    a fitted schema.

    ``shuffle`` permutes rows inside each chunk (a chunk-sized shuffle buffer; seeded).
    The last batch is smaller unless ``drop_last``.
    """
    if not schema.fitted:
        raise RuntimeError("iter_batches needs a fitted schema; fit it first with "
                           "fit_schema(schema, path)")
    reader = (
        path
        if isinstance(path, Reader)
        else open_reader(path, fmt=fmt, schema=schema, **reader_kwargs)
    )
    yield from batches_from_chunks(
        reader, schema, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last
    )


def batches_from_chunks(
    chunks,
    schema: Schema,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
):
    """Encode raw chunks with ``schema`` and re-cut them into Batches of ``batch_size`` rows."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    carry = None
    for chunk in chunks:
        enc = schema.encode(chunk)
        if shuffle:
            enc = enc.take(torch.randperm(enc.batch_size, generator=gen))
        if carry is not None:
            enc = Batch.concat([carry, enc])
            carry = None
        start = 0
        while enc.batch_size - start >= batch_size:
            yield enc.slice(start, start + batch_size)
            start += batch_size
        if start < enc.batch_size:
            carry = enc.slice(start, enc.batch_size)
    if carry is not None and carry.batch_size and not drop_last:
        yield carry


def load_all(path, schema: Schema, fmt: str | None = None, **reader_kwargs) -> Batch:
    """The whole (small) file as one ``Batch``; fits ``schema`` on it first if it is not fitted."""
    reader = open_reader(path, fmt=fmt, schema=schema, **reader_kwargs)
    if not schema.fitted:
        schema.fit(reader)
    batches = [schema.encode(chunk) for chunk in reader]
    if not batches:
        return schema.encode({c: [] for c in schema.raw_columns()})
    return Batch.concat(batches)


def _dense_despite_strays(table, name: str, line_of: np.ndarray, path):
    """``table`` with column ``name`` as float64 when its text holds decimal numbers but for a
    few stray values (warned about, with the first one's line); otherwise ``table`` unchanged."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(name)
    if not C.is_text(col.type):
        return table
    x, bad = C.to_float(col)
    n_bad = int(bad.sum())
    numbers = x[np.isfinite(x)]
    if not n_bad or n_bad > STRAY_SHARE * (n_bad + numbers.size):
        return table
    try:  # integers with strays stay categorical, as integer columns are
        pc.cast(pc.utf8_trim_whitespace(col.filter(pa.array(np.isfinite(x)))), pa.int64())
        return table
    except pa.ArrowInvalid:
        pass
    i = int(np.flatnonzero(bad)[0])
    warnings.warn(
        f"{path}: column {name!r} holds decimal numbers but line {int(line_of[i])} has "
        f"{col[i].as_py()!r} ({n_bad} such value{'s' if n_bad > 1 else ''} in the first "
        f"{len(col):,} rows); inferred as dense, so rows with a non-numeric {name!r} are bad "
        "rows (skip them with --skip-bad-rows / skip_bad_rows=True, or declare the column's "
        "type in a schema)",
        UserWarning,
        stacklevel=3,
    )
    return table.set_column(table.column_names.index(name), name, pa.array(x, pa.float64()))
