# SPDX-License-Identifier: Apache-2.0
"""Vectorised conversions of raw columns (pyarrow arrays, numpy arrays or Python lists).

Every converter returns its values plus a boolean mask ``bad`` [N] of rows whose raw value could
not be converted, so that readers can name the line of the first bad row (or skip them) and
``Schema.encode`` can name the row. pyarrow is imported lazily, inside the functions.
"""

from __future__ import annotations

import numpy as np

# a float literal, optionally surrounded by blanks (inf/nan spelled any case)
_FLOAT_RE = (
    r"^\s*[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
    r"|[iI][nN][fF]([iI][nN][iI][tT][yY])?|[nN][aA][nN])\s*$"
)

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def to_arrow(values):
    """Any column-like (pa.Array/ChunkedArray, numpy array, list, torch tensor) -> one pa.Array."""
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        return values
    if hasattr(values, "detach"):  # torch.Tensor
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim == 2:  # precomputed vectors [N, dim]
            flat = pa.array(values.reshape(-1).astype(np.float32))
            return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        if values.dtype.kind in "US":
            return pa.array(values.astype(str).tolist(), type=pa.string())
        if values.dtype.kind != "O":
            return pa.array(values)
        values = values.tolist()
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        # mixed Python types (e.g. ints and strings in one column): fall back to text
        out = []
        for v in values:
            if v is None:
                out.append(None)
            elif isinstance(v, (list, tuple)):
                out.append([None if x is None else str(x) for x in v])
            else:
                out.append(str(v))
        return pa.array(out)


def is_text(t) -> bool:
    """Whether Arrow type ``t`` is a string type."""
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_list(t) -> bool:
    """Whether Arrow type ``t`` is a list type (variable, large or fixed size)."""
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def tokens(col):
    """Column of scalars -> pa string Array of tokens (null = missing; '' is also missing).

    Numbers become their text as pyarrow prints them (5042 and 5042.0 both give "5042").
    A list column
    whose lists hold at most one value is accepted too (libffm fields); longer lists raise.
    Returns (tokens, bad) where bad marks rows holding several values.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = to_arrow(col)
    n = len(arr)
    bad = np.zeros(n, dtype=bool)
    if is_list(arr.type):
        lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
        bad = lengths > 1
        if bad.any():
            arr = pc.if_else(pa.array(bad), pa.nulls(n, arr.type), arr)
        first = pc.list_element(pc.if_else(pa.array(lengths == 0), pa.nulls(n, arr.type), arr), 0)
        return tokens(first)[0], bad
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_null(arr.type):
        return pa.nulls(n, pa.string()), bad
    if not is_text(arr.type):
        arr = pc.cast(arr, pa.string())
    return arr, bad


def token_lists(col, sep: str):
    """Column of lists (or ``sep``-joined strings) -> (flat tokens pa.Array [nnz], lengths [N]).

    Null and empty tokens are dropped, so '' and None give an empty list.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = to_arrow(col)
    n = len(arr)
    if pa.types.is_null(arr.type):
        return pa.array([], type=pa.string()), np.zeros(n, dtype=np.int64)
    if not is_list(arr.type):
        arr, _ = tokens(arr)
        arr = pc.split_pattern(arr, sep)
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr)
    flat, _ = tokens(flat)
    keep = pc.and_(pc.is_valid(flat), pc.not_equal(flat, "")).fill_null(False)
    keep_np = keep.to_numpy(zero_copy_only=False)
    if keep_np.all():
        return flat, lengths
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)  # [nnz] row of every token
    lengths = np.bincount(rows[keep_np], minlength=n).astype(np.int64)
    return flat.filter(keep), lengths


def to_float(col):
    """Column -> (float64 [N] with NaN for missing, bad [N]). Empty text and null are missing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = to_arrow(col)
    n = len(arr)
    if pa.types.is_null(arr.type):
        return np.full(n, np.nan), np.zeros(n, dtype=bool)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if (
        pa.types.is_boolean(arr.type)
        or pa.types.is_integer(arr.type)
        or pa.types.is_floating(arr.type)
    ):
        return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False).astype(
            np.float64
        ), np.zeros(n, dtype=bool)
    if not is_text(arr.type):
        bad = pc.is_valid(arr).to_numpy(zero_copy_only=False)
        return np.full(n, np.nan), bad
    trimmed = pc.utf8_trim_whitespace(arr)
    empty = pc.equal(trimmed, "").fill_null(True)
    trimmed = pc.if_else(empty, pa.nulls(n, pa.string()), trimmed)
    try:
        out = pc.cast(trimmed, pa.float64())
        return out.to_numpy(zero_copy_only=False).astype(np.float64), np.zeros(n, dtype=bool)
    except pa.ArrowInvalid:
        pass
    ok = pc.match_substring_regex(trimmed, _FLOAT_RE).fill_null(True)
    bad = pc.invert(ok).to_numpy(zero_copy_only=False)
    good = pc.if_else(ok, trimmed, pa.nulls(n, pa.string()))
    out = pc.cast(good, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return out, bad


def to_label(col):
    """Column -> (float64 [N], bad [N]); bad = missing or not exactly 0 or 1."""
    y, bad = to_float(col)
    with np.errstate(invalid="ignore"):
        bad = bad | ~((y == 0.0) | (y == 1.0))
    return y, bad


def to_vectors(col, dim: int):
    """Column of ' '/'|'-separated floats or of float lists -> (float32 [N, dim], bad [N]).

    A missing or empty value gives a zero vector; a wrong length or a non-numeric entry is bad.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = to_arrow(col)
    n = len(arr)
    out = np.zeros((n, dim), dtype=np.float32)
    bad = np.zeros(n, dtype=bool)
    if pa.types.is_null(arr.type):
        return out, bad
    if not is_list(arr.type):
        arr, _ = tokens(arr)
        arr = pc.split_pattern_regex(pc.utf8_trim_whitespace(arr), r"[ |]+")
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr)
    values, vbad = to_float(flat)  # [nnz]
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    if is_text(flat.type):
        # a single '' token is what splitting an empty string gives: that is a missing vector
        empty_tok = pc.equal(flat, "").fill_null(True).to_numpy(zero_copy_only=False)
        lengths = lengths - np.bincount(rows[empty_tok], minlength=n)
        keep = ~empty_tok
        values, vbad, rows = values[keep], vbad[keep], rows[keep]
    bad |= (lengths != 0) & (lengths != dim)
    bad[rows[vbad | np.isnan(values)]] = True
    full = (lengths == dim) & ~bad
    sel = full[rows]
    out[full] = values[sel].reshape(-1, dim)
    return out, bad


def stable_hash(tok, salt: str, size: int) -> np.ndarray:
    """Hash tokens into ids 1..size-1 (0 for missing/empty); stable across runs and machines.

    64-bit FNV-1a over the UTF-8 bytes of ``salt + '\\xff' + token`` (the 0xff byte never occurs
    in UTF-8, so salt and token cannot run into each other), then the murmur3 fmix64 finaliser so
    that the low bits used by the modulo are well mixed; id = 1 + h mod (size - 1).
    Vectorised over tokens: one numpy pass per byte position, longest tokens first.
    """
    import pyarrow as pa

    if size < 2:
        raise ValueError(f"hash_size must be >= 2, got {size}")
    arr, _ = tokens(tok)
    arr = arr.cast(pa.large_string())
    n = len(arr)
    out = np.zeros(n, dtype=np.int64)
    if n == 0:
        return out
    h0 = _FNV_OFFSET
    for byte in salt.encode("utf-8") + b"\xff":
        h0 = ((h0 ^ byte) * _FNV_PRIME) & _MASK64
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lens = np.diff(offsets)  # [n]
    valid = lens > 0
    if arr.null_count:
        valid &= arr.is_valid().to_numpy(zero_copy_only=False)
    order = np.argsort(-lens, kind="stable")  # longest first: active rows form a prefix
    starts = offsets[:-1][order]
    lens_sorted = lens[order]
    h = np.full(n, h0, dtype=np.uint64)
    prime = np.uint64(_FNV_PRIME)
    neg_lens = -lens_sorted  # ascending
    for j in range(int(lens_sorted[0])):
        active = int(np.searchsorted(neg_lens, -j, side="left"))  # rows longer than j
        hj = h[:active]
        hj ^= data[starts[:active] + j].astype(np.uint64)
        hj *= prime
    h = fmix64(h)
    ids = np.empty(n, dtype=np.int64)
    ids[order] = (h % np.uint64(size - 1)).astype(np.int64) + 1
    out[valid] = ids[valid]
    return out


def fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser on uint64 [n]: a bijection that spreads every input bit over
    the output (the hashed vocabularies and the validation split both draw on it)."""
    s33 = np.uint64(33)
    h = h ^ (h >> s33)
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> s33)
    h = h * np.uint64(0xC4CEB53FE1BA4E63)
    return h ^ (h >> s33)
