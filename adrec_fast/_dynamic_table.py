# SPDX-License-Identifier: Apache-2.0
"""The native key -> row map of the dynamic embedding table (csrc/cpu/dynamic_table.cpp).

A non-tensor utility beside ``_memory``: ``adrec_fast.nn.DynamicEmbedding`` builds one and feeds
the rows it returns to ``functional.embedding_bag``; nothing here is an op.
"""
from __future__ import annotations

from ._C import DynamicTable

#: the row that a key outside the table reads (unknown, not admitted yet, or expired): a real,
#: trainable row of the table, zero at the start
UNADMITTED_ROW = 0

__all__ = ["DynamicTable", "UNADMITTED_ROW"]
