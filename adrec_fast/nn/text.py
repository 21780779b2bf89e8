# SPDX-License-Identifier: Apache-2.0
"""Text fields as model fields: a learned projection of frozen encoder vectors.

``TextFields(schema, dim, first_order)`` holds, per text field of the schema (in schema order),
a projection ``Linear(E, dim)`` of the encoder's vector (E: the encoder's width) and, with
``first_order``, a ``Linear(E, 1, bias=False)`` first-order weight. ``forward(batch)`` reads the
field's cache rows (``batch.seq_indices[name]`` [B], see :mod:`adrec_fast.data.text`), gathers
the vectors and returns ``(emb [B, X, dim], lin [B] or None)``: the X text fields as fields
beside the T bag embeddings, and their summed first-order term. A missing value (row 0, the
zero vector) gives the projection's bias.

For serving, ``serving_rows()`` turns every cached value into its rows once: per field
``(values [V], emb [V + 1, dim], lin [V + 1] or None)`` with row i + 1 for values[i] and row 0
for a missing value, the same numbers the forward computes (float32), so a text field is one
more table of the executor.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.text import cache_for, encoder_dim


class TextFields(nn.Module):
    def __init__(self, schema, dim: int, first_order: bool = False):
        super().__init__()
        self.names = schema.text_fields()
        self.encoders = [schema.field(n).encoder for n in self.names]
        widths = [encoder_dim(e) for e in self.encoders]
        # dim 0: no projection, the first-order term only (logistic regression)
        self.proj = nn.ModuleList(nn.Linear(w, dim) for w in widths) if dim > 0 else None
        self.first = (nn.ModuleList(nn.Linear(w, 1, bias=False) for w in widths)
                      if first_order else None)
        if self.first is not None:
            for m in self.first:
                nn.init.zeros_(m.weight)  # as the first-order tables start
        self.dim = int(dim)
        self._frozen: list | None = None

    def __len__(self) -> int:
        return len(self.names)

    def forward(self, batch) -> tuple[Tensor, Tensor | None]:
        embs, lin = [], None
        for i, name in enumerate(self.names):
            rows = batch.seq_indices[name]  # [B] cache rows
            table = cache_for(self.encoders[i]).tensor(rows.device)  # [rows, E]
            vec = table.index_select(0, rows)  # [B, E]
            if self.proj is not None:
                embs.append(self.proj[i](vec))  # [B, D]
            if self.first is not None:
                t = self.first[i](vec).squeeze(1)  # [B]
                lin = t if lin is None else lin + t
        return (torch.stack(embs, dim=1) if embs else None), lin  # [B, X, D], [B]

    def freeze_for_serving(self) -> list[list[str]]:
        """Fix the cached values that ``serving_rows`` covers (the caches may grow later);
        returns the values per field."""
        self._frozen = [cache_for(e).snapshot() for e in self.encoders]
        return [v for v, _ in self._frozen]

    @torch.no_grad()
    def serving_rows(self) -> list[tuple[list[str], Tensor, Tensor | None]]:
        """Per text field: (values [V], emb rows [V + 1, D], first-order rows [V + 1] or None)."""
        snaps = self._frozen or [cache_for(e).snapshot() for e in self.encoders]
        out = []
        for i, (values, vecs) in enumerate(snaps):
            dev = next(self.parameters()).device
            v = torch.from_numpy(vecs).to(dev)  # [V + 1, E]
            emb = None if self.proj is None else self.proj[i](v).float().cpu().contiguous()
            lin = (None if self.first is None
                   else self.first[i](v).squeeze(1).float().cpu().contiguous())
            out.append((values, emb, lin))
        return out


__all__ = ["TextFields"]
