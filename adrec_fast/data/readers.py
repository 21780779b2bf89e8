# SPDX-License-Identifier: Apache-2.0
"""Streaming readers: CSV, Criteo TSV, libsvm, libffm and Parquet -> chunks of raw columns.

Every reader yields ``pyarrow.Table`` chunks of at most ``chunk_rows`` rows and never holds the
whole file. Text formats are read in blocks of whole lines (gzip transparently), and each block
is parsed by pyarrow's CSV parser or by pyarrow string kernels, so no Python loop runs per value.
Because blocks are cut on line boundaries, every row keeps its 1-based line number, and errors
name the file, the line and the field. Quoted fields may not contain newlines.

When a schema is given, the chunk holds the schema's columns (and the label): dense columns as
float64 (NaN = missing), vector columns as list<float>, categorical text as strings. Bad rows
(wrong column count, non-numeric dense or vector value, a blank or non-string text value, a
label that is not 0 or 1, a malformed libsvm/libffm token) raise ``DataError``; with
``skip_bad_rows=True`` they are dropped and counted in ``reader.bad_rows``, a ``RuntimeWarning``
reports the count at the end of the pass, and a ``DataError`` is raised once the count exceeds
``max_bad_rows``. A truncated or corrupt gzip stream always raises (the rest of the file is
unreadable).

Readers only turn files into chunks; encoding them, fitting a schema on a file and cutting
batches is :mod:`adrec_fast.data.pipeline`'s work.
"""

from __future__ import annotations

import gzip
import io
import re
import warnings
import zlib
from pathlib import Path

import numpy as np

from . import columns as C
from .criteo import CRITEO_COLUMNS, criteo_schema
from .errors import DataError

FORMATS = ("csv", "criteo", "libsvm", "libffm", "parquet")
_READ_BYTES = 1 << 22


def detect_format(path) -> str:
    """Format from the file name: .csv, .tsv/.txt (Criteo), .libsvm/.svm, .ffm/.libffm,
    .parquet/.pq; a trailing .gz is looked through."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    table = {
        "csv": "csv",
        "tsv": "criteo",
        "txt": "criteo",
        "libsvm": "libsvm",
        "svm": "libsvm",
        "ffm": "libffm",
        "libffm": "libffm",
        "parquet": "parquet",
        "pq": "parquet",
    }
    if ext not in table:
        raise ValueError(
            f"cannot tell the format of {path} from its extension; pass fmt= one of {FORMATS}"
        )
    return table[ext]


def is_gzip(path) -> bool:
    """True when ``path`` starts with the gzip magic bytes (whatever its name says)."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _line_blocks(path, lines_per_block: int):
    """Yield (first_line_number, bytes) blocks of whole lines, each ending in b'\\n'.

    A truncated or corrupt gzip stream raises ``DataError`` at the last line that was read
    completely: pieces are read with ``read1`` (one decompressed buffer at a time), so the text
    decoded before the break is counted rather than lost inside one large ``read``.
    """
    opener = gzip.open if is_gzip(path) else open
    next_line = 1
    pending: list[bytes] = []
    pending_lines = 0
    try:
        with opener(path, "rb") as f:
            while True:
                piece = f.read1(_READ_BYTES)
                if piece:
                    pending.append(piece)
                    pending_lines += piece.count(b"\n")
                while pending_lines >= lines_per_block or (not piece and pending):
                    data = b"".join(pending)
                    if pending_lines >= lines_per_block:
                        nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
                        cut = int(nl[lines_per_block - 1]) + 1
                        block, rest = data[:cut], data[cut:]
                        n = lines_per_block
                    else:
                        block, rest = data, b""
                        if not block.endswith(b"\n"):
                            block += b"\n"
                        n = block.count(b"\n")
                    yield next_line, block
                    next_line += n
                    pending = [rest] if rest else []
                    pending_lines -= n
                    if not pending:
                        pending_lines = 0
                if not piece:
                    return
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise _gzip_error(path, next_line - 1 + pending_lines, e) from None


def _gzip_error(path, complete_lines: int, e) -> DataError:
    """The error for a gzip stream that breaks after ``complete_lines`` whole lines."""
    if complete_lines == 0:
        return DataError(f"truncated or corrupt gzip stream within the first line ({e})",
                         path=path, line=1)
    return DataError(
        f"truncated or corrupt gzip stream after this line, the last one read completely ({e})",
        path=path, line=complete_lines,
    )


def _split_lines(block: bytes):
    """bytes of n lines -> pa string array [n] (CR of CRLF stripped), and line lengths [n]."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = block.decode("utf-8", errors="replace")
    lines = pc.list_flatten(pc.split_pattern(pa.array([text]), "\n"))
    lines = lines.slice(0, len(lines) - 1)  # the block ends with '\n': drop the empty tail
    lines = pc.utf8_rtrim(lines, characters="\r")
    return lines


class Reader:
    """A re-iterable stream of raw chunks from one file (each ``iter`` re-opens the file).

    ``bad_rows`` counts the rows skipped in the current (or last) pass with ``skip_bad_rows``;
    ``bad_row_messages`` keeps the first few reasons. The warning that reports them is given
    once per reader: a later pass over the same file skips the same rows.

    ``keep`` names raw columns to carry through unchanged beside the schema's (e.g. a row key
    for predictions); a name the file lacks raises ``DataError``.
    """

    fmt = ""
    # whether an empty string is how the format writes a missing value (text fields read it as
    # null; a blank one is still an error)
    empty_is_missing = False

    def __init__(
        self,
        path,
        schema=None,
        chunk_rows: int = 65536,
        skip_bad_rows: bool = False,
        max_bad_rows: int = 1000,
        label: str | None = None,
        keep=(),
    ):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no such file: {self.path}")
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        if max_bad_rows < 0:
            raise ValueError(f"max_bad_rows must be >= 0, got {max_bad_rows}")
        self.schema = schema
        self.label = (
            label if label is not None else (schema.label if schema is not None else "label")
        )
        self.chunk_rows = int(chunk_rows)
        self.skip_bad_rows = skip_bad_rows
        self.max_bad_rows = int(max_bad_rows)
        self.bad_rows = 0
        self.bad_row_messages: list[str] = []
        self.rows = 0
        self.keep = list(keep)
        self._warned = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, chunk_rows={self.chunk_rows})"

    def __iter__(self):
        self.bad_rows = 0
        self.bad_row_messages = []
        self.rows = 0
        for chunk in self._chunks():
            if self.keep:
                self._check_keep(chunk.column_names)
            if chunk.num_rows:
                self.rows += chunk.num_rows
                yield chunk
        if self.bad_rows and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.path}: skipped {self.bad_rows} bad rows "
                f"(first: {self.bad_row_messages[0]})",
                RuntimeWarning,
                stacklevel=2,
            )

    def _chunks(self):
        raise NotImplementedError

    def _check_keep(self, names: list[str], line=None) -> None:
        missing = [c for c in self.keep if c not in names]
        if missing:
            raise DataError(
                f"no column {missing[0]!r} to keep (columns: {', '.join(names)})",
                path=self.path,
                line=line,
            )

    # -- bad rows -------------------------------------------------------------------------
    def _problems(
        self, problems: list[tuple[int, str | None, str]], line_kind: str = "line"
    ) -> set[int]:
        """Raise for the first problem, or record the rows (line numbers) to drop."""
        if not problems:
            return set()
        problems.sort(key=lambda p: p[0])
        if not self.skip_bad_rows:
            line, field, msg = problems[0]
            raise DataError(msg, path=self.path, line=line, field=field, line_kind=line_kind)
        lines = {p[0] for p in problems}
        self.bad_rows += len(lines)
        for line, field, msg in problems[: max(0, 5 - len(self.bad_row_messages))]:
            where = f"{line_kind} {line}" + (f", field {field!r}" if field else "")
            self.bad_row_messages.append(f"{where}: {msg}")
        if self.bad_rows > self.max_bad_rows:
            line, field, msg = problems[-1]
            raise DataError(
                f"more than max_bad_rows={self.max_bad_rows} bad rows "
                f"({self.bad_rows} so far); last: {msg}",
                path=self.path,
                line=line,
                field=field,
                line_kind=line_kind,
            )
        return lines

    def _check_values(self, table, line_of: np.ndarray, line_kind: str = "line", problems=None):
        """Validate and convert the label and schema columns of a raw chunk; raise for the first
        problem (including ``problems`` found while parsing) or drop the bad rows."""
        import pyarrow as pa

        problems = list(problems or [])
        out = {}
        n = table.num_rows

        def note(bad, field, describe):
            for i in np.flatnonzero(bad)[: (n if self.skip_bad_rows else 1)]:
                problems.append((int(line_of[i]), field, describe(int(i))))

        if self.label in table.column_names:
            col = table.column(self.label)
            y, bad = C.to_label(col)
            note(bad, self.label, lambda i: f"label must be 0 or 1, got {_show(col[i])}")
            out[self.label] = pa.array(y, type=pa.float64())
        if self.schema is not None:
            for f in self.schema.fields:
                name = f.source
                if name not in table.column_names or name in out:
                    continue
                col = table.column(name)
                if f.type == "dense":
                    x, bad = C.to_float(col)
                    note(
                        bad,
                        f.name,
                        lambda i, col=col: f"non-numeric value {_show(col[i])} for a dense field",
                    )
                    out[name] = pa.array(x, type=pa.float64())
                elif f.type == "vector":
                    v, bad = C.to_vectors(col, f.dim)
                    note(
                        bad,
                        f.name,
                        lambda i, col=col, d=f.dim: (
                            f"expected {d} numeric values, got {_show(col[i])}"
                        ),
                    )
                    flat = pa.array(v.reshape(-1), type=pa.float32())
                    out[name] = pa.FixedSizeListArray.from_arrays(flat, f.dim)
                elif f.type == "text":
                    out[name] = self._text_column(col, f.name, note)
                else:
                    out[name] = col
        for name in table.column_names:
            if name not in out:
                out[name] = table.column(name)
        result = pa.table(out)
        drop = self._problems(problems, line_kind)
        if drop:
            keep = ~np.isin(line_of, np.fromiter(drop, dtype=np.int64))
            result = result.filter(pa.array(keep))
        return result

    def _text_column(self, col, field: str, note):
        """A text field's raw column -> strings (null = missing); a value that is not a string
        and an empty or blank string are noted as bad rows, so the error names the line."""
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
                or pa.types.is_null(arr.type)):
            note(arr.is_valid().to_numpy(zero_copy_only=False), field,
                 lambda i: f"text fields take strings, got {_show(arr[i])} ({arr.type})")
            return pa.nulls(len(arr), pa.string())
        arr = arr.cast(pa.string())
        if self.empty_is_missing:
            arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)
        blank = pc.equal(pc.utf8_trim_whitespace(arr), "").fill_null(False)
        missing = "an empty field" if self.empty_is_missing else "null, not an empty string"
        note(blank.to_numpy(zero_copy_only=False), field,
             lambda i: f"empty text {_show(arr[i])} (a missing value is {missing})")
        return arr


def _show(scalar) -> str:
    v = scalar.as_py() if hasattr(scalar, "as_py") else scalar
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class CSVReader(Reader):
    """Text with a header line (``sep`` sniffed from it when not given: tab if the header holds
    one, else comma); CRLF or LF line ends; empty field = missing. Criteo files in the raw TSV
    form (no header) are read by ``CriteoReader``."""

    fmt = "csv"
    empty_is_missing = True

    def __init__(self, path, sep: str | None = None, header: list[str] | None = None, **kw):
        super().__init__(path, **kw)
        self.sep = sep
        self._header = header  # column names for a header-less file
        self.columns: list[str] | None = None

    def _read_header(self, first_block: bytes) -> tuple[list[str], bytes, int]:
        import csv

        end = first_block.index(b"\n")
        line = first_block[:end].decode("utf-8-sig", errors="replace").rstrip("\r")
        if self.sep is None:
            self.sep = "\t" if "\t" in line else ","
        names = next(csv.reader([line], delimiter=self.sep))
        names = [c.strip() for c in names]
        if len(set(names)) != len(names) or any(not c for c in names):
            raise DataError("the header has empty or repeated column names", path=self.path, line=1)
        return names, first_block[end + 1 :], 2

    def _needed_columns(self, names: list[str]) -> list[str]:
        self._check_keep(names, line=1)
        if self.schema is None:
            return names
        need = self.schema.raw_columns() + self.keep
        missing = [c for c in need if c not in names]
        if missing:
            raise DataError(
                f"columns required by the schema are absent: {missing} (header: {names})",
                path=self.path,
                line=1,
            )
        return [c for c in names if c in need or c == self.label]

    def _read_block(self, block: bytes, names: list[str], on_invalid, convert_options=None):
        """pyarrow's CSV parse of one block of whole lines: this file's separator (no quoting
        in TSV), blank lines kept (so rows stay in step with lines), a malformed row passed to
        ``on_invalid``; ``convert_options`` None lets pyarrow infer the column types."""
        import pyarrow.csv as pcsv

        return pcsv.read_csv(
            io.BytesIO(block),
            read_options=pcsv.ReadOptions(
                column_names=names, use_threads=False, block_size=max(len(block) + 1, 1 << 20)
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=self.sep,
                quote_char=False if self.sep == "\t" else '"',
                ignore_empty_lines=False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=convert_options,
        )

    def _parse_block(self, block: bytes, first_line: int, names: list[str], include: list[str]):
        import pyarrow as pa
        import pyarrow.csv as pcsv

        invalid: list[tuple[int, int, int]] = []

        def on_invalid(row):
            invalid.append((row.number, row.expected_columns, row.actual_columns))
            return "skip"

        # lines that are not UTF-8 are bad rows: blanked here (pyarrow would fail the whole
        # block, naming neither file nor line), reported with the others below
        not_utf8 = [(first_line + i - 1, *_utf8_problem(line, names, self.sep))
                    for i, line in _non_utf8_lines(block)]
        if not_utf8:
            block = _blank_out(block, [ln - first_line + 1 for ln, _, _ in not_utf8])
        table = self._read_block(block, names, on_invalid, pcsv.ConvertOptions(
            column_types={c: pa.string() for c in names},
            include_columns=include,
            strings_can_be_null=False,
        ))
        n_lines = block.count(b"\n")
        local = np.arange(1, n_lines + 1, dtype=np.int64)
        blank = _blank_lines(block, n_lines)
        problems = []
        if invalid:
            skipped = np.array([r[0] for r in invalid], dtype=np.int64)
            if (skipped < 1).any() or (skipped > n_lines).any():
                raise DataError("could not locate a malformed row", path=self.path, line=first_line)
            real = [r for r in invalid if not blank[r[0] - 1]]
            problems = [
                (first_line + r[0] - 1, None, f"expected {r[1]} columns, found {r[2]}")
                for r in real
            ]
            local = np.setdiff1d(local, skipped)
        line_of = first_line + local - 1  # [rows] line number of every parsed row
        if len(line_of) != table.num_rows:
            raise DataError(
                "rows and lines went out of step (a quoted newline?)",
                path=self.path,
                line=first_line,
            )
        rows_blank = blank[local - 1]
        if rows_blank.any():
            table = table.filter(pa.array(~rows_blank))
            line_of = line_of[~rows_blank]
        return table, line_of, problems + not_utf8

    def _chunks(self):
        names = self._header
        for first_line, block in _line_blocks(self.path, self.chunk_rows):
            if names is None:
                names, block, first_line = self._read_header(block)
                if not block:
                    continue
            elif self.sep is None:
                self.sep = "\t"
            self.columns = names
            include = self._needed_columns(names)
            table, line_of, problems = self._parse_block(block, first_line, names, include)
            # rows with a wrong column count never reached the table: pyarrow skipped them
            yield self._check_values(table, line_of, problems=problems)
        if names is None and self._header is None:
            raise DataError("empty file: no header line", path=self.path, line=1)


def _non_utf8_lines(block: bytes) -> list[tuple[int, bytes]]:
    """(1-based number, bytes) of the lines of ``block`` that are not UTF-8; a block that is
    ASCII or UTF-8 as a whole (every usual file) is checked in one pass."""
    if block.isascii():
        return []
    try:
        block.decode("utf-8")
        return []
    except UnicodeDecodeError:
        pass
    out = []
    for i, line in enumerate(block.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            out.append((i, line))
    return out


def _utf8_problem(line: bytes, names: list[str], sep: str | None) -> tuple[str | None, str]:
    """(field, message) for a line that is not UTF-8: the first column holding a byte that is
    not (None when the line does not split into the header's columns)."""
    import csv

    msg = "not UTF-8 text"
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = f"not UTF-8 text (byte 0x{line[e.start]:02x})"
    text = line.decode("utf-8", "surrogateescape").rstrip("\r")
    quote = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    values = next(csv.reader([text], delimiter=sep or ",", quoting=quote), [])
    for name, v in zip(names, values):
        if any("\udc80" <= ch <= "\udcff" for ch in v):
            return name, msg
    return None, msg


def _blank_out(block: bytes, lines: list[int]) -> bytes:
    """``block`` with the lines numbered ``lines`` (1-based) emptied, newlines kept, so that the
    other rows keep their line numbers."""
    parts = block.split(b"\n")
    for i in lines:
        parts[i - 1] = b""
    return b"\n".join(parts)


def _blank_lines(block: bytes, n_lines: int) -> np.ndarray:
    """[n_lines] True where a line is empty (or only '\\r')."""
    b = np.frombuffer(block, dtype=np.uint8)
    nl = np.flatnonzero(b == 10)[:n_lines]
    starts = np.r_[0, nl[:-1] + 1]
    length = nl - starts
    cr = np.zeros(n_lines, dtype=bool)
    has = length > 0
    cr[has] = b[nl[has] - 1] == 13
    return (length == 0) | ((length == 1) & cr)


class CriteoReader(CSVReader):
    """Criteo: label, I1..I13, C1..C26. The raw form is tab-separated with no header; a file
    whose first line starts with a non-numeric token (e.g. the header ``label,I1,...``) is read
    as CSV with that header. Without a schema, ``criteo_schema()`` validates the values."""

    fmt = "criteo"

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        if self.schema is None:
            self.schema = criteo_schema(label=self.label)

    def _chunks(self):
        opener = gzip.open if is_gzip(self.path) else open
        try:
            with opener(self.path, "rb") as f:
                first = f.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n")
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise _gzip_error(self.path, 0, e) from None
        if self.sep is None:
            self.sep = "\t" if "\t" in first else ","
        token = first.split(self.sep, 1)[0].strip()
        if re.fullmatch(r"[-+]?\d+(\.\d*)?", token) or not first:
            self._header = [self.label] + CRITEO_COLUMNS
        yield from super()._chunks()


class LibSVMReader(Reader):
    """libsvm: ``label idx:value idx:value ...``. Feature values are not kept (every listed
    feature counts as present, as in Frappe/Criteo one-hot files).

    ``layout="position"`` (default): the k-th feature of a row goes to column ``f{k}`` (k from
    0), one categorical value each; the number of columns comes from the schema's ``f{k}``
    fields or else from the longest row of the first chunk, and a longer row is bad.
    ``layout="bag"``: all features of a row form one list column ``features``.
    """

    fmt = "libsvm"
    parts = 2

    def __init__(self, path, layout: str = "position", **kw):
        super().__init__(path, **kw)
        if layout not in ("position", "bag"):
            raise ValueError("layout must be 'position' or 'bag'")
        self.layout = layout
        self.n_fields: int | None = None
        if self.schema is not None:
            ks = [
                int(m.group(1))
                for c in self.schema.raw_columns() + self.keep
                if (m := re.fullmatch(r"f(\d+)", c))
            ]
            self.n_fields = max(ks) + 1 if ks else 0

    def _tokenize(self, first_line: int, block: bytes):
        """-> labels raw, flat feature tokens, token row ids, token positions, line_of, problems."""
        import pyarrow as pa
        import pyarrow.compute as pc

        lines = pc.utf8_trim_whitespace(_split_lines(block))
        n_lines = len(lines)
        line_of = first_line + np.arange(n_lines, dtype=np.int64)
        nonblank = pc.not_equal(lines, "").to_numpy(zero_copy_only=False)
        if not nonblank.all():
            lines = lines.filter(pa.array(nonblank))
            line_of = line_of[nonblank]
        toks = pc.split_pattern_regex(lines, r"\s+")
        n_tok = pc.list_value_length(toks).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(toks)
        rows = np.repeat(np.arange(len(lines), dtype=np.int64), n_tok)
        starts = np.cumsum(n_tok) - n_tok
        pos = np.arange(len(flat), dtype=np.int64) - starts[rows]
        label = flat.take(pa.array(starts))
        is_feat = pos > 0
        feats = flat.filter(pa.array(is_feat))
        parts = pc.split_pattern(feats, ":")
        nparts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
        problems = []
        wrong = nparts != self.parts
        f_rows = rows[is_feat]
        f_pos = pos[is_feat] - 1
        shape = "idx:value" if self.parts == 2 else "field:feature:value"
        for i in np.flatnonzero(wrong)[: (len(wrong) if self.skip_bad_rows else 1)]:
            problems.append(
                (
                    int(line_of[f_rows[i]]),
                    None,
                    f"malformed feature {_show(feats[int(i)])} (expected {shape})",
                )
            )
        ok = ~wrong
        parts = parts.filter(pa.array(ok))
        f_rows, f_pos = f_rows[ok], f_pos[ok]
        return label, parts, f_rows, f_pos, line_of, problems

    def _chunks(self):
        import pyarrow as pa
        import pyarrow.compute as pc

        for first_line, block in _line_blocks(self.path, self.chunk_rows):
            label, parts, f_rows, f_pos, line_of, problems = self._tokenize(first_line, block)
            n = len(label)
            value = pc.list_element(parts, self.parts - 1)
            _, vbad = C.to_float(value)
            for i in np.flatnonzero(vbad)[: (len(vbad) if self.skip_bad_rows else 1)]:
                problems.append(
                    (
                        int(line_of[f_rows[i]]),
                        None,
                        f"non-numeric feature value {_show(value[int(i)])}",
                    )
                )
            cols = {self.label: label}
            cols.update(self._columns(parts, f_rows, f_pos, n, line_of, problems))
            yield self._check_values(pa.table(cols), line_of, problems=problems)

    def _columns(self, parts, f_rows, f_pos, n, line_of, problems):
        import pyarrow as pa
        import pyarrow.compute as pc

        idx = pc.list_element(parts, 0)
        if self.layout == "bag":
            counts = np.bincount(f_rows, minlength=n)
            offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
            return {"features": pa.ListArray.from_arrays(pa.array(offsets), idx)}
        if self.n_fields is None:
            self.n_fields = int(f_pos.max()) + 1 if len(f_pos) else 0
        over = f_pos >= self.n_fields
        for i in np.flatnonzero(over)[: (len(over) if self.skip_bad_rows else 1)]:
            count = int((f_rows == f_rows[i]).sum())
            problems.append(
                (
                    int(line_of[f_rows[i]]),
                    None,
                    f"{count} features, more than the {self.n_fields} columns "
                    f"f0..f{self.n_fields - 1}",
                )
            )
        out = {}
        for k in range(self.n_fields):
            sel = np.flatnonzero(f_pos == k)
            take = np.full(n, -1, dtype=np.int64)
            take[f_rows[sel]] = sel
            out[f"f{k}"] = idx.take(pa.array(take, mask=take < 0))
        return out


class LibFFMReader(LibSVMReader):
    """libffm: ``label field:feature:value ...``. Field ``k`` becomes the list column ``f{k}``
    (several features of one field in a row stay together: a multi_categorical field, or a
    categorical one when each row holds at most one). Feature values are not kept. Columns are
    the schema's ``f{k}`` fields, or else the fields seen in the first chunk."""

    fmt = "libffm"
    parts = 3

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        self.fields: list[int] | None = None
        if self.schema is not None:
            self.fields = sorted(
                int(m.group(1))
                for c in set(self.schema.raw_columns() + self.keep)
                if (m := re.fullmatch(r"f(\d+)", c))
            )

    def _columns(self, parts, f_rows, f_pos, n, line_of, problems):
        import pyarrow as pa
        import pyarrow.compute as pc

        field_raw = pc.list_element(parts, 0)
        fid, fbad = C.to_float(field_raw)
        fbad |= np.isnan(fid) | (fid < 0) | (fid != np.floor(fid))
        for i in np.flatnonzero(fbad)[: (len(fbad) if self.skip_bad_rows else 1)]:
            problems.append(
                (
                    int(line_of[f_rows[i]]),
                    None,
                    f"field id {_show(field_raw[int(i)])} is not a non-negative integer",
                )
            )
        fid = np.where(fbad, -1, fid).astype(np.int64)
        feat = pc.list_element(parts, 1)
        if self.fields is None:
            self.fields = sorted(int(k) for k in np.unique(fid[fid >= 0]))
        out = {}
        for k in self.fields:
            sel = np.flatnonzero(fid == k)  # tokens are in row order, so sel is grouped by row
            counts = np.bincount(f_rows[sel], minlength=n)
            offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
            out[f"f{k}"] = pa.ListArray.from_arrays(pa.array(offsets), feat.take(pa.array(sel)))
        return out


class ParquetReader(Reader):
    """Parquet through pyarrow, one row group slice of ``chunk_rows`` at a time. Errors name
    the 1-based row number. List columns feed multi_categorical and vector fields."""

    fmt = "parquet"

    def _chunks(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"not a readable Parquet file ({e})", path=self.path) from None
        names = pf.schema_arrow.names
        columns = None
        if self.schema is not None:
            self._check_keep(names)
            need = self.schema.raw_columns() + self.keep
            missing = [c for c in need if c not in names]
            if missing:
                raise DataError(
                    f"columns required by the schema are absent: {missing}", path=self.path
                )
            columns = [c for c in names if c in need or c == self.label]
        first = 1
        try:
            for rb in pf.iter_batches(
                batch_size=self.chunk_rows, columns=columns, use_threads=False
            ):
                table = pa.Table.from_batches([rb])
                line_of = first + np.arange(table.num_rows, dtype=np.int64)
                first += table.num_rows
                yield self._check_values(table, line_of, line_kind="row")
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(
                f"corrupt Parquet data ({e})", path=self.path, line=first, line_kind="row"
            ) from None


_READERS = {
    "csv": CSVReader,
    "criteo": CriteoReader,
    "libsvm": LibSVMReader,
    "libffm": LibFFMReader,
    "parquet": ParquetReader,
}


def open_reader(
    path,
    fmt: str | None = None,
    schema=None,
    chunk_rows: int = 65536,
    skip_bad_rows: bool = False,
    max_bad_rows: int = 1000,
    label: str | None = None,
    **options,
) -> Reader:
    """A streaming ``Reader`` for ``path`` (format from the extension unless ``fmt`` is given).

    Iterating yields pyarrow Tables of at most ``chunk_rows`` rows. ``options`` go to the
    format's reader: ``sep``/``header`` (csv, criteo), ``layout`` (libsvm), ``keep`` (any: raw
    columns carried through beside the schema's).
    """
    fmt = fmt or detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return _READERS[fmt](
        path,
        schema=schema,
        chunk_rows=chunk_rows,
        skip_bad_rows=skip_bad_rows,
        max_bad_rows=max_bad_rows,
        label=label,
        **options,
    )


def sniff_csv(path, sep: str | None = None, rows: int = 20000):
    """The first ``rows`` rows of a CSV with pyarrow's type inference (for schema inference),
    and the 1-based line number of each row ([rows] int64).

    Blank lines and rows with a wrong column count are left out of the sample: the validating
    reader reports them (or skips them with ``skip_bad_rows``) when the file is read.
    """
    import pyarrow as pa

    reader = CSVReader(path, sep=sep, chunk_rows=rows + 1)
    for _, block in _line_blocks(reader.path, rows + 1):
        names, body, first_line = reader._read_header(block)
        if not body:
            break
        invalid: list[int] = []

        def on_invalid(row):
            invalid.append(row.number)
            return "skip"

        # left out of the sample as blank lines: the reader reports them as bad rows
        not_utf8 = [i for i, _ in _non_utf8_lines(body)]
        if not_utf8:
            body = _blank_out(body, not_utf8)
        try:
            table = reader._read_block(body, names, on_invalid)
        except pa.ArrowInvalid as e:  # pyarrow words it with its own row count
            raise DataError(f"cannot sniff column types ({e})", path=path) from None
        n_lines = body.count(b"\n")
        local = np.setdiff1d(np.arange(1, n_lines + 1, dtype=np.int64), invalid)
        line_of = first_line + local - 1
        if len(line_of) != table.num_rows:
            raise DataError("rows and lines went out of step (a quoted newline?)", path=path)
        blank = _blank_lines(body, n_lines)[local - 1]
        if blank.any():
            table = table.filter(pa.array(~blank))
            line_of = line_of[~blank]
        if table.num_rows:
            return table, line_of
        break
    raise DataError("no data rows to infer a schema from", path=path, line=2)
