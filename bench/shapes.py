# SPDX-License-Identifier: Apache-2.0
"""Named benchmark shapes and their cached, vectorised input generators.

Embedding presets: the 26 Criteo Kaggle categorical fields with their cardinalities capped at
1e6 rows (5,569,296 rows in all), D in {16, 64}, B = 4096, one id per field or 10-20 ids per
field (uniform length), ids uniform or Zipf(s=1.05) per table with the hot ranks scattered by a
fixed per-table permutation.

``make_pool`` gives a stream of distinct batches per shape whose touched rows exceed a byte
budget (a multiple of the L3): the benchmarks draw each round's batch from it, as training draws
a new batch every step. ``make_inputs`` is the pool's first batch. Inputs are cached per input
key, the weights for the last (rows, D), so a run pays generation once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

# Distinct values per categorical field C1..C26 of the Criteo Kaggle (Display Advertising
# Challenge) train set, as used by the DLRM / TorchRec Kaggle examples.
CRITEO_KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
ROW_CAP = 1_000_000


def criteo_rows(cap: int = ROW_CAP) -> tuple[int, ...]:
    """The 26 Criteo Kaggle cardinalities, each capped at ``cap`` rows."""
    return tuple(min(n, cap) for n in CRITEO_KAGGLE_CARDINALITIES)


QUICK = os.environ.get("ADREC_BENCH_QUICK", "") not in ("", "0")


@dataclass(frozen=True)
class EmbShape:
    """One pooled-lookup workload: T tables (``rows``), width D, batch B, bag lengths uniform in
    ``[L[0], L[1]]``, ids ``dist`` in {"uniform", "zipf"} drawn per table."""

    D: int
    L: tuple[int, int] = (1, 1)
    dist: str = "uniform"
    B: int = 4096
    zipf_s: float = 1.05
    rows: tuple[int, ...] = field(default_factory=criteo_rows)
    seed: int = 0

    @property
    def T(self) -> int:
        return len(self.rows)

    @property
    def pooling_label(self) -> str:
        lo, hi = self.L
        return f"L{lo}" if lo == hi else f"L{lo}-{hi}"

    def __str__(self) -> str:  # used as the pytest id
        return f"D{self.D}-{self.pooling_label}-{self.dist}-B{self.B}"


def _criteo(D, L, dist):
    return EmbShape(D=D, L=L, dist=dist)


SHAPES: dict[str, list[EmbShape]] = {
    # D x pooling factor x id distribution: 2 x 2 x 2 shapes.
    "criteo_emb": [
        _criteo(D, L, dist)
        for D in (16, 64)
        for L in ((1, 1), (10, 20))
        for dist in ("uniform", "zipf")
    ],
    # ADREC_BENCH_QUICK=1: one shape per pooling factor at D=16.
    "criteo_emb_quick": [_criteo(16, (1, 1), "uniform"), _criteo(16, (10, 20), "zipf")],
}


def emb_shapes() -> list[EmbShape]:
    return SHAPES["criteo_emb_quick" if QUICK else "criteo_emb"]


# ------------------------------------------------------------------------------------------
# Inputs


@dataclass(eq=False)
class EmbInputs:
    """One batch of one shape (independent of D). All int64, contiguous.

    ``indices``/``offsets`` are the FBGEMM TBE layout (table-major bags, ids within their table).
    Derived layouts are computed on each use, outside the timed calls, and not kept (a pool holds
    hundreds of batches, and most providers need none of them): ``global_ids`` are the ids
    shifted by their table's first row (for one concatenated table); ``per_table`` holds each
    table's (ids, offsets[B+1] starting at 0). ``unique_rows``, the sorted global rows the batch
    touches, is kept once computed (only the first batch's is used, by the checks)."""

    shape_key: tuple
    table_offsets: torch.Tensor  # [T+1]
    indices: torch.Tensor  # [nnz]
    offsets: torch.Tensor  # [T*B+1]
    ids_per_table: np.ndarray  # [T]

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def global_ids(self) -> torch.Tensor:  # [nnz]
        tofs = self.table_offsets.numpy()
        return self.indices + torch.from_numpy(np.repeat(tofs[:-1], self.ids_per_table))

    @property
    def per_table(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        o = self.offsets.numpy()
        T = len(self.ids_per_table)
        B = (len(o) - 1) // T
        out = []
        for t in range(T):
            ot = o[t * B:(t + 1) * B + 1]
            out.append((self.indices[ot[0]:ot[-1]], torch.from_numpy(ot - ot[0])))
        return out

    @cached_property
    def unique_rows(self) -> torch.Tensor:  # [U]
        return torch.unique(self.global_ids, sorted=True)

    @property
    def U(self) -> int:
        return int(self.unique_rows.numel())


# Zipf tables: the inverse-CDF and the rank -> row permutation of each table are fixed per
# (rows, s, seed), so every batch of a shape shares the same hot rows, as training data does.
_ZIPF: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _zipf_table(n: int, s: float, seed: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    key = (n, s, seed, t)
    hit = _ZIPF.get(key)
    if hit is None:
        cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -s)
        perm = np.random.default_rng([seed, 0x21F, t]).permutation(n)
        hit = _ZIPF[key] = (cdf, perm)
    return hit


def _zipf_ids(rng: np.random.Generator, n: int, count: int, s: float, seed: int,
              t: int) -> np.ndarray:
    """``count`` ids in [0, n) with P(rank k) ~ k^-s (finite support, inverse CDF), the ranks
    scattered over the table by the table's fixed permutation so hot rows are not adjacent."""
    if n == 1:
        return np.zeros(count, dtype=np.int64)
    cdf, perm = _zipf_table(n, s, seed, t)
    ranks = np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right")
    np.minimum(ranks, n - 1, out=ranks)
    return perm[ranks].astype(np.int64, copy=False)


def _input_key(shape: EmbShape) -> tuple:
    return (shape.rows, shape.B, shape.L, shape.dist, shape.zipf_s, shape.seed)


_OFFSETS: dict[tuple[int, int, int], torch.Tensor] = {}


def _fixed_offsets(T: int, B: int, L: int) -> torch.Tensor:
    """[T*B+1] offsets of bags of exactly L ids (shared, never written)."""
    key = (T, B, L)
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.arange(T * B + 1, dtype=torch.int64) * L
    return _OFFSETS[key]


def _generate(shape: EmbShape, k: int) -> EmbInputs:
    """Batch ``k`` of ``shape``'s stream (deterministic in (shape, k))."""
    rng = np.random.default_rng([shape.seed, 0xADEC, shape.L[0], shape.L[1], len(shape.dist), k])
    T, B = shape.T, shape.B
    rows = np.asarray(shape.rows, dtype=np.int64)
    lo, hi = shape.L
    if lo == hi:  # every batch of the shape has the same offsets: one shared tensor
        offsets = _fixed_offsets(T, B, lo)
        counts = np.full(T, B * lo, dtype=np.int64)
    else:
        lengths = rng.integers(lo, hi + 1, size=T * B, dtype=np.int64)
        offsets = np.zeros(T * B + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        offsets = torch.from_numpy(offsets)
        counts = lengths.reshape(T, B).sum(axis=1)  # ids per table
    parts = []
    for t in range(T):
        n, c = int(rows[t]), int(counts[t])
        if shape.dist == "uniform":
            parts.append(rng.integers(0, n, size=c, dtype=np.int64))
        elif shape.dist == "zipf":
            parts.append(_zipf_ids(rng, n, c, shape.zipf_s, shape.seed, t))
        else:
            raise ValueError(f"unknown id distribution {shape.dist!r}")
    table_offsets = np.zeros(T + 1, dtype=np.int64)
    np.cumsum(rows, out=table_offsets[1:])
    return EmbInputs(
        shape_key=_input_key(shape),
        table_offsets=torch.from_numpy(table_offsets),
        indices=torch.from_numpy(np.concatenate(parts)),
        offsets=offsets,
        ids_per_table=counts,
    )


_INPUTS: dict[tuple, EmbInputs] = {}


def make_inputs(shape: EmbShape) -> EmbInputs:
    """Batch 0 of ``shape``, cached per (rows, B, L, dist, seed): the same ids serve D=16 and
    D=64. A benchmark that times every round on it measures the cache (see ``make_pool``)."""
    key = _input_key(shape)
    hit = _INPUTS.get(key)
    if hit is None:
        _INPUTS.clear()  # keep one shape's inputs: runs are ordered shape-major
        hit = _INPUTS[key] = _generate(shape, 0)
    return hit


@dataclass
class _Stream:
    batches: list[EmbInputs]
    seen: np.ndarray  # [N_total] bool: rows touched by the batches so far
    prefix_rows: list[int]  # [len(batches)]: rows touched by the first n+1 batches


_POOLS: dict[tuple, _Stream] = {}


def make_pool(shape: EmbShape, min_bytes: int, max_batches: int = 1024,
              min_batches: int = 4) -> list[EmbInputs]:
    """Batches 0, 1, 2, ... of ``shape`` until the rows they touch together, times D*4 bytes,
    reach ``min_bytes`` (or ``max_batches``: Zipf ids revisit their hot rows, so their union
    grows slowly; ``pool_touched_bytes`` says what a pool reached). Pools are cached per input
    key and extended on demand, so D=16 (which needs 4x the rows of D=64) and D=64 share one
    stream. At least ``min_batches``, so no two consecutive rounds share a batch."""
    key = _input_key(shape)
    st = _POOLS.get(key)
    if st is None:
        st = _POOLS[key] = _Stream([], np.zeros(sum(shape.rows), dtype=bool), [])
    need_rows = -(-int(min_bytes) // (4 * shape.D))
    n = 1
    while True:
        if n > len(st.batches):
            b = _generate(shape, len(st.batches))
            st.seen[b.global_ids.numpy()] = True
            st.batches.append(b)
            st.prefix_rows.append(int(np.count_nonzero(st.seen)))
        if (st.prefix_rows[n - 1] >= need_rows and n >= min_batches) or n >= max_batches:
            return st.batches[:n]
        n += 1


def pool_touched_bytes(shape: EmbShape, pool: list[EmbInputs]) -> int:
    """Distinct rows touched by ``pool`` (from ``make_pool``), times D*4 bytes."""
    return _POOLS[_input_key(shape)].prefix_rows[len(pool) - 1] * 4 * shape.D


_WEIGHTS: dict[tuple, torch.Tensor] = {}


def make_weights(shape: EmbShape) -> torch.Tensor:
    """The shared initial weights [N_total, D] float32, uniform in +-0.1/sqrt(D). Cached for
    the last (rows, D, seed) only (5.57M x 64 floats is 1.4 GB)."""
    key = (shape.rows, shape.D, shape.seed)
    hit = _WEIGHTS.get(key)
    if hit is not None:
        return hit
    _WEIGHTS.clear()
    g = torch.Generator().manual_seed(1234 + shape.seed)
    a = 0.1 / shape.D ** 0.5
    w = torch.empty(sum(shape.rows), shape.D).uniform_(-a, a, generator=g)
    _WEIGHTS[key] = w
    return w


_GRADS: dict[tuple, torch.Tensor] = {}


def make_grad_out(shape: EmbShape) -> torch.Tensor:
    """Fixed random upstream gradient [B, T*D] for the training step."""
    key = (_input_key(shape), shape.D)
    hit = _GRADS.get(key)
    if hit is None:
        _GRADS.clear()
        g = torch.Generator().manual_seed(99 + shape.seed)
        hit = _GRADS[key] = torch.randn(shape.B, shape.T * shape.D, generator=g)
    return hit
