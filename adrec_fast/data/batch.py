# SPDX-License-Identifier: Apache-2.0
"""The encoded mini-batch: the layout the fused embedding-bag op takes (FBGEMM TBE layout)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def bag_take(indices: Tensor, offsets: Tensor, bags: Tensor) -> tuple[Tensor, Tensor]:
    """The bags ``bags`` [K] (any order, repeats allowed) of a CSR pair ``indices`` [nnz],
    ``offsets`` [N+1] -> (indices [nnz'], offsets [K+1]) holding just those bags, in order."""
    starts = offsets[bags]  # [K]
    lengths = offsets[bags + 1] - starts  # [K]
    new_offsets = torch.zeros(bags.numel() + 1, dtype=torch.long, device=offsets.device)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    nnz = int(new_offsets[-1])
    # position of every output element inside its source: start of its bag + rank within the bag
    bag_of = torch.repeat_interleave(torch.arange(bags.numel(), device=offsets.device), lengths)
    within = torch.arange(nnz, device=offsets.device) - new_offsets[bag_of]
    return indices[starts[bag_of] + within], new_offsets


@dataclass
class Batch:
    """One encoded mini-batch of B rows.

    indices [nnz] int64 and offsets [T*B+1] int64: the T sparse bags of every row, table-major:
        bag (t, b) = indices[offsets[t*B + b] : offsets[t*B + b + 1]], ids within table t's rows
        (0 = out-of-vocabulary / missing). T = ``num_bags``, one per field of
        ``Schema.sparse_fields()`` (categorical fields always have exactly one id per bag).
    seq_indices {name: [L_total]} int64 and seq_offsets {name: [B+1]} int64: behaviour sequences
        (most recent item last), ids within the table ``Schema.table_of(name)``.
    dense [B, n_dense] float32: transformed dense features.
    vectors [B, sum of vector dims] float32 (``[B, 0]`` when the schema has none).
    labels [B] float32 in {0, 1}; NaN when the input had no label column (serving).
    """

    indices: Tensor
    offsets: Tensor
    dense: Tensor
    labels: Tensor
    vectors: Tensor
    num_bags: int
    seq_indices: dict[str, Tensor] = field(default_factory=dict)
    seq_offsets: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    def bag_lengths(self) -> Tensor:
        """[T, B] number of ids in each bag."""
        return (self.offsets[1:] - self.offsets[:-1]).view(self.num_bags, self.batch_size)

    def slice(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) as a new Batch (copies; Python slice semantics for the bounds)."""
        B = self.batch_size
        start, stop, _ = slice(start, stop).indices(B)
        stop = max(stop, start)
        rows = torch.arange(start, stop, device=self.offsets.device)  # [B']
        return self.take(rows)

    def take(self, rows: Tensor) -> Batch:
        """The rows ``rows`` [B'] (any order, repeats allowed) as a new Batch."""
        B = self.batch_size
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.offsets.device)
        T = self.num_bags
        bags = (torch.arange(T, device=rows.device)[:, None] * B + rows[None, :]).reshape(-1)
        indices, offsets = bag_take(self.indices, self.offsets, bags)
        seq_i, seq_o = {}, {}
        for name, so in self.seq_offsets.items():
            seq_i[name], seq_o[name] = bag_take(self.seq_indices[name], so, rows)
        return Batch(
            indices=indices,
            offsets=offsets,
            dense=self.dense[rows],
            labels=self.labels[rows],
            vectors=self.vectors[rows],
            num_bags=T,
            seq_indices=seq_i,
            seq_offsets=seq_o,
        )

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        """Stack batches row-wise (all must come from the same schema)."""
        if not batches:
            raise ValueError("Batch.concat needs at least one batch")
        if len(batches) == 1:
            return batches[0]
        T = batches[0].num_bags
        if any(b.num_bags != T for b in batches):
            raise ValueError("Batch.concat: batches have different numbers of bags")
        # per table t, the bags of every batch in turn; lengths are concatenated then re-summed
        lengths = torch.cat([b.bag_lengths() for b in batches], dim=1)  # [T, sum B]
        pieces = []
        for t in range(T):
            for b in batches:
                Bb = b.batch_size
                lo, hi = int(b.offsets[t * Bb]), int(b.offsets[(t + 1) * Bb])
                pieces.append(b.indices[lo:hi])
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
        torch.cumsum(lengths.reshape(-1), 0, out=offsets[1:])
        seq_i, seq_o = {}, {}
        for name in batches[0].seq_offsets:
            seq_i[name] = torch.cat([b.seq_indices[name] for b in batches])
            seq_len = torch.cat([b.seq_offsets[name].diff() for b in batches])
            so = torch.zeros(seq_len.numel() + 1, dtype=torch.long)
            torch.cumsum(seq_len, 0, out=so[1:])
            seq_o[name] = so
        return Batch(
            indices=torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long),
            offsets=offsets,
            dense=torch.cat([b.dense for b in batches]),
            labels=torch.cat([b.labels for b in batches]),
            vectors=torch.cat([b.vectors for b in batches]),
            num_bags=T,
            seq_indices=seq_i,
            seq_offsets=seq_o,
        )

    def to(self, device, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``."""

        def mv(x: Tensor) -> Tensor:
            return x.to(device, non_blocking=non_blocking)

        return Batch(
            indices=mv(self.indices),
            offsets=mv(self.offsets),
            dense=mv(self.dense),
            labels=mv(self.labels),
            vectors=mv(self.vectors),
            num_bags=self.num_bags,
            seq_indices={k: mv(v) for k, v in self.seq_indices.items()},
            seq_offsets={k: mv(v) for k, v in self.seq_offsets.items()},
        )

    def pin_memory(self) -> Batch:
        return Batch(
            indices=self.indices.pin_memory(),
            offsets=self.offsets.pin_memory(),
            dense=self.dense.pin_memory(),
            labels=self.labels.pin_memory(),
            vectors=self.vectors.pin_memory(),
            num_bags=self.num_bags,
            seq_indices={k: v.pin_memory() for k, v in self.seq_indices.items()},
            seq_offsets={k: v.pin_memory() for k, v in self.seq_offsets.items()},
        )
