# SPDX-License-Identifier: Apache-2.0
"""Named benchmark shapes and their cached, vectorised input generators.

Embedding presets follow issue 2 §4: the 26 Criteo Kaggle categorical fields with their
cardinalities capped at 1e6 rows (5,569,296 rows in all), D in {16, 64}, B = 4096, one id per
field or 10-20 ids per field (uniform length), ids uniform or Zipf(s=1.05) per table with the hot
ranks scattered by a per-table permutation. Inputs are generated once per shape (the weights once
per (rows, D)) and kept in small caches, so a run pays generation once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

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
    # issue 2 §4: 2 x 2 x 2 shapes.
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


@dataclass
class EmbInputs:
    """Inputs of one shape (independent of D). All int64, contiguous.

    ``indices``/``offsets`` are the FBGEMM TBE layout (table-major bags, ids within their table);
    ``global_ids`` are the same ids shifted by their table's first row (for one concatenated
    table); ``per_table`` holds each table's (ids, offsets[B+1] starting at 0)."""

    shape_key: tuple
    table_offsets: torch.Tensor  # [T+1]
    indices: torch.Tensor  # [nnz]
    offsets: torch.Tensor  # [T*B+1]
    global_ids: torch.Tensor  # [nnz]
    per_table: list[tuple[torch.Tensor, torch.Tensor]]
    unique_rows: torch.Tensor  # [U] sorted global rows touched by the batch

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def U(self) -> int:
        return int(self.unique_rows.numel())


def _zipf_ids(rng: np.random.Generator, n: int, count: int, s: float) -> np.ndarray:
    """``count`` ids in [0, n) with P(rank k) ~ k^-s (finite support, inverse CDF), the ranks
    scattered over the table by a random permutation so hot rows are not adjacent."""
    if n == 1:
        return np.zeros(count, dtype=np.int64)
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -s)
    ranks = np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right")
    np.minimum(ranks, n - 1, out=ranks)
    return rng.permutation(n)[ranks].astype(np.int64, copy=False)


def _input_key(shape: EmbShape) -> tuple:
    return (shape.rows, shape.B, shape.L, shape.dist, shape.zipf_s, shape.seed)


_INPUTS: dict[tuple, EmbInputs] = {}


def make_inputs(shape: EmbShape) -> EmbInputs:
    """Cached per (rows, B, L, dist, seed): the same ids serve D=16 and D=64."""
    key = _input_key(shape)
    hit = _INPUTS.get(key)
    if hit is not None:
        return hit
    rng = np.random.default_rng([shape.seed, 0xADEC, shape.L[0], shape.L[1], len(shape.dist)])
    T, B = shape.T, shape.B
    rows = np.asarray(shape.rows, dtype=np.int64)
    lo, hi = shape.L
    lengths = (np.full(T * B, lo, dtype=np.int64) if lo == hi
               else rng.integers(lo, hi + 1, size=T * B, dtype=np.int64))
    offsets = np.zeros(T * B + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    counts = lengths.reshape(T, B).sum(axis=1)  # ids per table
    parts = []
    for t in range(T):
        n, c = int(rows[t]), int(counts[t])
        if shape.dist == "uniform":
            parts.append(rng.integers(0, n, size=c, dtype=np.int64))
        elif shape.dist == "zipf":
            parts.append(_zipf_ids(rng, n, c, shape.zipf_s))
        else:
            raise ValueError(f"unknown id distribution {shape.dist!r}")
    indices = np.concatenate(parts)
    table_offsets = np.zeros(T + 1, dtype=np.int64)
    np.cumsum(rows, out=table_offsets[1:])
    global_ids = indices + np.repeat(table_offsets[:-1], counts)
    per_table = []
    for t in range(T):
        o = offsets[t * B:(t + 1) * B + 1]
        per_table.append((torch.from_numpy(indices[o[0]:o[-1]].copy()),
                          torch.from_numpy(o - o[0])))
    inp = EmbInputs(
        shape_key=key,
        table_offsets=torch.from_numpy(table_offsets),
        indices=torch.from_numpy(indices),
        offsets=torch.from_numpy(offsets),
        global_ids=torch.from_numpy(global_ids),
        per_table=per_table,
        unique_rows=torch.from_numpy(np.unique(global_ids)),
    )
    _INPUTS.clear()  # keep one shape's inputs: runs are ordered shape-major
    _INPUTS[key] = inp
    return inp


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
