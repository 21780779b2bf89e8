# SPDX-License-Identifier: Apache-2.0
"""Encoding of raw serving requests in one native call (``_C.RequestEncoder``).

``RequestEncoder(schema, missing="error")`` is built once from a fitted ``Schema``; its
``encode(user, candidates)`` turns one request into an :data:`EncodedRequest` with the ids and
dense values that ``Schema.encode`` gives the same rows in training (the user values repeated
for every candidate), bit for bit:

- ``user``: {raw column: value}, one value per user/context field; ``candidates``: a dict of
  equal-length columns (lists, tuples or 1-D numpy arrays of bool, int, float, str or object
  dtype) or a list of N dicts (a key absent from some dicts is a missing value there).
- Categorical values: None and "" are missing (id 0); str as is; bool -> "true"/"false"; an
  integer -> its decimal text; a float -> the text training's Arrow cast gives it ("5042" for
  5042.0, "0.1", "1e+10", float32 values with float32's shortest digits). An unseen token gets
  id 0; a hashed field uses the training hash (``columns.stable_hash``); a ``share_with`` field
  reads its owner's vocabulary.
- Dense values: None is missing and becomes the field's ``fill``; text is trimmed and parsed as
  the training reader parses it ("" and "nan" are missing); then log1p / standardisation as the
  schema says; float32. An explicit float NaN is a ``ValueError`` (pass None for a missing value).
  log1p is libm's here and numpy's SIMD kernel in training: their float64 results differ in the
  last bit now and then, which the rounding to float32 absorbed on all of 3.2M values tried.
- Behaviour histories (``sequence`` fields): user-side only; a list, tuple, 1-D array, or text
  split on the field's ``sep``; missing and empty tokens dropped, the last ``max_len`` kept.

Values are read one by one, each by its own type. The training reader types a whole column at
once, which agrees on every column of one value type (with None), the columns training data
holds; a column mixing text with numbers is read there as ``str()`` of every value ("5042.0",
"True"), here as each value's own token ("5042", "true").

Bad requests (every message is written once, in csrc/request_encoder.cpp, and names the field or
column): an unknown column -> ``ValueError`` listing the schema's columns (the label column is
not a feature: giving it is an unknown column); a column on both sides -> ``ValueError``; a
history per candidate -> ``ValueError``; columns of different lengths -> ``ValueError`` naming
the column; no candidates -> ``ValueError`` ("empty ..."); a column that is not a list, tuple or
1-D array, a value of a wrong type, non-numeric dense text -> ``TypeError``; a NaN dense value ->
``ValueError``. A schema column given on neither side -> ``ValueError`` naming every such column
with ``missing="error"`` (the default); with ``missing="default"`` it takes its training default
(categorical id 0, dense ``fill`` transformed, an empty history).

Text fields (``RequestEncoder(schema, missing, text={field: values})``): a categorical bag after
the schema's bags whose vocabulary is the values the Scorer packed (value i -> id i + 1), closed:
a value that is neither None nor one of them (a new text, "", a number) raises
``_C.UnknownValue`` (a ``KeyError``), on which the Scorer serves the request by the model's
forward, which encodes new texts and names bad ones.

Schemas with pooled ``multi_categorical`` fields or ``vector`` fields are not handled here: the
constructor raises ``NotImplementedError`` naming the field.

The encoder is immutable and thread-safe; ``encode`` holds the GIL while it runs.
"""
from __future__ import annotations

from .. import _C
from ..data.schema import Schema

MISSING = ("error", "default")

#: The result of :meth:`RequestEncoder.encode`, a named tuple (a C struct sequence):
#:
#: - ``n``: number of candidates N (>= 1);
#: - ``cand_slots``: tuple of the bag positions (index in ``schema.sparse_fields()``) of the
#:   categorical fields given per candidate, ascending: the request's field split;
#: - ``user_ids``: int64 [T] ids within each field's table in bag order, 0 at candidate slots
#:   (T = len(schema.sparse_fields()));
#: - ``cand_ids``: int64 [N, Tc] ids of the ``cand_slots`` fields, C-contiguous;
#: - ``dense``: float32 [Nd, Kd] transformed values in ``schema.dense_fields()`` order; Nd = 1
#:   when every dense field is user-side, else N (user-side values repeated);
#: - ``dense_cand``: tuple of the dense positions given per candidate, ascending;
#: - ``seqs``: list of int64 [L] histories, one per ``schema.sequence_fields()`` entry.
EncodedRequest = _C.EncodedRequest
#: Raised by ``encode`` for a text value the encoder was not built with (see the module doc).
UnknownValue = _C.UnknownValue


def describe(schema: Schema, text: dict | None = None) -> list[dict]:
    """The plain description ``_C.RequestEncoder`` is built from: one dict per field, in schema
    order, with its column, kind, position and fitted state. ``text`` {text field: values}: each
    text field is a categorical bag after the schema's bags, value i at id i + 1."""
    if not schema.fitted:
        raise RuntimeError("RequestEncoder needs a fitted schema; call Schema.fit first")
    bag = {name: i for i, (name, _) in enumerate(schema.sparse_fields())}
    n_tables = len(schema.tables())
    for i, name in enumerate(schema.text_fields()):
        bag[name] = len(bag)
        if text is None or name not in text:
            raise NotImplementedError(f"field {name!r}: text fields need their cached values")
    seq = {name: i for i, (name, _) in enumerate(schema.sequence_fields())}
    dense = {name: i for i, name in enumerate(schema.dense_fields())}
    out = []
    for f in schema.fields:
        d = {"name": f.name, "column": f.source}
        if f.type == "vector" or (f.type == "multi_categorical" and not f.sequence):
            kind = "vector" if f.type == "vector" else "pooled multi_categorical"
            raise NotImplementedError(f"field {f.name!r}: {kind} fields are not encoded natively")
        if f.type == "text":
            d.update(kind="categorical", slot=bag[f.name],
                     table=n_tables + schema.text_fields().index(f.name),
                     vocabulary=list(text[f.name]), salt="", hash_size=0, closed=True)
        elif f.type == "dense":
            standardize = f.transform.endswith("standardize")
            d.update(kind="dense", slot=dense[f.name], fill=float(f.fill),
                     log1p=f.transform.startswith("log1p"),
                     mean=float(f.mean) if standardize else None,
                     std=float(f.std) if standardize else None)
        else:
            o = schema.owner(f.name)
            d.update(kind="sequence" if f.sequence else "categorical",
                     slot=seq[f.name] if f.sequence else bag[f.name],
                     table=schema.table_of(f.name),
                     vocabulary=None if o.vocab == "hash" else list(o.vocabulary),
                     salt=o.salt, hash_size=int(o.hash_size))
            if f.sequence:
                d.update(max_len=int(f.max_len), sep=f.sep)
        out.append(d)
    return out


class RequestEncoder:
    """Raw request values -> :data:`EncodedRequest`, as ``schema`` encodes training rows.

    ``missing``: ``"error"`` (default) makes a schema column given on neither side an error
    naming it; ``"default"`` gives it its training default instead.
    """

    def __init__(self, schema: Schema, missing: str = "error", text: dict | None = None):
        if missing not in MISSING:
            raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
        self.schema = schema
        self.missing = missing
        self._impl = _C.RequestEncoder(describe(schema, text), schema.label,
                                       missing == "default")
        self.encode = self._impl.encode  # the native method itself: no Python frame per request

    def encode(self, user: dict, candidates) -> EncodedRequest:
        """One request -> :data:`EncodedRequest` (see the module doc for the rules and errors).
        Instances replace this method by the native one."""
        return self._impl.encode(user, candidates)

    @property
    def columns(self) -> list[str]:
        """The raw columns a request may give (each field's source column, once)."""
        return self._impl.columns

    def __repr__(self) -> str:
        return f"RequestEncoder({len(self.columns)} columns, missing={self.missing!r})"


__all__ = ["EncodedRequest", "MISSING", "RequestEncoder", "UnknownValue", "describe"]
