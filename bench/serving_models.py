# SPDX-License-Identifier: Apache-2.0
"""Plain-PyTorch peers of the served models: DLRM, DCN-v2, DeepFM and DIN written with
``nn.EmbeddingBag`` / ``nn.Embedding`` and torch ops only (no adrec op), on a copy of a trained
adrec model's weights. They are what a team would serve with eager PyTorch: the request is
expanded to N rows (the user-side ids repeated N times, the history too) and run as one batch.

Interface of every peer (``plain_peer(model)``):

    embed(user_ids [Tu], cand_ids [N, Tc], hist_ids [L] or None) -> tuple of tensors
    tower(*embedded, dense [N, K_d]) -> probabilities [N] float32

``forward(user_ids, cand_ids, dense, hist_ids)`` is ``tower(*embed(...), dense)``; the
``compile`` provider wraps ``tower`` in ``torch.compile`` and keeps the lookups eager. Bags are
in schema order with the user-side bags first (``Tu`` of them), then the candidate-side ones.

Each peer clones the tables: a provider that reads the rows of the request another provider has
just served would find them in the cache (the benchmark gives every provider its own copy).
``precision="bf16"`` runs the tower (MLPs, interaction, head) in bfloat16; ``"qint8"`` turns the
MLPs' ``nn.Linear`` layers into torch's dynamic int8 ``Linear`` (DLRM and DCN-v2 only).
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "bf16", "qint8")


def _plain_mlp(seq: nn.Sequential) -> nn.Sequential:
    """An adrec ``mlp`` stack (Linear, [BatchNorm1d | LayerNorm], ReLU, [Dropout]) as the same
    torch modules, copied (its ReLUs out of place: inference only)."""
    out = []
    for m in seq:
        if isinstance(m, nn.ReLU):
            out.append(nn.ReLU())
        elif isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.LayerNorm, nn.Dropout)):
            out.append(copy.deepcopy(m))
        else:
            raise TypeError(f"unexpected layer {type(m).__name__} in an MLP")
    return nn.Sequential(*out).eval()


def _head(model) -> tuple[Tensor, Tensor]:
    """The head's (weight [K], bias []) as plain tensors."""
    h = model.head.head
    return h.weight.detach().clone(), h.bias.detach().clone()


def _fm(emb: Tensor) -> Tensor:
    """emb [N, F, D] -> [N]: 0.5 * sum_d((sum_f e)^2 - sum_f e^2)."""
    return 0.5 * (emb.sum(1).square() - emb.square().sum(1)).sum(1)


class PlainPeer(nn.Module):
    """Shared part: one ``nn.EmbeddingBag`` (sum) over every table of the model, addressed by
    global row ids (bag base + id), one id per bag."""

    tower_modules: tuple[str, ...] = ()

    def __init__(self, model, n_user: int):
        super().__init__()
        schema = model.schema
        tofs = schema.table_offsets()
        self.T = len(schema.sparse_fields())
        self.D = model.embedding_dim
        self.n_user = n_user
        w = model.lookup.ebc.weight.detach().clone()  # [R, D] this peer's own copy
        self.emb = nn.EmbeddingBag.from_pretrained(w, mode="sum")
        self.register_buffer("base", torch.tensor([int(tofs[t]) for _, t in
                                                   schema.sparse_fields()], dtype=torch.long))
        self.dtype = torch.float32

    def rows(self, user_ids: Tensor, cand_ids: Tensor) -> Tensor:
        """[Tu], [N, Tc] -> [N, T] global row ids, the user side repeated on every row."""
        n = cand_ids.shape[0]
        return torch.cat([user_ids.expand(n, self.n_user), cand_ids], dim=1) + self.base

    def bags(self, table: nn.EmbeddingBag, rows: Tensor) -> Tensor:
        """rows [N, T] -> [N, T, D'] one bag per (row, field)."""
        n = rows.shape[0]
        flat = rows.reshape(-1)
        out = table(flat, torch.arange(flat.numel(), dtype=torch.long))  # [N*T, D']
        return out.view(n, self.T, -1)

    def embed(self, user_ids: Tensor, cand_ids: Tensor, hist_ids: Tensor | None):
        return (self.bags(self.emb, self.rows(user_ids, cand_ids)).to(self.dtype),)

    def tower(self, *args: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, user_ids: Tensor, cand_ids: Tensor, dense: Tensor,
                hist_ids: Tensor | None = None) -> Tensor:
        return self.tower(*self.embed(user_ids, cand_ids, hist_ids), dense.to(self.dtype))

    def to_precision(self, precision: str) -> PlainPeer:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "bf16":
            self.dtype = torch.bfloat16
            for name in self.tower_modules:
                setattr(self, name, _cast(getattr(self, name), torch.bfloat16))
        elif precision == "qint8":
            mlps = [n for n in self.tower_modules if isinstance(getattr(self, n), nn.Sequential)]
            if not mlps:
                raise ValueError(f"{type(self).__name__} has no MLP to quantize")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated, still works
                for n in mlps:
                    setattr(self, n, torch.ao.quantization.quantize_dynamic(
                        getattr(self, n), {nn.Linear}, dtype=torch.qint8))
        return self


def _cast(x, dtype):
    if isinstance(x, nn.Module):
        return x.to(dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(t, dtype) for t in x)
    if isinstance(x, Tensor):
        return x.to(dtype)
    return x


class _Head(nn.Module):
    def __init__(self, model):
        super().__init__()
        w, b = _head(model)
        self.register_buffer("w", w)  # [K]
        self.register_buffer("b", b)  # []

    def forward(self, h: Tensor) -> Tensor:
        return h @ self.w + self.b  # [N]


class DLRMPeer(PlainPeer):
    """bottom MLP -> d [N, D]; dots of every pair of [d, T embeddings]; top MLP on [d, dots]."""

    tower_modules = ("bottom", "top", "head")

    def __init__(self, model, n_user: int):
        super().__init__(model, n_user)
        if model.bottom is None or model.self_interaction:
            raise ValueError("DLRMPeer: a bottom MLP and self_interaction=False expected")
        self.bottom, self.top, self.head = (_plain_mlp(model.bottom), _plain_mlp(model.top),
                                            _Head(model))
        F_ = self.T + 1
        self.register_buffer("tri", torch.triu_indices(F_, F_, offset=1), persistent=False)

    def tower(self, emb: Tensor, dense: Tensor) -> Tensor:  # [N, T, D], [N, K_d]
        d = self.bottom(dense)  # [N, D]
        fields = torch.cat([d.unsqueeze(1), emb], dim=1)  # [N, F, D]
        z = torch.bmm(fields, fields.transpose(1, 2))[:, self.tri[0], self.tri[1]]  # [N, P]
        h = self.top(torch.cat([d, z], dim=1))
        return torch.sigmoid(self.head(h)).float()


class DCNPeer(PlainPeer):
    """x0 = [embeddings, dense]; cross layers x = x0 * (W x + b) + x; head on [cross, MLP(x0)]."""

    tower_modules = ("cw", "cb", "deep", "head")

    def __init__(self, model, n_user: int):
        super().__init__(model, n_user)
        if model.structure != "parallel" or model.linear is not None:
            raise ValueError("DCNPeer: structure='parallel' without linear=True expected")
        self.cw = [w.detach().clone() for w in model.cross.weights]  # [K, K] each
        self.cb = [b.detach().clone() for b in model.cross.biases]  # [K] each
        self.deep, self.head = _plain_mlp(model.deep), _Head(model)

    def tower(self, emb: Tensor, dense: Tensor) -> Tensor:
        x0 = torch.cat([emb.flatten(1), dense], dim=1)  # [N, K]
        x = x0
        for w, b in zip(self.cw, self.cb):
            x = x0 * torch.nn.functional.linear(x, w, b) + x
        h = torch.cat([x, self.deep(x0)], dim=1)  # [N, K + H]
        return torch.sigmoid(self.head(h)).float()


class DeepFMPeer(PlainPeer):
    """first order (a width-1 table) + FM over the T embeddings + MLP([embeddings, dense])
    + a linear term of the dense features."""

    tower_modules = ("deep", "head", "dense_w")

    def __init__(self, model, n_user: int):
        super().__init__(model, n_user)
        self.lin = nn.EmbeddingBag.from_pretrained(model.linear.ebc.weight.detach().clone(),
                                                   mode="sum")  # [R, 1]
        self.deep, self.head = _plain_mlp(model.deep), _Head(model)
        dl = model.dense_linear
        self.dense_w = (dl.weight.detach().clone().view(-1) if dl is not None
                        else torch.zeros(0))  # [K_d]

    def embed(self, user_ids, cand_ids, hist_ids):
        rows = self.rows(user_ids, cand_ids)  # [N, T]
        return (self.bags(self.emb, rows).to(self.dtype),
                self.bags(self.lin, rows).to(self.dtype))  # [N, T, D], [N, T, 1]

    def tower(self, emb: Tensor, lin: Tensor, dense: Tensor) -> Tensor:
        x = torch.cat([emb.flatten(1), dense], dim=1)  # [N, T*D + K_d]
        logit = lin.sum(dim=(1, 2)) + _fm(emb) + self.head(self.deep(x))
        if self.dense_w.numel():
            logit = logit + dense @ self.dense_w
        return torch.sigmoid(logit).float()


class DINPeer(PlainPeer):
    """The history [N, L] looked up in the table of the target field; target attention
    softmax(K q / sqrt(D)) K with the target's embedding as q; then first order + FM over the
    T + 1 fields + MLP([fields, dense])."""

    tower_modules = ("deep", "head")

    def __init__(self, model, n_user: int):
        super().__init__(model, n_user)
        if len(model.sequences) != 1 or not model.use_fm or model.linear is None:
            raise ValueError("DINPeer: one sequence field, fm=True and linear=True expected")
        seq = model.sequences[0]
        schema = model.schema
        self.seq_base = int(schema.table_offsets()[schema.table_of(seq)])
        self.target = model.target_bag[0]
        self.keys = nn.Embedding.from_pretrained(self.emb.weight)  # the same copy of the rows
        self.lin = nn.EmbeddingBag.from_pretrained(model.linear.ebc.weight.detach().clone(),
                                                   mode="sum")  # [R, 1]
        self.deep, self.head = _plain_mlp(model.deep), _Head(model)

    def embed(self, user_ids, cand_ids, hist_ids):
        if hist_ids is None:
            raise ValueError("DINPeer: hist_ids [L] needed")
        n = cand_ids.shape[0]
        rows = self.rows(user_ids, cand_ids)  # [N, T]
        keys = self.keys(hist_ids.expand(n, -1) + self.seq_base)  # [N, L, D]
        return (self.bags(self.emb, rows).to(self.dtype), keys.to(self.dtype),
                self.bags(self.lin, rows).to(self.dtype))

    def tower(self, emb: Tensor, keys: Tensor, lin: Tensor, dense: Tensor) -> Tensor:
        q = emb[:, self.target]  # [N, D]
        s = torch.bmm(keys, q.unsqueeze(2)).squeeze(2) / math.sqrt(self.D)  # [N, L]
        p = torch.softmax(s, dim=1)
        pooled = torch.bmm(p.unsqueeze(1), keys)  # [N, 1, D]
        fields = torch.cat([emb, pooled], dim=1)  # [N, T+1, D]
        x = torch.cat([fields.flatten(1), dense], dim=1)
        logit = self.head(self.deep(x)) + _fm(fields) + lin.sum(dim=(1, 2))
        return torch.sigmoid(logit).float()


PEERS = {"dlrm": DLRMPeer, "dcnv2": DCNPeer, "deepfm": DeepFMPeer, "din": DINPeer}


def plain_peer(model, n_user: int, precision: str = "fp32") -> PlainPeer:
    """The plain-PyTorch peer of ``model`` (an adrec DLRM, DCN-v2, DeepFM or DIN) with the
    first ``n_user`` bags on the user side, in eval mode."""
    name = model.config["name"]
    if name not in PEERS:
        raise ValueError(f"no plain peer for model {name!r}; peers: {sorted(PEERS)}")
    return PEERS[name](model, n_user).to_precision(precision).eval()
