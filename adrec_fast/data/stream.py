# SPDX-License-Identifier: Apache-2.0
"""Training data from files of any size: compact encoded rows, an on-disk cache, shuffled
streaming, the validation split, and the choice between holding the data and streaming it.

``load_training_data`` is the entry point (the ``train`` command calls it). It fits the schema
if needed (one streaming pass: vocabulary counts and dense statistics over chunks), then encodes
every chunk once into compact rows (ids in the smallest integer type their tables allow, no
offsets for one-id bags, float32 features). Small data stays in memory (``EncodedRows``); large
data goes, chunk by chunk, into one unlinked temporary file (``EncodedCache``), and each epoch
reads it back (``StreamedRows``) in a shuffled chunk order through a shuffle buffer of a few
chunks. Why a cache rather than parsing the text again every epoch (measured on 8M Criteo rows,
2 shared cores): parsing and encoding run at about 200k rows/s, reading the cache back gives
about 900k rows/s of shuffled batches, while one training thread takes 30k rows/s (DeepFM);
so the cache costs the training a few percent of a core instead of ~15%, a .gz file is
decompressed once, and the chunk order can be shuffled for any input (160 bytes a row on disk).

Reading runs in a background thread (``background``) feeding a bounded queue: the text reader
during the encoding pass, and during training the cache reader, which also permutes each buffer
(large tensor ops that release the GIL), so the training thread only slices batches. An
exception in the thread (a ``DataError`` naming the file, line and field) is raised again in
the consuming thread.

The validation rows are chosen by a stable hash of the row number (``valid_mask``), identical
for both paths and for every chunk size.
"""

from __future__ import annotations

import math
import os
import queue
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .allocator import map_large_blocks
from .batch import Batch, bag_take
from .columns import fmix64
from .errors import DataError
from .readers import CSVReader, is_gzip, open_reader

STREAM_MODES = ("auto", "on", "off")
CHUNK_ROWS = 32768  # rows per reader chunk, per cache chunk
BUFFER_CHUNKS = 4  # shuffle buffer of the streamed path, in chunks (131,072 rows)
PREFETCH = 1  # buffers (of BUFFER_CHUNKS chunks) the background thread may hold ready
SPLIT_BLOCK = 4096  # rows per block of the validation split
# in memory when the estimated encoded data is at most this and a quarter of the free memory;
# above, streaming costs one sequential write and read of the cache, nothing per step
MEMORY_LIMIT_BYTES = 1 << 30


# ---------------------------------------------------------------------------- the split
def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def n_valid_rows(total_rows: int, fraction: float) -> int:
    """How many of ``total_rows`` rows ``valid_mask`` holds out: round(total * fraction)."""
    return _round(total_rows * fraction)


def valid_mask(first_row: int, count: int, total_rows: int, fraction: float, seed: int):
    """[count] bool: True for the validation rows among rows [first_row, first_row + count) of
    a file of ``total_rows`` rows (0-based row numbers, bad rows skipped).

    Rows form blocks of ``SPLIT_BLOCK``; block [s, e) holds out round(e*f) - round(s*f) rows (so
    the total is exactly round(total*f)), those with the smallest hash of (seed, row number).
    The choice depends only on the row numbers, the total, ``fraction`` and ``seed``.
    """
    out = np.zeros(count, dtype=bool)
    if count <= 0 or fraction <= 0:
        return out
    end = first_row + count
    b0, b1 = first_row // SPLIT_BLOCK, (end - 1) // SPLIT_BLOCK
    lo, hi = b0 * SPLIT_BLOCK, min((b1 + 1) * SPLIT_BLOCK, total_rows)
    key = np.uint64(int(fmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))[0]))
    h = fmix64(np.arange(lo, hi, dtype=np.uint64) ^ key)  # [hi - lo]
    mask = np.zeros(hi - lo, dtype=bool)
    for b in range(b0, b1 + 1):
        s, e = b * SPLIT_BLOCK, min((b + 1) * SPLIT_BLOCK, total_rows)
        q = _round(e * fraction) - _round(s * fraction)
        if q > 0:
            mask[s - lo + np.argsort(h[s - lo:e - lo], kind="stable")[:q]] = True
    return mask[first_row - lo:end - lo]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """[n] the row order of epoch ``epoch`` of in-memory data: a function of (seed, epoch)
    only, so resuming at an epoch needs no generator state."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


# ---------------------------------------------------------------------------- compact rows
def index_dtype(schema) -> torch.dtype:
    """The smallest integer type holding every id of ``schema``'s tables (int64 for the keys
    of a dynamic table)."""
    if schema.has_dynamic:
        return torch.int64
    biggest = max([c for _, c in schema.tables()], default=1)
    if biggest <= 2**15:
        return torch.int16
    if biggest <= 2**31:
        return torch.int32
    return torch.int64


def _cumsum0(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


@dataclass(eq=False)
class EncodedRows:
    """N encoded rows in compact form; ``take`` gives an ordinary int64 ``Batch``.

    ids [T*N] (``index_dtype``), table-major as ``Batch.indices``; bag_lengths [T*N] int32, or
    None when every bag holds one id (then ids is a [T, N] matrix and no offsets are stored);
    dense [N, n_dense], labels [N], vectors [N, V] float32; seq {name: (ids [L], lengths [N]
    int32)}.
    """

    ids: torch.Tensor
    bag_lengths: torch.Tensor | None
    dense: torch.Tensor
    labels: torch.Tensor
    vectors: torch.Tensor
    num_bags: int
    seq: dict = field(default_factory=dict)
    _offsets: dict = field(default_factory=dict, init=False, repr=False)  # prefix sums

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def one_per_bag(self) -> bool:
        return self.bag_lengths is None

    @classmethod
    def from_batch(cls, b: Batch, dtype: torch.dtype = torch.int64) -> EncodedRows:
        lengths = b.offsets.diff()
        one = b.indices.numel() == b.num_bags * b.batch_size and bool((lengths == 1).all())
        return cls(
            ids=b.indices.to(dtype),
            bag_lengths=None if one else lengths.to(torch.int32),
            dense=b.dense.float(),
            labels=b.labels.float(),
            vectors=b.vectors.float(),
            num_bags=b.num_bags,
            seq={k: (b.seq_indices[k].to(dtype), b.seq_offsets[k].diff().to(torch.int32))
                 for k in b.seq_indices},
        )

    def _prefix(self, key: str, lengths: torch.Tensor) -> torch.Tensor:
        """[len(lengths) + 1] int64 offsets of ``lengths``, computed once."""
        if key not in self._offsets:
            self._offsets[key] = _cumsum0(lengths.long())
        return self._offsets[key]

    def _bags(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bag lengths [T*N] int32, bag offsets [T*N+1] int64), ones for one-id bags."""
        n = self.num_bags * len(self)
        if self.bag_lengths is None:
            return torch.ones(n, dtype=torch.int32), torch.arange(n + 1)
        return self.bag_lengths, self._prefix("", self.bag_lengths)

    @staticmethod
    def concat(parts: list[EncodedRows]) -> EncodedRows:
        """Rows of ``parts`` one after the other (same schema)."""
        if len(parts) == 1:
            return parts[0]
        T = parts[0].num_bags
        sizes = [len(p) for p in parts]
        # table-major: table t's ids of every part in turn
        if all(p.one_per_bag for p in parts):
            ids = torch.cat([p.ids.view(T, n) for p, n in zip(parts, sizes)], 1).reshape(-1)
            bag_lengths = None
        else:
            bags = [p._bags() for p in parts]
            pieces, lens = [], []
            for t in range(T):
                for p, n, (bl, bo) in zip(parts, sizes, bags):
                    pieces.append(p.ids[int(bo[t * n]):int(bo[(t + 1) * n])])
                    lens.append(bl[t * n:(t + 1) * n])
            ids, bag_lengths = torch.cat(pieces), torch.cat(lens)
        return EncodedRows(
            ids=ids, bag_lengths=bag_lengths,
            dense=torch.cat([p.dense for p in parts]),
            labels=torch.cat([p.labels for p in parts]),
            vectors=torch.cat([p.vectors for p in parts]),
            num_bags=T,
            seq={k: (torch.cat([p.seq[k][0] for p in parts]),
                     torch.cat([p.seq[k][1] for p in parts])) for k in parts[0].seq},
        )

    def subset(self, rows: torch.Tensor) -> EncodedRows:
        """Rows ``rows`` [K] (any order), still compact."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        n, T = len(self), self.num_bags
        if self.one_per_bag:
            ids, bag_lengths = self.ids.view(T, n)[:, rows].reshape(-1), None
        else:
            bags = (torch.arange(T)[:, None] * n + rows[None, :]).reshape(-1)  # [T*K]
            ids = bag_take(self.ids, self._prefix("", self.bag_lengths), bags)[0]
            bag_lengths = self.bag_lengths[bags]
        seq = {k: (bag_take(si, self._prefix(k, sl), rows)[0], sl[rows])
               for k, (si, sl) in self.seq.items()}
        return EncodedRows(ids=ids, bag_lengths=bag_lengths, dense=self.dense[rows],
                           labels=self.labels[rows], vectors=self.vectors[rows],
                           num_bags=T, seq=seq)

    def slice(self, start: int, stop: int) -> EncodedRows:
        """Rows [start, stop): views where the layout allows, else small copies."""
        n, T = len(self), self.num_bags
        if self.one_per_bag:
            ids, bag_lengths = self.ids.view(T, n)[:, start:stop].reshape(-1), None
        else:
            rows = torch.arange(start, stop)
            return self.subset(rows)
        seq = {}
        for k, (si, sl) in self.seq.items():
            so = self._prefix(k, sl)
            seq[k] = (si[int(so[start]):int(so[stop])], sl[start:stop])
        return EncodedRows(ids=ids, bag_lengths=bag_lengths, dense=self.dense[start:stop],
                           labels=self.labels[start:stop], vectors=self.vectors[start:stop],
                           num_bags=T, seq=seq)

    def to_batch(self) -> Batch:
        """All rows as a ``Batch`` (int64 ids and offsets, float32 features)."""
        n, T = len(self), self.num_bags
        offsets = (torch.arange(T * n + 1) if self.one_per_bag
                   else _cumsum0(self.bag_lengths.long()))
        return Batch(indices=self.ids.long(), offsets=offsets, dense=self.dense,
                     labels=self.labels, vectors=self.vectors, num_bags=T,
                     seq_indices={k: si.long() for k, (si, _) in self.seq.items()},
                     seq_offsets={k: _cumsum0(sl.long()) for k, (_, sl) in self.seq.items()})

    def take(self, rows: torch.Tensor) -> Batch:
        """Rows ``rows`` [B] (any order, repeats allowed) as a ``Batch``."""
        return self.subset(rows).to_batch()

    def select(self, keep: np.ndarray) -> EncodedRows:
        """The rows where ``keep`` [N] is True, in order, still compact."""
        if keep.all():
            return self
        return self.subset(torch.from_numpy(np.flatnonzero(keep)))

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        """Mini-batches of ``batch_size`` rows; shuffled by ``epoch_permutation``."""
        n = len(self)
        order = epoch_permutation(n, seed, epoch) if shuffle else None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield (self.take(order[start:stop]) if order is not None
                   else self.slice(start, stop).to_batch())

    def nbytes(self) -> int:
        ts = [self.ids, self.dense, self.labels, self.vectors]
        ts += [self.bag_lengths] if self.bag_lengths is not None else []
        ts += [t for pair in self.seq.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in ts)

    # -- the cache's byte layout: the tensors one after the other, each 8-byte aligned ------
    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        out = [("ids", self.ids), ("dense", self.dense), ("labels", self.labels),
               ("vectors", self.vectors)]
        if self.bag_lengths is not None:
            out.append(("bag_lengths", self.bag_lengths))
        for k, (ids, lengths) in self.seq.items():
            out += [("seq_ids:" + k, ids), ("seq_len:" + k, lengths)]
        return out

    def to_buffers(self) -> tuple[list, list, int]:
        """(buffers, layout, nbytes): the tensors' bytes (8-byte aligned, for ``os.pwritev``)
        and [(name, dtype, shape, byte offset)]."""
        bufs, layout, pos = [], [], 0
        for name, t in self._tensors():
            raw = t.contiguous().view(-1).view(torch.uint8).numpy()
            layout.append((name, t.dtype, tuple(t.shape), pos))
            pad = -raw.size % 8
            bufs += [raw, bytes(pad)] if pad else [raw]
            pos += raw.size + pad
        return bufs, layout, pos

    @classmethod
    def from_buffer(cls, buf: bytearray, layout: list, num_bags: int) -> EncodedRows:
        t = {}
        for name, dtype, shape, pos in layout:
            count = math.prod(shape)
            t[name] = (torch.frombuffer(buf, dtype=dtype, count=count, offset=pos).view(shape)
                       if count else torch.zeros(shape, dtype=dtype))
        seq = {k.split(":", 1)[1]: (t[k], t["seq_len:" + k.split(":", 1)[1]])
               for k in t if k.startswith("seq_ids:")}
        return cls(ids=t["ids"], bag_lengths=t.get("bag_lengths"), dense=t["dense"],
                   labels=t["labels"], vectors=t["vectors"], num_bags=num_bags, seq=seq)


# ---------------------------------------------------------------------------- the cache
class EncodedCache:
    """Encoded chunks appended to one temporary file, read back one chunk per ``pread``.

    The file is unlinked as soon as it is created (``tempfile.TemporaryFile``), so nothing is
    left behind whatever ends the process; it lives in ``directory`` (default: ``TMPDIR``).
    """

    def __init__(self, directory=None):
        self.directory = directory if directory is not None else tempfile.gettempdir()
        self._file = tempfile.TemporaryFile(prefix="adrec-cache-", dir=self.directory)
        self._fd = self._file.fileno()
        self._closer = weakref.finalize(self, self._file.close)  # closed when dropped
        self._chunks: list[tuple[int, int, int, list, int]] = []  # (pos, nbytes, rows, layout, T)
        self._end = 0
        self.rows = 0

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def nbytes(self) -> int:
        return self._end

    def append(self, rows: EncodedRows) -> None:
        bufs, layout, nbytes = rows.to_buffers()
        try:
            written = os.pwritev(self._fd, bufs, self._end)
            if written != nbytes:
                raise OSError(f"short write, {written} of {nbytes} bytes")
        except OSError as e:
            raise OSError(f"cannot write the encoded-data cache in {self.directory} ({e}); set "
                          "TMPDIR to a directory with more space") from None
        self._chunks.append((self._end, nbytes, len(rows), layout, rows.num_bags))
        self._end += nbytes
        self.rows += len(rows)

    def chunk_rows(self, i: int) -> int:
        return self._chunks[i][2]

    def read(self, i: int) -> EncodedRows:
        pos, nbytes, _, layout, T = self._chunks[i]
        buf = bytearray(nbytes)
        got = os.preadv(self._fd, [buf], pos)
        if got != nbytes:
            raise OSError(f"short read from the encoded-data cache ({got} of {nbytes} bytes)")
        return EncodedRows.from_buffer(buf, layout, T)

    def close(self) -> None:
        self._closer()


# ---------------------------------------------------------------------------- background
_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def background(make_iter, maxsize: int = PREFETCH):
    """Iterate ``make_iter()`` in a daemon thread, handing items over through a queue of at
    most ``maxsize`` items (bounded memory). An exception in the thread is raised again here
    with its message; closing or abandoning this generator (an error or Ctrl-C in the caller)
    stops the thread at its next hand-over."""
    q: queue.Queue = queue.Queue(maxsize=max(int(maxsize), 1))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in make_iter():
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, which re-raises)
            put(_Failure(e))

    thread = threading.Thread(target=work, name="adrec-data", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    raise RuntimeError("the data thread ended without a result") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        while True:  # unblock a put in progress
            try:
                q.get_nowait()
            except queue.Empty:
                break
        thread.join(timeout=1.0)


# ---------------------------------------------------------------------------- streaming
class StreamedRows:
    """The rows of an ``EncodedCache`` (all, or one side of the validation split) as a training
    source: ``batches(batch_size, shuffle, seed, epoch)`` and ``len``, like in-memory data.

    Shuffled epochs visit the chunks in an order drawn from (seed, epoch) and permute the rows
    of ``buffer_chunks`` chunks at a time; the rows left over after the last full batch of a
    buffer go first into the next buffer's batches. Memory: the buffer plus the queue.
    """

    def __init__(self, cache: EncodedCache, side: str = "all", fraction: float = 0.0,
                 split_seed: int = 0, buffer_chunks: int = BUFFER_CHUNKS,
                 prefetch: int = PREFETCH):
        if side not in ("all", "train", "valid"):
            raise ValueError(f"side must be 'all', 'train' or 'valid', not {side!r}")
        self.cache = cache
        self.side = side
        self.fraction = float(fraction)
        self.split_seed = int(split_seed)
        self.buffer_chunks = max(int(buffer_chunks), 1)
        self.prefetch = prefetch
        starts = np.cumsum([0] + [cache.chunk_rows(i) for i in range(len(cache))])
        self._first_row = starts[:-1]
        n_valid = n_valid_rows(cache.rows, self.fraction) if side != "all" else 0
        self.n = {"all": cache.rows, "train": cache.rows - n_valid, "valid": n_valid}[side]

    def __len__(self) -> int:
        return self.n

    def _side(self, i: int, rows: EncodedRows) -> EncodedRows:
        """The rows of chunk ``i`` (as read) on this source's side of the split."""
        if self.side == "all":
            return rows
        m = valid_mask(int(self._first_row[i]), len(rows), self.cache.rows, self.fraction,
                       self.split_seed)
        return rows.select(m if self.side == "valid" else ~m)

    def _groups(self, batch_size: int, shuffle: bool, seed: int, epoch: int):
        """(rows, n): rows in training order, a buffer at a time, of which the first n (a
        multiple of ``batch_size`` but in the last buffer) are due now.

        The background thread only reads chunks (``os.preadv``, which releases the GIL); the
        split, concatenation and permutation run here, in the consumer, where they cost about
        1% of the training time. Any Python the worker runs holds the GIL, which each op of the
        training step must take back when it returns, and on a machine whose cores are busy
        that hand-over waits for the worker to be scheduled again."""
        n_chunks = len(self.cache)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        order = torch.randperm(n_chunks, generator=g).tolist() if shuffle else list(range(n_chunks))
        group = self.buffer_chunks if shuffle else 1
        read = background(lambda: (self.cache.read(i) for i in order),
                          max(self.prefetch, 1) * group)
        carry = None  # rows left from the previous buffer, in their drawn order
        try:
            for start in range(0, n_chunks, group):
                rows = EncodedRows.concat([self._side(i, next(read))
                                           for i in order[start:start + group]])
                if shuffle:
                    rows = rows.subset(torch.randperm(len(rows), generator=g))
                if carry is not None:
                    rows = EncodedRows.concat([carry, rows])
                full = len(rows) - len(rows) % batch_size
                carry = rows.slice(full, len(rows)) if full < len(rows) else None
                if full:
                    yield rows, full
            if carry is not None:
                yield carry, len(carry)
        finally:
            read.close()  # stops the reader thread when training stops early

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        for rows, n in self._groups(batch_size, shuffle, seed, epoch):
            for s in range(0, n, batch_size):
                yield rows.slice(s, min(s + batch_size, n)).to_batch()


# ---------------------------------------------------------------------------- loading
def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def _estimated_bytes(path) -> int:
    """The encoded size of a file, guessed from its size: compressed input (gzip, Parquet)
    grows about 4x when decompressed; concatenating the chunks needs twice the result."""
    p = Path(path)
    size = p.stat().st_size
    compressed = p.suffix.lower() in (".parquet", ".pq") or is_gzip(p)
    return size * (8 if compressed else 2)


def should_stream(paths, mode: str = "auto") -> bool:
    """The one place that decides between holding the encoded data and streaming it:
    ``mode`` "on" streams, "off" holds; "auto" holds when the estimated encoded size is at most
    ``MEMORY_LIMIT_BYTES`` and a quarter of the available memory."""
    if mode not in STREAM_MODES:
        raise ValueError(f"stream mode must be one of {STREAM_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    need = sum(_estimated_bytes(p) for p in paths if p is not None)
    return need > min(MEMORY_LIMIT_BYTES, _mem_available() // 4)


def _release_memory() -> None:
    """Hand the memory freed by a parsing pass back to the system before training allocates
    its tables: pyarrow's pool and glibc's per-thread arenas (the reader thread's) keep it
    otherwise, and the process's peak would hold both."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _chunks(path, schema, reader_kw: dict, quiet_skips: bool = False):
    """Raw chunks of ``path``, parsed in a background thread. ``quiet_skips`` silences the
    reader's skipped-rows warning (a pass whose rows are read again later, which warns)."""
    reader = open_reader(path, schema=schema, label=schema.label,
                         chunk_rows=reader_kw.pop("chunk_rows", CHUNK_ROWS), **reader_kw)

    def rows():
        if not quiet_skips:
            yield from reader
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*skipped \d+ bad rows",
                                    category=RuntimeWarning)
            yield from reader

    return background(rows, maxsize=2)


def _encode_file(path, schema, reader_kw: dict, sink) -> int:
    """Encode every chunk of ``path`` into ``sink(EncodedRows)``; returns the row count."""
    dtype = index_dtype(schema)
    n = 0
    for chunk in _chunks(path, schema, dict(reader_kw)):
        b = schema.encode(chunk)
        if n == 0 and b.batch_size and bool(torch.isnan(b.labels).all()):
            raise DataError(f"no label column {schema.label!r}", path=path)
        sink(EncodedRows.from_batch(b, dtype))
        n += b.batch_size
    return n


@dataclass
class TrainingData:
    """The train and validation sources of ``load_training_data`` (``EncodedRows`` in memory
    or ``StreamedRows``) and how they are held."""

    train: object
    valid: object
    streamed: bool
    cache_bytes: int = 0


def load_training_data(path, schema, *, valid_path=None, valid_fraction: float = 0.1,
                       seed: int = 0, stream: str = "auto", cache_dir=None,
                       chunk_rows: int = CHUNK_ROWS, buffer_chunks: int = BUFFER_CHUNKS,
                       **reader_kw) -> TrainingData:
    """Train/validation data of ``path`` (and ``valid_path``, else ``valid_fraction`` of
    ``path`` chosen by ``valid_mask`` with ``seed``). Fits ``schema`` first if it is not fitted
    (a streaming pass over ``path``). ``stream``: "auto" | "on" | "off" (``should_stream``).
    ``reader_kw`` go to ``open_reader`` (``skip_bad_rows``, ``max_bad_rows``, ``fmt``, ...).
    Raises ``DataError`` for bad input (file, line, field), ``ValueError`` for a split that
    leaves either side empty. Sets glibc's mmap threshold for the process
    (``allocator.map_large_blocks``), which keeps the peak memory of training and evaluation
    bounded.
    """
    reader_kw = {**reader_kw, "chunk_rows": chunk_rows}
    map_large_blocks()
    if not valid_path and not 0 < valid_fraction < 1:
        raise ValueError(f"the validation fraction must lie in (0, 1), got {valid_fraction}")
    if not schema.fitted:
        schema.fit(_chunks(path, schema, dict(reader_kw), quiet_skips=True))
    streamed = should_stream([path, valid_path], stream)
    sources = []
    cache_bytes = 0
    for p in ([path, valid_path] if valid_path else [path]):
        if streamed:
            cache = EncodedCache(cache_dir)
            _encode_file(p, schema, reader_kw, cache.append)
            sources.append(cache)
            cache_bytes += cache.nbytes
        else:
            parts: list[EncodedRows] = []
            _encode_file(p, schema, reader_kw, parts.append)
            if not parts:
                parts = [EncodedRows.from_batch(
                    schema.encode({c: [] for c in schema.raw_columns()}), index_dtype(schema))]
            sources.append(EncodedRows.concat(parts))
            del parts
    total = sources[0].rows if streamed else len(sources[0])
    if total == 0:
        raise DataError("no data rows", path=path)
    if not valid_path:
        n_valid = n_valid_rows(total, valid_fraction)
        if not 0 < n_valid < total:
            raise ValueError(f"{path}: cannot hold out {valid_fraction:.0%} of {total} rows for "
                             "validation; give a separate validation file")
    if streamed:
        if valid_path:
            train = StreamedRows(sources[0], buffer_chunks=buffer_chunks)
            valid = StreamedRows(sources[1])
        else:
            kw = {"fraction": valid_fraction, "split_seed": seed}
            train = StreamedRows(sources[0], "train", buffer_chunks=buffer_chunks, **kw)
            valid = StreamedRows(sources[0], "valid", **kw)
    elif valid_path:
        train, valid = sources
    else:
        m = valid_mask(0, total, total, valid_fraction, seed)
        train, valid = sources[0].select(~m), sources[0].select(m)
    del sources
    _release_memory()
    return TrainingData(train=train, valid=valid, streamed=streamed, cache_bytes=cache_bytes)


# ---------------------------------------------------------------------------- stdin
#: ``DATA`` that names the standard input: CSV with a header, read as it arrives
STDIN = "-"
HEAD_LINES = 2048  # lines of a piped CSV read before training starts: schema and statistics


def arrival_blocks(f, max_lines: int, read_bytes: int = 1 << 16):
    """(first line number, bytes of whole lines) from the binary stream ``f`` as the lines
    arrive: every read (``read1``: whatever the pipe holds, waiting only when it holds nothing)
    hands on the complete lines it finished, at most ``max_lines`` per block, so a slow
    producer's rows are not held back until a block fills. A last line without its newline
    gets one. Memory: one block and one partial line."""
    read = getattr(f, "read1", f.read)
    next_line, pending = 1, b""
    while True:
        piece = read(read_bytes)
        if not piece:
            if pending:
                yield next_line, pending + b"\n"
            return
        pending += piece
        cut = pending.rfind(b"\n") + 1
        if not cut:
            continue
        block, pending = pending[:cut], pending[cut:]
        while block:
            nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            n = min(int(nl.size), max_lines)
            end = int(nl[n - 1]) + 1
            yield next_line, block[:end]
            next_line += n
            block = block[end:]


def _head(blocks, lines: int) -> list:
    """The first blocks of ``blocks`` holding at least ``lines`` lines (or all of them)."""
    head, n = [], 0
    for b in blocks:
        head.append(b)
        n += b[1].count(b"\n")
        if n > lines:
            break
    return head


def piped_csv(f=None, *, schema=None, label: str = "label", drop=(), name: str = "<stdin>",
              head_lines: int = HEAD_LINES, chunk_rows: int = 4096, **reader_kw):
    """CSV with a header from the binary stream ``f`` (default: standard input), read once as
    it arrives, in bounded memory -> (schema, reader). Without ``schema`` one is inferred from
    the first ``head_lines`` lines, as ``infer_schema`` infers a file's (not fitted). The
    reader yields pyarrow Tables of at most ``chunk_rows`` rows, each as soon as its lines are
    in, and checks them as the file readers do: a bad row raises ``DataError`` naming ``name``,
    its line and field (or is skipped with ``skip_bad_rows``); ``reader_kw`` as for
    ``open_reader`` (``skip_bad_rows``, ``max_bad_rows``, ``keep``, ``sep``)."""
    import sys

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    f = sys.stdin.buffer if f is None else f
    blocks = arrival_blocks(f, chunk_rows)
    head = _head(blocks, head_lines)
    if not head:
        raise DataError("empty input: no header line", path=name, line=1)
    if schema is None:
        schema = _infer_head(b"".join(b for _, b in head), name, label, drop, reader_kw.get("sep"))

    reader = _PipedCSVReader(_chain(head, blocks), name, schema=schema, label=schema.label,
                             chunk_rows=chunk_rows, **reader_kw)
    return schema, reader


class _PipedCSVReader(CSVReader):
    """A CSVReader over blocks of lines handed to it (``arrival_blocks``), read once."""

    def __init__(self, blocks, name: str, **kw):
        super().__init__(os.devnull, **kw)  # no file to open: the blocks are the data
        self.path = Path(name)  # what its errors name
        self._blocks = blocks

    def _chunks(self):
        # CSVReader._chunks over the handed blocks instead of a file's
        names = None
        for first_line, block in self._blocks:
            if names is None:
                names, block, first_line = self._read_header(block)
                if not block:
                    continue
            self.columns = names
            include = self._needed_columns(names)
            table, line_of, problems = self._parse_block(block, first_line, names, include)
            yield self._check_values(table, line_of, problems=problems)


def _chain(head: list, rest):
    yield from head
    head.clear()  # the head's blocks are not held once read again
    yield from rest


def _infer_head(data: bytes, name: str, label: str, drop, sep):
    """``infer_schema`` on the first lines of a piped CSV (written to a temporary file, which
    the inference reads as it reads any CSV); its errors name ``name``."""
    from .pipeline import infer_schema

    with tempfile.TemporaryDirectory(prefix="adrec-head-") as d:
        p = Path(d) / "head.csv"
        p.write_bytes(data)
        try:
            return infer_schema(p, label=label, drop=list(drop), sep=sep)
        except DataError as e:
            raise DataError(e.reason, path=name, line=e.line, field=e.field) from None
