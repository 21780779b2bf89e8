# SPDX-License-Identifier: Apache-2.0
"""Feature schema: field declarations, fitting (vocabularies, dense statistics) and encoding.

A ``Schema`` is a list of field specs plus the label column name. Field types:

- ``categorical``: one value per row. ``vocab="build"`` learns a vocabulary in ``fit`` (values
  seen at least ``min_count`` times, most frequent first) and maps value -> 1..V; ``vocab="hash"``
  maps value -> 1..hash_size-1 with ``stable_hash`` and ``salt``. Id 0 is out-of-vocabulary or
  missing (null or empty text). ``cardinality`` = V + 1, or ``hash_size``. ``vocab="dynamic"``
  needs no fitting: a value becomes a 64-bit key (``stable_hash`` over the whole 64-bit range,
  salted with ``salt``, else the field's name, so that no two dynamic tables share a key; 0 =
  missing) that the model's ``DynamicEmbedding`` maps to a row as values arrive
  (``cardinality`` 0: no fixed rows).
- ``multi_categorical``: a list per row, as a list column or ``sep``-joined text, at most
  ``max_len`` values (the first ones; with ``sequence: true`` the LAST ones, oldest first).
  ``share_with`` names another field whose vocabulary and embedding table it uses; its values
  are counted into that vocabulary when fitting. ``sequence: true`` fields are behaviour
  histories for target attention and go to ``Batch.seq_*``; the others are pooled bags.
- ``dense``: a float with ``transform`` in none | log1p | standardize | log1p_standardize.
  Missing values become ``fill`` first (in raw units). log1p is sign preserving:
  sign(x) * log1p(|x|), so Criteo's few negative counts (-1, -2) stay finite and ordered.
  standardize uses the mean and std of the (filled, log1p'd) training values from ``fit``.
- ``vector``: a precomputed float vector of ``dim`` values (list column, or text separated by
  spaces or '|'); missing gives zeros. A wrong width is an error naming the row and field.
  With ``npy: PATH`` and ``key: COLUMN`` the vectors come from a ``.npy`` file keyed by the id
  in that column instead (:mod:`adrec_fast.data.vectors`).
- ``text``: a raw string (a title, a description), encoded by a frozen sentence encoder
  (``encoder``: all-MiniLM-L6-v2 by default, or a local model directory) into a vector that the
  model projects to its embedding width and treats as one more field; each distinct value is
  encoded once and cached (:mod:`adrec_fast.data.text`). Null is missing; an empty string or a
  value that is not a string is an error naming the row and field. In a ``Batch`` the field is a
  one-element sequence of cache rows (``seq_indices[name]`` [B], 0 = missing).

The schema (with the fitted vocabularies and statistics) is saved as JSON, or YAML for a
``.yaml``/``.yml`` path, and encodes serving rows exactly as it encoded training rows: the
Scorer calls ``lookup`` and ``dense_values``, the same steps ``encode`` takes.

A schema works on columns in memory (Arrow tables, dicts) and never opens a file: inferring
one from a file, or fitting it on a file, goes through :mod:`adrec_fast.data.pipeline`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import columns as C
from .batch import Batch
from .errors import DataError
from .text import encode_text
from .vectors import keyed_vectors

FIELD_TYPES = ("categorical", "multi_categorical", "dense", "vector", "text")
TRANSFORMS = ("none", "log1p", "standardize", "log1p_standardize")
SPARSE_TYPES = ("categorical", "multi_categorical")
SCHEMA_VERSION = 1
VOCABS = ("build", "hash", "dynamic")
#: ``stable_hash``'s modulus for dynamic keys: 1 + h mod (2^64 - 1), wrapped to int64, so every
#: value has its own 64-bit key (never 0, the key of a missing value)
DYNAMIC_HASH_SIZE = 2**64


@dataclass
class Field:
    """One field declaration plus its fitted state (``vocabulary``, ``mean``/``std``)."""

    name: str
    type: str
    vocab: str = "build"  # build | hash | dynamic
    min_count: int = 1
    hash_size: int = 0
    salt: str = ""
    sep: str = "|"
    max_len: int = 0
    share_with: str | None = None
    sequence: bool = False
    transform: str = "none"
    fill: float = 0.0
    dim: int = 0
    encoder: str | None = None  # text fields: the sentence encoder (None: all-MiniLM-L6-v2)
    npy: str | None = None  # vector fields: a .npy of vectors keyed by the id in column ``key``
    key: str | None = None
    column: str | None = None  # raw column name when it differs from the field name
    vocabulary: list[str] | None = None
    mean: float | None = None
    std: float | None = None
    _vocab_arrow: object = field(default=None, repr=False, compare=False)

    @property
    def source(self) -> str:
        return self.column or self.name

    @property
    def is_sparse(self) -> bool:
        return self.type in SPARSE_TYPES

    @property
    def needs_stats(self) -> bool:
        return self.type == "dense" and self.transform.endswith("standardize")

    def to_dict(self) -> dict:
        d: dict = {"name": self.name, "type": self.type}
        if self.column:
            d["column"] = self.column
        if self.type in SPARSE_TYPES:
            if self.type == "multi_categorical":
                d.update(sep=self.sep, max_len=self.max_len, sequence=self.sequence)
            if self.share_with:
                d["share_with"] = self.share_with
            else:
                d["vocab"] = self.vocab
                if self.vocab == "hash":
                    d.update(hash_size=self.hash_size, salt=self.salt)
                elif self.vocab == "dynamic":
                    if self.salt:
                        d["salt"] = self.salt
                else:
                    d["min_count"] = self.min_count
                    if self.vocabulary is not None:
                        d["vocabulary"] = list(self.vocabulary)
        elif self.type == "dense":
            d.update(transform=self.transform, fill=self.fill)
            if self.mean is not None:
                d.update(mean=self.mean, std=self.std)
        elif self.type == "text":
            from .text import encoder_key

            d["encoder"] = encoder_key(self.encoder)
        else:
            d["dim"] = self.dim
            if self.npy:
                d.update(npy=self.npy, key=self.key)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Field:
        if isinstance(d, Field):
            return copy.deepcopy(d)
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"field {d.get('name')!r}: unknown keys {sorted(unknown)}")
        if "name" not in d or "type" not in d:
            raise ValueError(f"a field needs 'name' and 'type': {d}")
        return cls(**d)


def _sign_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _truncate(lengths: np.ndarray, max_len: int, keep_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most max_len of each row's values -> (keep mask [nnz], new lengths [N])."""
    nnz = int(lengths.sum())
    if max_len <= 0 or nnz == 0 or lengths.max() <= max_len:
        return np.ones(nnz, dtype=bool), lengths
    starts = np.cumsum(lengths) - lengths  # [N]
    rows = np.repeat(np.arange(lengths.size), lengths)  # [nnz]
    pos = np.arange(nnz) - starts[rows]  # position inside the row
    if keep_last:
        keep = pos >= (lengths[rows] - max_len)
    else:
        keep = pos < max_len
    return keep, np.minimum(lengths, max_len)


class Schema:
    """Field declarations + label column; fit on data, encode to ``Batch``.

    Fields are kept in declaration order, which fixes the bag order, the dense column order and
    the vector order of the ``Batch``.
    """

    def __init__(self, fields, label: str = "label"):
        self.label = label
        self.fields: list[Field] = [Field.from_dict(f) for f in fields]
        self._by_name = {f.name: f for f in self.fields}
        self._validate()

    # ---------------------------------------------------------------- declaration checks
    def _validate(self) -> None:
        if len(self._by_name) != len(self.fields):
            names = [f.name for f in self.fields]
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate field names: {dup}")
        salts: dict[str, str] = {}  # the key salt of each dynamic table -> its field
        for f in self.fields:
            where = f"field {f.name!r}"
            if f.type not in FIELD_TYPES:
                raise ValueError(f"{where}: unknown type {f.type!r}; expected one of {FIELD_TYPES}")
            if f.source == self.label:
                raise ValueError(f"{where}: the label column {self.label!r} cannot be a feature")
            if f.is_sparse and not f.share_with:
                if f.vocab not in VOCABS:
                    raise ValueError(f"{where}: vocab must be one of {VOCABS}, not {f.vocab!r}")
                if f.vocab == "hash" and f.hash_size < 2:
                    raise ValueError(f"{where}: vocab 'hash' needs hash_size >= 2")
                if f.min_count < 1:
                    raise ValueError(f"{where}: min_count must be >= 1")
            if f.share_with:
                owner = self._by_name.get(f.share_with)
                if owner is None or not owner.is_sparse:
                    raise ValueError(
                        f"{where}: share_with {f.share_with!r} is not a categorical field"
                    )
                if owner.share_with:
                    raise ValueError(f"{where}: share_with {f.share_with!r} itself shares a table")
                if not f.is_sparse:
                    raise ValueError(f"{where}: only (multi_)categorical fields can share a table")
            if f.is_sparse and not f.share_with and f.vocab == "dynamic":
                other = salts.setdefault(f.salt or f.name, f.name)
                if other != f.name:
                    raise ValueError(f"{where}: dynamic tables {other!r} and {f.name!r} hash with "
                                     f"the same salt {f.salt or f.name!r}; give each its own salt")
            if f.sequence and f.type != "multi_categorical":
                raise ValueError(f"{where}: sequence=true needs type multi_categorical")
            if f.type == "multi_categorical" and f.max_len < 0:
                raise ValueError(f"{where}: max_len must be >= 0 (0 = unlimited)")
            if f.type == "dense" and f.transform not in TRANSFORMS:
                raise ValueError(
                    f"{where}: unknown transform {f.transform!r}; expected {TRANSFORMS}"
                )
            if f.type == "vector" and f.dim < 1:
                raise ValueError(f"{where}: vector fields need dim >= 1")
            if (f.npy or f.key) and (f.type != "vector" or not (f.npy and f.key)):
                raise ValueError(f"{where}: npy and key go together, on a vector field")

    # ---------------------------------------------------------------- introspection
    def __repr__(self) -> str:
        kinds = ", ".join(f"{f.name}:{f.type}" for f in self.fields)
        return f"Schema(label={self.label!r}, fields=[{kinds}], fitted={self.fitted})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Schema) and self.to_dict() == other.to_dict()

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> Field:
        return self._by_name[name]

    def owner(self, name: str) -> Field:
        """The field that owns the vocabulary/table ``name`` uses (itself unless share_with)."""
        f = self._by_name[name]
        return self._by_name[f.share_with] if f.share_with else f

    def is_dynamic(self, name: str) -> bool:
        """True when field ``name`` reads a dynamic table (its owner has ``vocab="dynamic"``)."""
        f = self._by_name[name]
        return f.is_sparse and self.owner(name).vocab == "dynamic"

    @property
    def has_dynamic(self) -> bool:
        return any(self.is_dynamic(f.name) for f in self.fields)

    @property
    def fitted(self) -> bool:
        for f in self.fields:
            if f.is_sparse and not f.share_with and f.vocab == "build" and f.vocabulary is None:
                return False
            if f.needs_stats and f.mean is None:
                return False
        return True

    def raw_columns(self) -> list[str]:
        """The input columns encoding needs (label excluded); an ``npy`` vector field reads its
        key column."""
        return list(dict.fromkeys(f.key if f.npy else f.source for f in self.fields))

    def _owners(self) -> list[Field]:
        return [f for f in self.fields if f.is_sparse and not f.share_with]

    def cardinality(self, name: str) -> int:
        """Rows of the embedding table field ``name`` looks up (id 0 = OOV/missing included)."""
        o = self.owner(name)
        if o.vocab == "hash":
            return o.hash_size
        if o.vocab == "dynamic":
            return 0  # rows are given to keys as they arrive
        if o.vocabulary is None:
            raise RuntimeError(f"field {o.name!r}: vocabulary not built yet; call Schema.fit first")
        return len(o.vocabulary) + 1

    def tables(self) -> list[tuple[str, int]]:
        """[(table_name, cardinality)] one per table-owning sparse field, in schema order."""
        return [(f.name, self.cardinality(f.name)) for f in self._owners()]

    def table_of(self, name: str) -> int:
        """Index into ``tables()`` of the table field ``name`` looks up."""
        o = self.owner(name)
        return [f.name for f in self._owners()].index(o.name)

    def sparse_fields(self) -> list[tuple[str, int]]:
        """[(field_name, table_index)] in bag order: categorical + non-sequence multi fields."""
        return [
            (f.name, self.table_of(f.name)) for f in self.fields if f.is_sparse and not f.sequence
        ]

    def sequence_fields(self) -> list[tuple[str, int]]:
        """[(field_name, table_index)] of behaviour-sequence fields."""
        return [(f.name, self.table_of(f.name)) for f in self.fields if f.sequence]

    def table_offsets(self) -> torch.Tensor:
        """[n_tables + 1] int64 first row of each table in one stacked weight buffer."""
        sizes = [c for _, c in self.tables()]
        out = torch.zeros(len(sizes) + 1, dtype=torch.long)
        if sizes:
            out[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.long), 0)
        return out

    def bag_tables(self) -> torch.Tensor:
        """[T] int64 table index of each bag of ``Batch.offsets``."""
        return torch.tensor([t for _, t in self.sparse_fields()], dtype=torch.long)

    def dense_fields(self) -> list[str]:
        return [f.name for f in self.fields if f.type == "dense"]

    @property
    def n_dense(self) -> int:
        return len(self.dense_fields())

    def vector_fields(self) -> list[tuple[str, int]]:
        return [(f.name, f.dim) for f in self.fields if f.type == "vector"]

    @property
    def vector_dim(self) -> int:
        return sum(d for _, d in self.vector_fields())

    def text_fields(self) -> list[str]:
        """Names of the text fields, in schema order (the model's fields after the bags)."""
        return [f.name for f in self.fields if f.type == "text"]

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        return {
            "version": SCHEMA_VERSION,
            "label": self.label,
            "fields": [f.to_dict() for f in self.fields],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Schema:
        version = d.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"schema version {version} is not supported (expected {SCHEMA_VERSION})"
            )
        return cls(d["fields"], label=d.get("label", "label"))

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Schema:
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        """Write JSON, or YAML when ``path`` ends in .yaml/.yml; written atomically."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        else:
            text = self.to_json(indent=1)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> Schema:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return cls.from_dict(yaml.safe_load(text))
        return cls.from_json(text)

    def copy(self) -> Schema:
        return Schema.from_dict(copy.deepcopy(self.to_dict()))

    # ---------------------------------------------------------------- inference
    @classmethod
    def infer_from_table(cls, table, label: str = "label", overrides=None, drop=(),
                         histories: bool = False) -> Schema:
        """Declare a field per column of a sample: integer, string and bool -> categorical,
        float -> dense, list -> multi_categorical (categorical when no row holds two values).
        A string column of ``Field.sep``-joined lists (``Action|Comedy``: ``_joined_lists``) is
        multi_categorical too.

        ``histories=True`` (for a model that attends over behaviour histories) reads a
        multi-valued column whose values follow one categorical column's values
        (``_history_owner``: a history of clicked items beside the candidate item) as that
        column's behaviour sequence: ``sequence: true``, ``share_with`` the column, its last
        ``max_len`` values kept. Other multi-valued columns stay pooled bags.

        ``overrides`` maps a column to a type name or to a partial spec dict; ``drop`` lists
        columns to leave out. Dense fields get ``log1p_standardize`` when the sample is
        non-negative with values above 100 (count-like), else ``standardize``.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        overrides = dict(overrides or {})
        drop = set(drop or ())
        cols = _as_columns(table)
        missing = (set(overrides) | drop) - set(cols)
        if missing:
            raise ValueError(f"overrides/drop name columns absent from the data: {sorted(missing)}")
        fields = []
        for name, col in cols.items():
            if name == label or name in drop:
                continue
            arr = C.to_arrow(col)
            t = arr.type
            spec: dict = {"name": name}
            if pa.types.is_floating(t):
                spec["type"] = "dense"
                x = arr.to_numpy(zero_copy_only=False)
                x = x[np.isfinite(x)]
                count_like = x.size and x.min() >= 0 and x.max() > 100
                spec["transform"] = "log1p_standardize" if count_like else "standardize"
            elif C.is_list(t):
                longest = pc.max(pc.list_value_length(arr)).as_py() or 0
                spec["type"] = "multi_categorical" if longest > 1 else "categorical"
                if longest > 1:
                    spec["max_len"] = int(longest)
            elif (longest := _joined_lists(arr)) > 1:
                spec.update(type="multi_categorical", max_len=longest)
            else:
                spec["type"] = "categorical"
            o = overrides.get(name)
            if isinstance(o, str):
                if o not in FIELD_TYPES:
                    raise ValueError(
                        f"override for {name!r}: unknown type {o!r}; expected {FIELD_TYPES}"
                    )
                spec = {"name": name, "type": o}
                if o == "dense":
                    spec["transform"] = "standardize"
            elif isinstance(o, dict):
                spec = {**spec, **o}
                if "type" in o and o["type"] != "dense":
                    spec.pop("transform", None)
            fields.append(spec)
        if histories:
            _mark_histories(fields, cols, overrides)
        return cls(fields, label=label)

    # ---------------------------------------------------------------- fitting
    def fit(self, source, max_rows: int | None = None) -> Schema:
        """Build vocabularies and dense statistics in one streaming pass; returns self.

        ``source``: a reader, an iterable of chunks (pa.Table / dict of columns), or a single
        chunk (a file: ``adrec_fast.data.fit_schema(schema, path)``). Refitting starts from
        scratch. Vocabulary order: count descending, then value ascending (deterministic).
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(source, (str, Path)):
            raise TypeError(f"Schema.fit takes chunks of columns, not the path {str(source)!r}; "
                            "fit on a file with adrec_fast.data.fit_schema(schema, path)")
        if _is_chunk(source):
            source = [source]
        owners = [f for f in self._owners() if f.vocab == "build"]
        # owner -> [merged pa.Table(v, c), per-chunk tables since]; merged again when the
        # pending tables outgrow it, so each value is re-aggregated O(log chunks) times and
        # at most twice the distinct values are held (the file itself never is)
        counts: dict[str, list] = {f.name: [] for f in owners}

        def merge(tables):
            if len(tables) == 1:
                return tables[0]
            g = pa.concat_tables(tables).group_by("v").aggregate([("c", "sum")])
            return pa.table({"v": g["v"], "c": g["c_sum"]})
        stats = {f.name: [0, 0.0, 0.0] for f in self.fields if f.needs_stats}  # n, mean, M2
        seen = 0
        for chunk in source:
            cols = _as_columns(chunk)
            n = _n_rows(cols)
            if max_rows is not None and seen + n > max_rows:
                cols = {k: C.to_arrow(v).slice(0, max_rows - seen) for k, v in cols.items()}
                n = max_rows - seen
            seen += n
            for f in self.fields:
                o = self.owner(f.name)
                if f.is_sparse and o.name in counts:
                    col = self._column(cols, f, n)
                    if f.type == "categorical":
                        toks, _ = C.tokens(col)
                    else:
                        toks, _ = C.token_lists(col, f.sep)
                    toks = toks.filter(
                        pc.and_(pc.is_valid(toks), pc.not_equal(toks, "")).fill_null(False)
                    )
                    vc = pc.value_counts(toks)
                    t = pa.table(
                        {"v": vc.field("values").cast(pa.string()), "c": vc.field("counts")}
                    )
                    tables = counts[o.name]
                    tables.append(t)
                    if sum(x.num_rows for x in tables[1:]) >= tables[0].num_rows:
                        counts[o.name] = [merge(tables)]
                elif f.type == "text":  # every distinct value encoded once, here
                    encode_text(self._column(cols, f, n), f)
                elif f.name in stats:
                    x = self._dense_prestandardize(f, self._column(cols, f, n))
                    acc = stats[f.name]
                    m = x.size
                    if m:
                        mean_b = float(x.mean())
                        m2_b = float(((x - mean_b) ** 2).sum())
                        tot = acc[0] + m
                        delta = mean_b - acc[1]
                        acc[1] += delta * m / tot
                        acc[2] += m2_b + delta * delta * acc[0] * m / tot
                        acc[0] = tot
            if max_rows is not None and seen >= max_rows:
                break
        for f in owners:
            t = merge(counts[f.name]) if counts[f.name] else None
            if t is None or t.num_rows == 0:
                f.vocabulary = []
            else:
                t = t.filter(pc.greater_equal(t["c"], f.min_count))
                t = t.sort_by([("c", "descending"), ("v", "ascending")])
                f.vocabulary = t["v"].to_pylist()
            f._vocab_arrow = None
        for f in self.fields:
            if f.name in stats:
                n, mean, m2 = stats[f.name]
                std = math.sqrt(m2 / n) if n else 1.0
                f.mean = float(mean) if n else 0.0
                f.std = float(std) if std > 1e-12 else 1.0
        return self

    # ---------------------------------------------------------------- encoding
    def _column(self, cols: dict, f: Field, n: int):
        import pyarrow as pa

        col = cols.get(f.source)
        if col is None:
            if f.source in cols:  # an explicit None column
                return pa.nulls(n)
            raise DataError(
                f"input has no column {f.source!r} (columns: {sorted(cols)})", field=f.name
            )
        return col

    def _dense_prestandardize(self, f: Field, col) -> np.ndarray:
        x, bad = C.to_float(col)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"non-numeric value in dense field (row {row + 1} of the input)", field=f.name
            )
        x = np.where(np.isnan(x), f.fill, x)
        if f.transform.startswith("log1p"):
            x = _sign_log1p(x)
        return x

    def dense_values(self, name: str, values) -> np.ndarray:
        """Raw values of dense field ``name`` (list, numpy or Arrow column; None/NaN =
        missing) -> [n] float32 after its fill, log1p and standardisation, as ``encode`` gives
        them. Raises ``DataError`` for a non-numeric value."""
        f = self.field(name)
        if f.type != "dense":
            raise ValueError(f"field {name!r} is {f.type}, not dense")
        x = self._dense_prestandardize(f, values)
        if f.needs_stats:
            if f.mean is None:
                raise RuntimeError(f"field {name!r}: statistics not fitted; call Schema.fit first")
            x = (x - f.mean) / f.std
        return x.astype(np.float32)

    def lookup(self, name: str, tokens) -> np.ndarray:
        """Tokens of sparse field ``name`` (a pyarrow string array, nulls = missing) -> [n]
        int64 ids within the table the field reads (its ``share_with`` owner's); 0 = never
        seen in training, or missing; for a dynamic table the 64-bit keys (0 = missing).
        ``columns.tokens`` turns raw values into tokens."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not self.field(name).is_sparse:
            raise ValueError(f"field {name!r} is {self.field(name).type}, not categorical")
        o = self.owner(name)
        if o.vocab == "hash":
            return C.stable_hash(tokens, o.salt, o.hash_size)
        if o.vocab == "dynamic":
            return C.stable_hash(tokens, o.salt or o.name, DYNAMIC_HASH_SIZE)
        if o.vocabulary is None:
            raise RuntimeError(f"field {o.name!r}: vocabulary not built yet; call Schema.fit first")
        if o._vocab_arrow is None:
            o._vocab_arrow = pa.array(o.vocabulary, type=pa.string())
        if len(tokens) == 0:
            return np.zeros(0, dtype=np.int64)
        pos = pc.index_in(tokens, value_set=o._vocab_arrow)
        return pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1

    def encode(self, data) -> Batch:
        """Raw columns -> ``Batch``. ``data``: pa.Table/RecordBatch or a dict of columns
        (lists, numpy arrays, pa arrays). Raises ``DataError`` for values it cannot convert.
        Without a label column, ``Batch.labels`` is NaN.
        """
        cols = _as_columns(data)
        n = _n_rows(cols)
        lengths_all, ids_all = [], []
        seq_i, seq_o = {}, {}
        dense, vectors = [], []
        for f in self.fields:
            col = None if f.npy else self._column(cols, f, n)  # npy: the key column, below
            if f.type == "categorical":
                toks, bad = C.tokens(col)
                if bad.any():
                    row = int(np.flatnonzero(bad)[0]) + 1
                    raise DataError(
                        f"row {row} holds several values; declare the field multi_categorical",
                        field=f.name,
                    )
                ids_all.append(self.lookup(f.name, toks))
                lengths_all.append(np.ones(n, dtype=np.int64))
            elif f.type == "multi_categorical":
                toks, lengths = C.token_lists(col, f.sep)
                ids = self.lookup(f.name, toks)
                keep, lengths = _truncate(lengths, f.max_len, keep_last=f.sequence)
                ids = ids[keep]
                if f.sequence:
                    so = torch.zeros(n + 1, dtype=torch.long)
                    torch.cumsum(torch.from_numpy(lengths), 0, out=so[1:])
                    seq_i[f.name] = torch.from_numpy(ids)
                    seq_o[f.name] = so
                else:
                    ids_all.append(ids)
                    lengths_all.append(lengths)
            elif f.type == "dense":
                dense.append(self.dense_values(f.name, col))
            elif f.type == "text":
                seq_i[f.name] = torch.from_numpy(encode_text(col, f))  # [n] cache rows
                seq_o[f.name] = torch.arange(n + 1, dtype=torch.long)
            elif f.npy:
                vectors.append(keyed_vectors(self._column(cols, Field(f.key, "categorical"), n), f))
            else:
                v, bad = C.to_vectors(col, f.dim)
                if bad.any():
                    row = int(np.flatnonzero(bad)[0]) + 1
                    raise DataError(f"row {row}: expected {f.dim} numeric values", field=f.name)
                vectors.append(v)
        if ids_all:
            indices = torch.from_numpy(np.concatenate(ids_all))
            lengths = torch.from_numpy(np.concatenate(lengths_all))
        else:
            indices = torch.zeros(0, dtype=torch.long)
            lengths = torch.zeros(0, dtype=torch.long)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        if self.label in cols and cols[self.label] is not None:
            y, bad = C.to_label(cols[self.label])
            if bad.any():
                row = int(np.flatnonzero(bad)[0]) + 1
                raise DataError(f"row {row}: label must be 0 or 1", field=self.label)
            labels = torch.from_numpy(y.astype(np.float32))
        else:
            labels = torch.full((n,), float("nan"))
        return Batch(
            indices=indices,
            offsets=offsets,
            dense=torch.from_numpy(np.stack(dense, 1)) if dense else torch.zeros(n, 0),
            labels=labels,
            vectors=torch.from_numpy(np.concatenate(vectors, 1)) if vectors else torch.zeros(n, 0),
            num_bags=len(lengths_all),
            seq_indices=seq_i,
            seq_offsets=seq_o,
        )

    def encode_columns(self, columns: dict) -> Batch:
        """Serving path: a dict of column -> list/array. Absent columns count as all missing."""
        n = _n_rows({k: v for k, v in columns.items() if v is not None}) if columns else 0
        cols = dict(columns)
        for name in self.raw_columns():
            if name not in cols:
                cols[name] = [None] * n
        return self.encode(cols)

    def encode_rows(self, rows: list[dict]) -> Batch:
        """Serving path: a list of raw rows (dicts). Missing keys are missing values; values
        never seen in training map to id 0; missing dense values become ``fill``."""
        names = self.raw_columns() + ([self.label] if any(self.label in r for r in rows) else [])
        return self.encode({k: [r.get(k) for r in rows] for k in names})


def _is_chunk(x) -> bool:
    import pyarrow as pa

    return isinstance(x, (pa.Table, pa.RecordBatch, dict))


#: A string column is read as ``sep``-joined lists when at least this share of its non-empty
#: sampled values hold the separator (and none of those holds a space, which prose would).
JOINED_LIST_SHARE = 0.01

#: ``infer_from_table(histories=True)``: a multi-valued column is a categorical column's
#: behaviour history when their sampled value distributions overlap at least this much
#: (histogram intersection, ``_history_owner``). In a 20k-row sample of the synthetic
#: generator's CSV its history overlaps its item column by 0.83, its user column by 0.21 and
#: each other column by at most 0.12.
HISTORY_OVERLAP = 0.5


def _joined_lists(arr) -> int:
    """The longest list of a string column of ``Field.sep``-joined lists (``Action|Comedy``),
    0 when the column is not one (not text, too few values hold the separator, or text with
    spaces around it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return 0
    sep = Field.sep
    values = arr.filter(pc.and_(pc.is_valid(arr), pc.not_equal(arr, "")).fill_null(False))
    joined = values.filter(pc.match_substring(values, sep))
    if len(joined) == 0 or len(joined) < JOINED_LIST_SHARE * len(values):
        return 0
    if pc.any(pc.match_substring(joined, " ")).as_py():
        return 0
    # empty pieces (``|a||b|``) hold no value: the longest list counts the others
    pieces = pc.split_pattern(pc.utf8_trim(joined, sep), sep)
    flat = pc.list_flatten(pieces)
    rows = pc.list_parent_indices(pieces)
    kept = pc.not_equal(flat, "")
    counts = np.bincount(rows.to_numpy(), weights=kept.to_numpy(zero_copy_only=False),
                         minlength=len(joined))
    return int(counts.max()) if counts.size else 0


def _string_values(arr, joined: bool):
    """The values of a sampled column as strings (the elements of a list column, or with
    ``joined`` of a ``Field.sep``-joined text column), nulls and empty text left out: what a
    vocabulary would be built from."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if C.is_list(arr.type):
        arr = pc.list_flatten(arr)
    elif joined and (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.list_flatten(pc.split_pattern(arr, Field.sep))
    arr = arr.drop_null().cast(pa.string())
    return arr.filter(pc.not_equal(arr, ""))


def _frequencies(arr) -> dict:
    """{value: share of the sampled values} of a string array."""
    vc = arr.value_counts()
    n = max(len(arr), 1)
    return {v: c / n for v, c in zip(vc.field("values").to_pylist(),
                                     vc.field("counts").to_pylist())}


def _history_owner(values: dict, candidates: dict) -> str | None:
    """The categorical column whose values a multi-valued column's values are drawn from.
    ``values``: the list elements' ``_frequencies``; ``candidates``: ``{name: its sampled
    values' _frequencies}``. The candidate whose value distribution overlaps the elements' most,
    by histogram intersection (the sum over values of the smaller of the two shares: 1 for the
    same distribution, 0 for disjoint values), when that is at least ``HISTORY_OVERLAP``.
    Comparing distributions, not value sets, tells an item column from a user column when both
    hold small integers: a history of clicked items follows the items' popularity, not the
    users'."""
    best, best_overlap = None, HISTORY_OVERLAP
    for name, freq in candidates.items():
        overlap = sum(min(p, freq.get(v, 0.0)) for v, p in values.items())
        if overlap >= best_overlap:
            best, best_overlap = name, overlap
    return best


def _mark_histories(fields: list[dict], cols: dict, overrides) -> None:
    """``infer_from_table(histories=True)``: make each inferred multi-valued field whose values
    follow a categorical field's (``_history_owner``) that field's behaviour sequence. A field
    the overrides declare is left as declared."""
    overrides = overrides or {}
    multi = [f for f in fields if f.get("type") == "multi_categorical"
             and f["name"] not in overrides and not f.get("share_with")]
    if not multi:
        return
    singles = {f["name"]: _frequencies(_string_values(C.to_arrow(cols[f["name"]]), False))
               for f in fields if f.get("type") == "categorical" and not f.get("share_with")}
    for f in multi:
        values = _string_values(C.to_arrow(cols[f["name"]]), True)
        owner = _history_owner(_frequencies(values), singles)
        if owner is not None:
            f.update(sequence=True, share_with=owner)


def _as_columns(data) -> dict:
    import pyarrow as pa

    if isinstance(data, (pa.Table, pa.RecordBatch)):
        return {name: data.column(i) for i, name in enumerate(data.column_names)}
    if isinstance(data, dict):
        return data
    raise TypeError(f"expected a pyarrow Table or a dict of columns, got {type(data).__name__}")


def _n_rows(cols: dict) -> int:
    n = None
    for name, col in cols.items():
        if col is None:
            continue
        m = len(col)
        if n is None:
            n = m
        elif m != n:
            raise DataError(f"column {name!r} has {m} rows but others have {n}")
    return n or 0
