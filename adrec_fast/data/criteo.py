# SPDX-License-Identifier: Apache-2.0
"""The Criteo click-log layout: its columns and the schema that encodes them.

The raw files are tab-separated ``label, I1..I13, C1..C26`` with no header. ``CriteoReader``
names the columns from here and validates values with ``criteo_schema()`` when given no other
schema; inference and the command line use the same schema.
"""

from __future__ import annotations

from .schema import Schema

#: the feature columns after the label, in file order: 13 integer counts, 26 hashed categories
DENSE_COLUMNS = [f"I{i}" for i in range(1, 14)]
CATEGORICAL_COLUMNS = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = DENSE_COLUMNS + CATEGORICAL_COLUMNS


def criteo_schema(label: str = "label", hash_size: int | None = None, min_count: int = 1) -> Schema:
    """The Criteo layout: I1..I13 dense (sign-preserving log1p then standardised, missing = 0)
    and C1..C26 categorical (built vocabularies, or hashed into ``hash_size`` rows)."""
    fields = [
        {"name": name, "type": "dense", "transform": "log1p_standardize", "fill": 0.0}
        for name in DENSE_COLUMNS
    ]
    for name in CATEGORICAL_COLUMNS:
        spec = {"name": name, "type": "categorical"}
        if hash_size:
            spec.update(vocab="hash", hash_size=hash_size, salt=name)
        else:
            spec["min_count"] = min_count
        fields.append(spec)
    return Schema(fields, label=label)
