# SPDX-License-Identifier: Apache-2.0
"""Data layer: feature schema, streaming readers, the file-to-batch pipeline, synthetic default
data and metrics.

Layers, each importing only those before it: ``columns``/``batch``/``errors`` (column
conversions, the encoded batch) -> ``schema`` (declare, fit and encode columns in memory) ->
``criteo`` (that dataset's layout) -> ``readers`` (files -> Arrow chunks) -> ``pipeline`` (open,
infer, fit, iterate) -> ``stream`` (files larger than memory) and ``synthetic``.

Imports only torch, numpy and the standard library at module level (pyarrow and yaml lazily),
and nothing of ``adrec_fast`` outside this package, so every other layer can build on it.
"""

from .batch import Batch
from .columns import stable_hash
from .criteo import criteo_schema
from .errors import DataError
from .metrics import auc, calibration, logloss
from .pipeline import batches_from_chunks, fit_schema, infer_schema, iter_batches, load_all
from .readers import FORMATS, Reader, detect_format, open_reader
from .schema import Field, Schema
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
    "fit_schema",
    "infer_schema",
    "iter_batches",
    "load_all",
    "logloss",
    "open_reader",
    "stable_hash",
]
