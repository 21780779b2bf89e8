# SPDX-License-Identifier: Apache-2.0
"""Data layer: feature schema, streaming readers, synthetic default data and metrics.

Imports only torch, numpy and the standard library at module level (pyarrow and yaml lazily),
never the ``adrec_fast`` top level, so it loads while the native extension is being rebuilt.
"""

from .batch import Batch
from .columns import stable_hash
from .errors import DataError
from .metrics import auc, calibration, logloss
from .readers import (
    FORMATS,
    Reader,
    batches_from_chunks,
    detect_format,
    iter_batches,
    load_all,
    open_reader,
)
from .schema import Field, Schema, criteo_schema
from .synthetic import SyntheticCTR

__all__ = [
    "FORMATS",
    "Batch",
    "DataError",
    "Field",
    "Reader",
    "Schema",
    "SyntheticCTR",
    "auc",
    "batches_from_chunks",
    "calibration",
    "criteo_schema",
    "detect_format",
    "iter_batches",
    "load_all",
    "logloss",
    "open_reader",
    "stable_hash",
]
