# SPDX-License-Identifier: Apache-2.0
"""The model zoo: LR, FM, DeepFM, DCN-v2, DLRM and a DIN-style target-attention model.

Shapes: B batch, T sparse bags (``Schema.sparse_fields()``), D embedding dim, K_d dense inputs
(dense features + precomputed vectors), X text fields (``Schema.text_fields()``: a learned
projection of a frozen encoder's vector, ``nn.text.TextFields``) which join the T bag
embeddings as fields of every interaction (FM, cross, dot, DIN's MLP and FM) and, in models with
first-order weights, add a first-order term. Every forward is a fixed sequence of fused ops (no
loop over fields): one embedding call, one interaction op, MLPs, the head.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .. import functional as F
from ..data.batch import Batch
from ..nn import CrossNet
from .base import CTRModel, Head, mlp, register_model, run_mlp
from .serving_spec import ServingSpec, head_terms, mlp_layers


def _lin(model) -> Tensor | None:
    """The first-order table [R] of a model's ``linear`` lookup (None without one)."""
    return None if model.linear is None else model.linear.ebc.weight.detach().float().view(-1)


@register_model("lr")
class LR(CTRModel):
    """Logistic regression: ``sum_t w_t[id] + dense @ a + b`` (width-1 fused embedding)."""

    def __init__(self, schema, embedding_dim: int = 16, **kw):
        super().__init__(schema, embedding_dim, **kw)
        self.linear = self._make_linear()
        self.head = Head(self.dense_in)
        self.text = self._make_text(first_order=True, fields=False)
        self.init_dense()

    def forward(self, batch: Batch) -> Tensor:
        lin, _ = self.linear(batch)  # [B, T, 1]
        logit = lin.sum(dim=(1, 2)) + self.head(self.dense_input(batch))  # [B]
        if self.text is not None:
            logit = logit + self.text(batch)[1]
        return logit

    def serving_spec(self) -> ServingSpec:
        w, b = head_terms(self.head)
        # [R, 1]: no embeddings of its own
        table, lin = self.spec_rows(self.linear.ebc.weight.detach().float(), _lin(self))
        return ServingSpec(table, lin=lin, dense_w=w, bias=b)


@register_model("fm")
class FM(CTRModel):
    """Factorization machine: LR + ``fm_interaction`` over the T field embeddings."""

    def __init__(self, schema, embedding_dim: int = 16, **kw):
        super().__init__(schema, embedding_dim, **kw)
        self.lookup = self._make_lookup()
        self.linear = self._make_linear(follow=self.lookup)
        self.head = Head(self.dense_in)
        self.text = self._make_text(first_order=True)
        self.init_dense()

    def forward(self, batch: Batch) -> Tensor:
        emb, _ = self.lookup(batch)  # [B, T, D]
        emb, tlin = self.with_text(emb, batch)  # [B, T + X, D]
        lin, _ = self.linear(batch)  # [B, T, 1]
        fm = F.fm_interaction(emb).squeeze(1)  # [B]
        logit = lin.sum(dim=(1, 2)) + fm + self.head(self.dense_input(batch))
        return logit if tlin is None else logit + tlin

    def serving_spec(self) -> ServingSpec:
        w, b = head_terms(self.head)
        table, lin = self.spec_rows(self.lookup.ebc.weight.detach().float(), _lin(self))
        return ServingSpec(table, lin=lin, fm=True, dense_w=w, bias=b)


@register_model("deepfm")
class DeepFM(CTRModel):
    """DeepFM: LR + FM + MLP over ``[flattened embeddings, dense]`` (shared embeddings)."""

    def __init__(self, schema, embedding_dim: int = 16, hidden: Sequence[int] = (256, 128),
                 dropout: float = 0.0, batch_norm: bool = False, layer_norm: bool = False,
                 **kw):
        super().__init__(schema, embedding_dim, hidden=list(hidden), dropout=dropout,
                         batch_norm=batch_norm, layer_norm=layer_norm, **kw)
        self.lookup = self._make_lookup()
        self.linear = self._make_linear(follow=self.lookup)
        self.text = self._make_text(first_order=True)
        self.deep, width = mlp(self.num_fields * self.embedding_dim + self.dense_in, hidden,
                               dropout, batch_norm, layer_norm)
        self.head = Head(width)
        self.dense_linear = nn.Linear(self.dense_in, 1, bias=False) if self.dense_in else None
        self.init_dense()

    def forward(self, batch: Batch) -> Tensor:
        emb, _ = self.lookup(batch)  # [B, T, D]
        emb, tlin = self.with_text(emb, batch)  # [B, T + X, D]
        lin, _ = self.linear(batch)  # [B, T, 1]
        dense = self.dense_input(batch)  # [B, K_d]
        x = torch.cat([emb.flatten(1), dense], dim=1)  # [B, (T + X)*D + K_d]
        logit = (lin.sum(dim=(1, 2)) + F.fm_interaction(emb).squeeze(1)
                 + self.head(run_mlp(self.deep, x)))
        if tlin is not None:
            logit = logit + tlin
        if self.dense_linear is not None:
            logit = logit + F.linear(dense, self.dense_linear.weight).squeeze(1)
        return logit

    def serving_spec(self) -> ServingSpec | None:
        deep = mlp_layers(self.deep)
        if deep is None:
            return None
        w, b = head_terms(self.head)
        dw = None if self.dense_linear is None else self.dense_linear.weight.detach().float()[0]
        table, lin = self.spec_rows(self.lookup.ebc.weight.detach().float(), _lin(self))
        return ServingSpec(table, lin=lin, fm=True, dense_w=dw, deep=deep, head=w, bias=b)


@register_model("dcnv2")
class DCNv2(CTRModel):
    """DCN-v2: full-rank cross network on ``x0 = [flattened embeddings, dense]`` and an MLP,
    ``structure="parallel"`` (head on ``[cross(x0), mlp(x0)]``) or ``"stacked"``
    (head on ``mlp(cross(x0))``); ``linear=True`` adds first-order weights (as DeepCTR does).
    ``precision="bf16"`` runs the cross net, MLP and head in bf16 (see ``tower_precision``)."""

    supports_bf16 = True

    def __init__(self, schema, embedding_dim: int = 16, cross_layers: int = 3,
                 hidden: Sequence[int] = (256, 128), structure: str = "parallel",
                 dropout: float = 0.0, batch_norm: bool = False, layer_norm: bool = False,
                 linear: bool = False, **kw):
        if structure not in ("parallel", "stacked"):
            raise ValueError(f"structure must be 'parallel' or 'stacked', got {structure!r}")
        super().__init__(schema, embedding_dim, cross_layers=cross_layers, hidden=list(hidden),
                         structure=structure, dropout=dropout, batch_norm=batch_norm,
                         layer_norm=layer_norm, linear=linear, **kw)
        self.structure = structure
        self.lookup = self._make_lookup()
        self.linear = self._make_linear(follow=self.lookup) if linear else None
        self.text = self._make_text(first_order=linear)
        k = self.num_fields * self.embedding_dim + self.dense_in
        self.k = k
        self.cross = CrossNet(k, num_layers=cross_layers)
        self.deep, width = mlp(k, hidden, dropout, batch_norm, layer_norm)
        self.head = Head(width + k if structure == "parallel" else width)
        self.init_dense()

    def forward(self, batch: Batch) -> Tensor:
        emb, _ = self.lookup(batch)  # [B, T, D]
        emb, tlin = self.with_text(emb, batch)  # [B, T + X, D]
        parts = [emb.flatten(1), self.dense_input(batch)]
        B = emb.shape[0]
        # x0 stored at the width its products run fastest at: zero columns appended, which the
        # cross net, the MLP and the head's cross half take as such (their outputs unchanged)
        pad = F.gemm_width(self.k, self.tower_dtype(emb), B) - self.k
        if pad:
            parts.append(emb.new_zeros(B, pad))
        x0 = torch.cat(parts, dim=1)  # [B, K + pad]
        with self.tower_precision(x0.device):
            x0 = x0.to(self.tower_dtype(x0))  # one cast, shared by the cross net and the MLP
            xc = self.cross(x0)  # [B, K + pad], zeros in the pad columns
            if self.structure == "parallel":
                hd = run_mlp(self.deep, x0)  # [B, H]
                head = self.head.head
                # head on [cross, deep] without materialising the concatenation
                w = head.weight.view(1, -1)
                wc = TF.pad(w[:, : self.k], (0, pad)) if pad else w[:, : self.k]
                logit = (F.linear(hd, w[:, self.k:], head.bias.view(1))
                         + F.linear(xc, wc)).view(-1)  # [B]
            else:
                logit = self.head(run_mlp(self.deep, xc))  # [B]
        logit = logit.float()
        if self.linear is not None:
            lin, _ = self.linear(batch)
            logit = logit + lin.sum(dim=(1, 2))
        if tlin is not None:
            logit = logit + tlin
        return logit

    def serving_spec(self) -> ServingSpec | None:
        deep = mlp_layers(self.deep)
        if deep is None:
            return None
        w, b = head_terms(self.head)
        cross = [(wc.detach().float(), bc.detach().float())
                 for wc, bc in zip(self.cross.weights, self.cross.biases)]
        ch = None
        if self.structure == "parallel":
            ch, w = w[: self.k], w[self.k:]
        table, lin = self.spec_rows(self.lookup.ebc.weight.detach().float(), _lin(self))
        return ServingSpec(table, lin=lin, cross=cross, structure=self.structure, deep=deep,
                           head=w, cross_head=ch, bias=b)


@register_model("dlrm")
class DLRM(CTRModel):
    """DLRM: bottom MLP maps the dense input to a D-vector, ``dot_interaction`` over
    ``[dense vector, T embeddings]``, top MLP on ``[dense vector, pairwise dots]``.
    ``precision="bf16"``: MLPs, dot interaction and head in bf16 (see ``tower_precision``)."""

    supports_bf16 = True

    def __init__(self, schema, embedding_dim: int = 16, bottom: Sequence[int] = (64,),
                 top: Sequence[int] = (256, 128), self_interaction: bool = False,
                 dropout: float = 0.0, batch_norm: bool = False, layer_norm: bool = False, **kw):
        super().__init__(schema, embedding_dim, bottom=list(bottom), top=list(top),
                         self_interaction=self_interaction, dropout=dropout,
                         batch_norm=batch_norm, layer_norm=layer_norm, **kw)
        self.lookup = self._make_lookup()
        self.text = self._make_text(first_order=False)
        D = self.embedding_dim
        self.self_interaction = self_interaction
        if self.dense_in:
            layers, width = mlp(self.dense_in, list(bottom))
            self.bottom = nn.Sequential(*layers, nn.Linear(width, D), nn.ReLU())
        else:
            self.bottom = None
        F_ = self.num_fields + (1 if self.bottom is not None else 0)
        P = F_ * (F_ + 1) // 2 if self_interaction else F_ * (F_ - 1) // 2
        top_in = P + (D if self.bottom is not None else 0)
        # dropout and normalisation in the top MLP (the bottom one maps a few dense inputs)
        self.top, width = mlp(top_in, top, dropout, batch_norm, layer_norm)
        self.head = Head(width)
        self.init_dense()

    def forward(self, batch: Batch) -> Tensor:
        emb, _ = self.lookup(batch)  # [B, T, D]
        emb, _ = self.with_text(emb, batch)  # [B, T + X, D]
        # the dot interaction stays in the embeddings' fp32 under precision="bf16": it is a few
        # MFLOP, and casting [B, T, D] to bf16 and back costs more than it saves
        with self.tower_precision(emb.device):
            if self.bottom is None:
                z = F.dot_interaction(emb, self.self_interaction)  # [B, P]
                return self.head(run_mlp(self.top, z)).float()
            d = run_mlp(self.bottom, self.dense_input(batch)).to(emb.dtype)  # [B, D]
            fields = torch.cat([d.unsqueeze(1), emb], dim=1)  # [B, T+1, D]
            z = F.dot_interaction(fields, self.self_interaction)  # [B, P]
            x = torch.cat([d, z], dim=1)  # [B, D + P]
            logit = self.head(run_mlp(self.top, x.to(self.tower_dtype(x))))  # [B]
        return logit.float()

    def serving_spec(self) -> ServingSpec | None:
        bottom = mlp_layers(self.bottom)
        top = mlp_layers(self.top)
        if bottom is None or top is None:
            return None
        w, b = head_terms(self.head)
        table, _ = self.spec_rows(self.lookup.ebc.weight.detach().float(), None)
        return ServingSpec(table, interaction="dot", bottom=bottom, self_interaction=bool(self.self_interaction), deep=top,
                           head=w, bias=b)


@register_model("din")
class DIN(CTRModel):
    """Behaviour-sequence model with target attention (DIN/BST-style).

    For each sequence field (``sequences``, default all), its elements are embedded in the
    table it shares with a target field (``target``: default the sparse field that owns that
    table) and pooled by ``attention_pooling`` with the target's embedding as the query. The
    pooled vectors join the T field embeddings as extra fields, then
    ``logit = first order [linear] + FM over all fields [fm] + MLP([all fields, dense])``.
    On a schema without a sequence field only that last part remains (no attention).
    """

    reads_histories = True

    def __init__(self, schema, embedding_dim: int = 16, hidden: Sequence[int] = (256, 128),
                 sequences: Sequence[str] | None = None, target: str | None = None,
                 fm: bool = True, linear: bool = True, dropout: float = 0.0,
                 batch_norm: bool = False, layer_norm: bool = False, **kw):
        seq_fields = dict(schema.sequence_fields())
        sequences = list(sequences) if sequences is not None else list(seq_fields)
        super().__init__(schema, embedding_dim, hidden=list(hidden), sequences=sequences,
                         target=target, fm=fm, linear=linear, dropout=dropout,
                         batch_norm=batch_norm, layer_norm=layer_norm, **kw)
        bags = [name for name, _ in schema.sparse_fields()]
        bag_table = dict(schema.sparse_fields())
        self.target_bag = []
        for s in sequences:
            if s not in seq_fields:
                raise ValueError(f"{s!r} is not a sequence field; sequence fields: {list(seq_fields)}")
            if target is not None:
                if target not in bag_table:
                    raise ValueError(f"target {target!r} is not a sparse (bag) field")
                name = target
            else:
                owner = schema.owner(s).name
                same = [n for n in bags if bag_table[n] == seq_fields[s]]
                if owner in bag_table:
                    name = owner
                elif same:
                    name = same[0]
                else:
                    raise ValueError(f"no sparse field shares the table of sequence {s!r}; "
                                     "pass target=")
            self.target_bag.append(bags.index(name))
        self.sequences = sequences
        self.lookup = self._make_lookup(sequences=sequences)
        self.linear = self._make_linear(follow=self.lookup) if linear else None
        self.text = self._make_text(first_order=linear)
        self.use_fm = fm
        n_fields = self.num_fields + len(sequences)
        self.deep, width = mlp(n_fields * self.embedding_dim + self.dense_in, hidden, dropout,
                               batch_norm, layer_norm)
        self.head = Head(width)
        self.init_dense()

    def forward(self, batch: Batch) -> Tensor:
        emb, keys = self.lookup(batch)  # [B, T, D], {s: [L_s, D]}
        pooled = [
            F.attention_pooling(emb[:, t].contiguous(), keys[s], batch.seq_offsets[s])  # [B, D]
            for s, t in zip(self.sequences, self.target_bag)
        ]
        emb, tlin = self.with_text(emb, batch)  # [B, T + X, D]: text after the bags
        # [B, T+X+S, D]
        fields = torch.cat([emb, torch.stack(pooled, dim=1)], dim=1) if pooled else emb
        x = torch.cat([fields.flatten(1), self.dense_input(batch)], dim=1)
        logit = self.head(run_mlp(self.deep, x))
        if self.use_fm:
            logit = logit + F.fm_interaction(fields).squeeze(1)
        if self.linear is not None:
            lin, _ = self.linear(batch)
            logit = logit + lin.sum(dim=(1, 2))
        if tlin is not None:
            logit = logit + tlin
        return logit

    def serving_spec(self) -> ServingSpec | None:
        deep = mlp_layers(self.deep)
        if deep is None:
            return None
        w, b = head_terms(self.head)
        table, lin = self.spec_rows(self.lookup.ebc.weight.detach().float(), _lin(self))
        return ServingSpec(table, lin=lin, fm=self.use_fm, sequences=list(zip(self.sequences, self.target_bag)),
                           deep=deep, head=w, bias=b)
