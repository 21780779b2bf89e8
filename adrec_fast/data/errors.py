# SPDX-License-Identifier: Apache-2.0
"""Errors raised by the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """A malformed input: the message names the file, the 1-based line and the field.

    Attributes ``path``, ``line`` and ``field`` hold the same facts for programs
    (``None`` where unknown, e.g. rows passed in memory at serving time). Parquet errors
    count rows instead of lines (``line_kind='row'``).
    """

    def __init__(self, message: str, *, path=None, line=None, field=None, line_kind: str = "line"):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"{line_kind} {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.reason = message
