# SPDX-License-Identifier: Apache-2.0
"""Sharded embeddings (table-wise and row-wise), data-parallel towers and per-rank batches.

``ShardedEmbeddingBagCollection`` stands in for an ``EmbeddingBagCollection``: each table lives
on one rank, or its rows are split in ranges over the ranks (``ShardingPlan``); either way
every row of the full layout has one owner. A lookup, on every rank at once:

1. turns its bags' ids into rows of the full layout, checks every id against its table, finds
   each row's owner (the rank holding the block of rows it falls in) and de-duplicates the
   rows (one request per distinct row, grouped by owner);
2. exchanges the request counts, then the row ids (``Exchange``, explicit split sizes);
3. at each owner, looks the requested rows up with the fused ``functional.embedding_bag``
   (one bag per row, the fused optimizer attached);
4. sends the rows back; the requester pools its bags from them (sum or mean, per-sample
   weights) with ``functional.embedding_bag`` over the received rows, or, when every bag holds
   one id (categorical fields), picks each bag's row directly.

For a row-wise table a bag's ids may come from several owners; pooling the received rows sums
what each owner's partial sum would hold, so the result is one process's pooled row. Sending
rows rather than partial sums [B, D] per owner moves fewer bytes whenever a rank's distinct ids
in a table are fewer than its bags (always, for one id per bag).

Backward runs the same path in reverse: the requester's gradient of each distinct row, scaled
like DDP's average (``grad_scale``, 1/world), goes back to the owner, whose fused op sums the
gradients of a row over all ranks and applies one optimizer step to it: the single-process
update of the global batch. Only the summation order differs (per rank, then across ranks).

A model's dynamic tables (``DynamicEmbedding``, keyed, no rows to range over) are sharded by
key instead (``distributed.dynamic``); ``shard_model`` does both.
"""
from __future__ import annotations

import datetime
import inspect

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .. import functional as F
from ..nn import EmbeddingBagCollection
from ..nn.dynamic_table import DynamicEmbedding
from .dynamic import ShardedDynamicEmbedding, _PickRows, lookup_pre_hook, merged_state
from .exchange import Exchange
from .planner import ShardingPlan, plan_tables
from .process_group import DistContext

#: ids go over the wire as int32 when every row id of the full layout fits
_INT32_ROWS = 2**31 - 1


class _RowsToRequesters(torch.autograd.Function):
    """Owner rows [R, D] -> the requesters' rows [U, D]; backward sends each requester's row
    gradients (times ``grad_scale``) back to the owner, in the order the ids came."""

    @staticmethod
    def forward(ctx, rows, exchange, to_requesters, from_owners, grad_scale):
        ctx.exchange = exchange
        ctx.splits = (to_requesters, from_owners)
        ctx.grad_scale = grad_scale
        return exchange.variable(rows.detach(), to_requesters, from_owners, "row")

    @staticmethod
    def backward(ctx, grad):
        to_requesters, from_owners = ctx.splits
        if grad.is_sparse:  # from the ragged pooling (functional.embedding_bag)
            U = sum(from_owners)
            if grad._nnz() == U:
                # every received row is in some bag, so U entries name each row once: a copy,
                # no coalescing sort
                grad = grad._values().new_zeros(U, grad.shape[1]).index_copy_(
                    0, grad._indices()[0], grad._values())
            else:
                grad = grad.coalesce().to_dense()
            if ctx.grad_scale != 1.0:
                grad.mul_(ctx.grad_scale)
        elif ctx.grad_scale != 1.0:
            grad = grad * ctx.grad_scale
        back = ctx.exchange.variable(grad, from_owners, to_requesters, "gradient")
        return back, None, None, None, None


class ShardedEmbeddingBagCollection(nn.Module):
    """The tables of ``ebc`` sharded over the ranks of ``ctx``, table-wise or row-wise as
    ``plan`` says (see the module docstring). Same call as ``EmbeddingBagCollection``:
    ``forward(indices, offsets, per_sample_weights=None) -> [B, T*D]`` for this rank's batch,
    and ``lookup(table_offsets, ...)`` for another layout over the full row space (global row
    ids as one table); every rank must call it once per step, in the same mode (train or eval).

    ``ebc`` must carry a fused optimizer (row-wise Adagrad or SGD, with its L2 setting): the
    owners apply it to their rows. Its current weights and optimizer state are copied, so build
    the model with the same seed on every rank (pass the seed to ``check_same_config``). ``plan``
    defaults to ``plan_tables`` with equal access; ``exchange`` to a probed ``Exchange``.
    ``grad_scale`` multiplies the row gradients sent back to the owners (default ``1/world``,
    DDP's average of per-rank mean losses over equal shares of a batch).

    ``local`` is this rank's shard: an ``EmbeddingBagCollection`` with one table per block of
    rows it holds (``plan.blocks_of(rank)``; None when it holds none). ``gather()`` assembles
    the full tables; ``unshard_model`` puts a plain collection back.
    """

    def __init__(self, ebc: EmbeddingBagCollection, ctx: DistContext,
                 plan: ShardingPlan | None = None, exchange: Exchange | None = None,
                 grad_scale: float | None = None):
        super().__init__()
        if not isinstance(ebc, EmbeddingBagCollection):
            raise TypeError("ShardedEmbeddingBagCollection: ebc must be an "
                            f"adrec_fast.nn.EmbeddingBagCollection, got {type(ebc).__name__}")
        if ebc.optimizer is None:
            raise ValueError("ShardedEmbeddingBagCollection: the tables need a fused optimizer "
                             "(embedding_optimizer 'rowwise_adagrad' or 'sgd'): the owner of a "
                             "table applies the update; sparse-gradient tables are not sharded")
        D = ebc.embedding_dim
        if plan is None:
            plan = plan_tables(ebc.num_embeddings, ctx.world, D)
        if plan.world != ctx.world or list(plan.rows) != list(ebc.num_embeddings):
            raise ValueError(f"ShardedEmbeddingBagCollection: the plan is for {plan.world} ranks "
                             f"and tables {list(plan.rows)}, the run has {ctx.world} ranks and "
                             f"tables {list(ebc.num_embeddings)}")
        self.ctx = ctx
        self.plan = plan
        self.exchange = exchange if exchange is not None else Exchange(ctx)
        self.grad_scale = 1.0 / ctx.world if grad_scale is None else float(grad_scale)
        self.num_embeddings = list(ebc.num_embeddings)
        self.embedding_dim = D
        self.pooling = ebc.pooling
        self.optimizer = ebc.optimizer  # shared with the shard: a trainer's lr reaches it
        self.l2, self.l2_mode = ebc.l2, ebc.l2_mode
        full = ebc.table_offsets.to(ctx.device)  # [T+1]
        self.register_buffer("table_offsets", full.clone(), persistent=False)
        self.register_buffer("table_rows", (full[1:] - full[:-1]).clone(), persistent=False)
        # every owner stacks its blocks of rows (plan.blocks_of) in table order, so a
        # requester can name the owner's own rows: the full layout cut into segments, each one
        # block, sorted by first row; row g of segment k is row g + seg_shift[k] of
        # seg_owner[k]'s shard
        segs, held = [], [0] * ctx.world
        for r in range(ctx.world):
            for t, lo, hi in plan.blocks_of(r):
                segs.append((int(full[t]) + lo, r, held[r] - (int(full[t]) + lo)))
                held[r] += hi - lo
        segs.sort()
        seg = torch.tensor(segs, dtype=torch.long).reshape(-1, 3)  # [S, 3]
        self.register_buffer("seg_start", seg[:, 0].contiguous().to(ctx.device),
                             persistent=False)
        self.register_buffer("seg_owner", seg[:, 1].contiguous().to(ctx.device),
                             persistent=False)
        self.register_buffer("seg_shift", seg[:, 2].contiguous().to(ctx.device),
                             persistent=False)
        self.register_buffer("local_one_table", torch.tensor([0, held[ctx.rank]],
                                                             dtype=torch.long, device=ctx.device),
                             persistent=False)
        mine = plan.blocks_of(ctx.rank)
        self.id_dtype = torch.int32 if int(full[-1]) <= _INT32_ROWS else torch.int64
        self.local = None
        if mine:
            ebc.flush_l2()
            # the shard's own random init is overwritten at once: keep the global RNG where the
            # caller left it, so the rest of the run draws what a single process draws
            with torch.random.fork_rng(devices=[]):
                local = EmbeddingBagCollection(
                    [hi - lo for _, lo, hi in mine], D, pooling="sum",
                    optimizer=ebc.optimizer, dtype=ebc.weight.dtype, device=ctx.device,
                    l2=ebc.l2, l2_mode=ebc.l2_mode)
            with torch.no_grad():
                start = 0
                for t, lo, hi in mine:
                    g = int(full[t])
                    local.weight[start:start + hi - lo] = ebc.weight[g + lo:g + hi]
                    if ebc.state.numel():
                        local.state[start:start + hi - lo] = ebc.state[g + lo:g + hi]
                    start += hi - lo
            self.local = local

    @property
    def num_tables(self) -> int:
        return len(self.num_embeddings)

    @property
    def weight(self):
        raise RuntimeError("ShardedEmbeddingBagCollection: the tables are sharded over "
                           f"{self.ctx.world} ranks; gather them first (gather() or "
                           "adrec_fast.distributed.unshard_model) to read, save or serve them")

    def forward(self, indices: Tensor, offsets: Tensor,
                per_sample_weights: Tensor | None = None) -> Tensor:
        return self.lookup(self.table_offsets, indices, offsets, per_sample_weights)

    def _global_rows(self, table_offsets: Tensor, indices: Tensor,
                     offsets: Tensor) -> tuple[Tensor, Tensor]:
        """([nnz] row of the full layout, [nnz] table of ``table_offsets``) of every id, each
        id checked against its table (an id past its table's end would otherwise read the next
        table, on another rank)."""
        Tq = table_offsets.numel() - 1
        if Tq < 1:
            raise ValueError("sharded embedding_bag: table_offsets needs at least 2 entries")
        if offsets.dim() != 1 or (offsets.numel() - 1) % Tq:
            raise ValueError(f"sharded embedding_bag: offsets has {offsets.numel()} entries, "
                             f"expected T*B+1 with T={Tq}")
        nnz = indices.numel()
        if indices.dim() != 1 or int(offsets[-1]) != nnz or int(offsets[0]) != 0:
            raise ValueError(f"sharded embedding_bag: offsets must run from 0 to nnz={nnz}, got "
                             f"{int(offsets[0])}..{int(offsets[-1])}")
        if int(table_offsets[-1]) > int(self.table_offsets[-1]):
            raise ValueError(f"sharded embedding_bag: the layout reaches row "
                             f"{int(table_offsets[-1])}, the tables hold "
                             f"{int(self.table_offsets[-1])}")
        B = (offsets.numel() - 1) // Tq
        bounds = offsets[torch.arange(Tq + 1, device=offsets.device) * B].long()  # [Tq+1]
        per_table = bounds[1:] - bounds[:-1]
        if bool((per_table < 0).any()):
            raise ValueError("sharded embedding_bag: offsets must be non-decreasing")
        table = torch.repeat_interleave(torch.arange(Tq, device=indices.device), per_table,
                                        output_size=nnz)  # [nnz]
        idx = indices.long()
        size = (table_offsets[1:] - table_offsets[:-1]).long()  # [Tq]
        bad = (idx < 0) | (idx >= size[table])
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            t = int(table[k])
            raise IndexError(f"sharded embedding_bag: index {int(idx[k])} at position {k} is "
                             f"outside table {t} ({int(size[t])} rows)")
        return idx + table_offsets.long()[table], table

    def lookup(self, table_offsets: Tensor, indices: Tensor, offsets: Tensor,
               per_sample_weights: Tensor | None = None) -> Tensor:
        """``EmbeddingBagCollection.lookup`` over the sharded tables (a collective)."""
        ctx, ex, D = self.ctx, self.exchange, self.embedding_dim
        Tq = table_offsets.numel() - 1
        rows, _ = self._global_rows(table_offsets, indices, offsets)  # [nnz]
        N = int(self.table_offsets[-1])
        seg = torch.searchsorted(self.seg_start, rows, right=True) - 1  # [nnz] block of each row
        # (owner, row in the owner's shard) as one sort key: unique() de-duplicates and groups
        # the requests by owner in one pass
        key = self.seg_owner[seg] * N + (rows + self.seg_shift[seg])  # [nnz]
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)  # [U], [nnz]
        send_counts = torch.bincount(uniq // N, minlength=ctx.world)  # [world]
        recv_counts = ex.counts(send_counts)  # [world]
        to_owners, from_requesters = send_counts.tolist(), recv_counts.tolist()
        wanted = ex.variable((uniq % N).to(self.id_dtype), to_owners, from_requesters, "id")
        train = self.training and torch.is_grad_enabled()
        if self.local is not None:
            wanted = wanted.long()  # [R] rows of my shard, requester by requester
            ones = torch.arange(wanted.numel() + 1, device=wanted.device)  # bags of one row
            owned = self.local.lookup(self.local_one_table, wanted, ones)  # [R, D]
        else:
            owned = torch.zeros(0, D, device=ctx.device, requires_grad=train)
        got = _RowsToRequesters.apply(owned, ex, from_requesters, to_owners,
                                      self.grad_scale)  # [U, D]
        B = (offsets.numel() - 1) // Tq
        nnz = inverse.numel()
        if nnz == Tq * B and torch.equal(offsets, torch.arange(nnz + 1, dtype=offsets.dtype,
                                                               device=offsets.device)):
            # one id per bag (categorical fields): pooling is picking the row; pick them in
            # batch-major order, so [B*Tq, D] is already the [B, Tq*D] output (a row's repeats
            # are then summed in batch order, as the fused op sums them)
            order = inverse.view(Tq, B).t().reshape(-1)  # [B*Tq]
            pooled = _PickRows.apply(got, order)  # [B*Tq, D]
            if per_sample_weights is not None:
                w = per_sample_weights.view(Tq, B).t().reshape(-1, 1).to(pooled.dtype)
                pooled = pooled * w
            return pooled.view(B, Tq * D)
        U = uniq.numel()
        pooled = F.embedding_bag(got, torch.tensor([0, U], device=got.device), inverse,
                                 offsets, per_sample_weights, self.pooling)  # [Tq*B, D]
        if Tq == 1:
            return pooled
        return pooled.view(Tq, B, D).transpose(0, 1).reshape(B, Tq * D)

    @torch.no_grad()
    def gather(self) -> tuple[Tensor, Tensor]:
        """(weight [N_total, D], state [N_total] or [0]) of the full tables, on every rank (a
        collective: each owner broadcasts its shard)."""
        ctx, D = self.ctx, self.embedding_dim
        full = self.table_offsets
        N = int(full[-1])
        adagrad = self.optimizer.name == "rowwise_adagrad"
        weight = torch.empty(N, D, device=ctx.device)
        state = torch.zeros(N if adagrad else 0, device=ctx.device)
        if self.local is not None:
            self.local.flush_l2()
        with ctx.guard("gathering the embedding tables"):
            for r in range(ctx.world):
                blocks = self.plan.blocks_of(r)
                n = sum(hi - lo for _, lo, hi in blocks)
                if not n:
                    continue
                if r == ctx.rank:
                    w, s = self.local.weight.contiguous(), self.local.state.contiguous()
                else:
                    w = torch.empty(n, D, device=ctx.device)
                    s = torch.empty(n if adagrad else 0, device=ctx.device)
                dist.broadcast(w, src=r, group=ctx.emb_group)
                if adagrad:
                    dist.broadcast(s, src=r, group=ctx.emb_group)
                start = 0
                for t, lo, hi in blocks:
                    g = int(full[t])
                    weight[g + lo:g + hi] = w[start:start + hi - lo]
                    if adagrad:
                        state[g + lo:g + hi] = s[start:start + hi - lo]
                    start += hi - lo
        return weight, state

    def extra_repr(self) -> str:
        mine = self.plan.blocks_of(self.ctx.rank)
        return (f"tables={self.num_tables}, rank={self.ctx.rank}/{self.ctx.world}, "
                f"local_blocks={mine}, dim={self.embedding_dim}, pooling={self.pooling!r}, "
                f"exchange={self.exchange.mode}")


def _replace(model: nn.Module, kind: type, make) -> list[tuple[str, nn.Module]]:
    """Swap every submodule of type ``kind`` for ``make(name, module)``; returns the new ones."""
    done = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, kind):
            parent_name, _, attr = name.rpartition(".")
            if not attr:
                raise ValueError("shard_model: pass the model, not a table collection itself")
            new = make(name, mod)
            setattr(model.get_submodule(parent_name), attr, new)
            done.append((name, new))
    return done


def shard_model(model: nn.Module, ctx: DistContext, exchange: Exchange | None = None,
                access: dict[str, list[float]] | None = None,
                plans: dict[str, ShardingPlan] | None = None,
                ) -> dict[str, ShardedEmbeddingBagCollection]:
    """Replace every ``EmbeddingBagCollection`` of ``model`` (``lookup.ebc``, ``linear.ebc``,
    ...) by a ``ShardedEmbeddingBagCollection``, in place; the dense layers are untouched.
    ``access`` maps a collection's module path to its ids per step per table (planner input);
    ``plans`` maps a path to a ready plan instead (``model_plans``). All collections share one
    ``exchange`` (probed once). Returns path -> sharded collection.
    """
    exchange = exchange if exchange is not None else Exchange(ctx)
    plans = model_plans(model, ctx.world, access, plans)

    def make(name, ebc):
        return ShardedEmbeddingBagCollection(ebc, ctx, plans[name], exchange)

    done = _replace(model, EmbeddingBagCollection, make)
    done += shard_dynamic(model, ctx, exchange)
    if not done:
        raise ValueError("shard_model: the model has no embedding table to shard")
    return dict(done)


def _dynamic_name(model: nn.Module, path: str) -> str:
    """How an error names a dynamic table: its module path and the fields that read it."""
    fields = []
    schema = getattr(model, "schema", None)
    if schema is not None:
        fields = [f.name for f in schema.fields if f.is_sparse and schema.is_dynamic(f.name)]
    return f"dynamic table {path!r}" + (f" (fields {fields})" if fields else "")


def shard_dynamic(model: nn.Module, ctx: DistContext, exchange: Exchange
                  ) -> list[tuple[str, nn.Module]]:
    """Replace the ``DynamicEmbedding`` of every ``SparseLookup`` of ``model`` by a
    ``ShardedDynamicEmbedding`` (sharded by key, ``distributed.dynamic``), in place, and hook
    the lookup so that it tells the table its call's layout; returns (path, sharded)."""
    from ..models.base import SparseLookup

    done = []
    for name, lookup in list(model.named_modules()):
        if isinstance(lookup, SparseLookup) and isinstance(lookup.dyn, DynamicEmbedding):
            path = f"{name}.dyn" if name else "dyn"
            sharded = ShardedDynamicEmbedding(lookup.dyn, ctx, exchange,
                                              _dynamic_name(model, path))
            lookup.dyn = sharded
            sharded.hook = lookup.register_forward_pre_hook(lookup_pre_hook)
            done.append((path, sharded))
    return done


def model_plans(model: nn.Module, world: int, access: dict[str, list[float]] | None = None,
                plans: dict[str, ShardingPlan] | None = None) -> dict[str, ShardingPlan]:
    """The plan of every ``EmbeddingBagCollection`` of ``model`` over ``world`` ranks, by module
    path: the one given in ``plans``, else ``plan_tables`` with that path's ``access``."""
    access, plans = access or {}, dict(plans or {})
    out = {}
    for name, ebc in model.named_modules():
        if isinstance(ebc, EmbeddingBagCollection):
            out[name] = plans.pop(name, None) or plan_tables(
                ebc.num_embeddings, world, ebc.embedding_dim, access.get(name))
    if plans:
        raise ValueError(f"shard_model: plans name collections the model does not have: "
                         f"{sorted(plans)} (it has {sorted(out)})")
    return out


@torch.no_grad()
def unshard_model(model: nn.Module) -> nn.Module:
    """Put a plain ``EmbeddingBagCollection`` with the gathered full tables (and optimizer
    state) back in place of every sharded one, on every rank (a collective); the model then
    runs, saves and serves as a single-process one."""

    def make(name, sharded):
        weight, state = sharded.gather()
        with torch.random.fork_rng(devices=[]):
            ebc = EmbeddingBagCollection(sharded.num_embeddings, sharded.embedding_dim,
                                         pooling=sharded.pooling, optimizer=sharded.optimizer,
                                         dtype=weight.dtype, device=weight.device,
                                         l2=sharded.l2, l2_mode=sharded.l2_mode)
        ebc.weight.copy_(weight)
        ebc.state.copy_(state)
        ebc.train(sharded.training)
        return ebc

    _replace(model, ShardedEmbeddingBagCollection, make)
    for name, lookup in list(model.named_modules()):
        sharded = getattr(lookup, "dyn", None)
        if isinstance(sharded, ShardedDynamicEmbedding):
            sharded.hook.remove()
            state = merged_state(sharded)
            with torch.random.fork_rng(devices=[]):
                table = DynamicEmbedding(sharded.embedding_dim, sharded.capacity,
                                         **_table_options(sharded))
            table.load_state_tensors(state)
            table.train(sharded.training)
            lookup.dyn = table
    return model


def _table_options(sharded: ShardedDynamicEmbedding) -> dict:
    """The options of the whole table a sharded one was built from."""
    local = sharded.local
    return {"min_count": local.min_count, "admit_prob": local.admit_prob, "ttl": local.ttl,
            "eviction": local.eviction, "optimizer": sharded.optimizer,
            "pooling": sharded.pooling, "init_std": sharded.init_std, "seed": sharded.seed,
            "evict_fraction": local.evict_fraction, "sketch_width": sharded.sketch_width,
            "initializer": None if sharded.own_init else local.initializer}


class GlobalBatchDropout(nn.Module):
    """``nn.Dropout`` for this rank's share of a global batch: its mask is the global batch's
    mask (``functional.dropout``: a hash of the seed and the element's index) at this rank's
    rows (``world`` equal shares), with the seed one process draws from the same generator
    state. Every rank then drops exactly what one process drops, and the ranks' generators
    stay in step (one draw per call on every rank)."""

    def __init__(self, p: float, ctx: DistContext):
        super().__init__()
        self.p, self.rank, self.world = float(p), ctx.rank, ctx.world

    def forward(self, x: Tensor) -> Tensor:  # [n, ...] this rank's rows
        return F.dropout(x, self.p, self.training, offset=self.rank * x.numel())

    def after_linear_relu(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``self(relu(x @ weight.T + bias))`` in one call (``functional.linear_relu_dropout``)."""
        rows_out = x.shape[0] * weight.shape[0]  # the numel of the dropout's input
        return F.linear_relu_dropout(x, weight, bias, self.p, self.training,
                                     offset=self.rank * rows_out)

    def extra_repr(self) -> str:
        return f"p={self.p}, rank={self.rank}/{self.world}"


def global_batch_dropout(model: nn.Module, ctx: DistContext) -> int:
    """Replace every ``nn.Dropout`` of ``model`` by a ``GlobalBatchDropout`` (in place), so that
    a run with dropout follows one process's run at the same global batch and seed; returns how
    many were replaced. Without it each rank draws its own mask, a valid but different sample
    of training."""
    return len(_replace(model, nn.Dropout, lambda name, m: GlobalBatchDropout(m.p, ctx)))


class _SumOverRanks(torch.autograd.Function):
    """x -> the sum of every rank's x (all-reduce on ``group``); the backward is the same sum
    of the gradients, since every rank's output depends on every rank's x."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GlobalBatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the global batch: in training, each feature's mean and variance
    come from the rows of every rank (their sums and sums of squares all-reduced on ``group``,
    and their gradients summed over the ranks in the backward, as one process's backward sums
    them), and the running statistics follow those; eval mode is ``BatchNorm1d``'s.
    The state dict is ``BatchNorm1d``'s, so a checkpoint loads into the plain model. The
    variance is E[x^2] - E[x]^2 (one all-reduce), where one process subtracts the mean first:
    equal up to rounding for the normalised activations of a tower."""

    def __init__(self, bn: nn.BatchNorm1d, ctx: DistContext, group):
        like = bn.weight if bn.affine else bn.running_mean
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine,
                         bn.track_running_stats,
                         device=None if like is None else like.device,
                         dtype=None if like is None else like.dtype)
        self.load_state_dict(bn.state_dict())
        self.world, self.group = ctx.world, group

    def forward(self, x: Tensor) -> Tensor:  # [n, C] this rank's rows
        if not self.training:
            return super().forward(x)
        C, n = self.num_features, x.shape[0] * self.world
        total = _SumOverRanks.apply(torch.cat([x.sum(0), (x * x).sum(0)]), self.group)  # [2C]
        mean = total[:C] / n  # [C]
        var = (total[C:] / n - mean * mean).clamp_min(0)  # [C] biased, what normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * (n / max(n - 1, 1)), alpha=m)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", world={self.world}"


def global_batch_norm(model: nn.Module, ctx: DistContext, group=None) -> int:
    """Replace every ``nn.BatchNorm1d`` of ``model`` by a ``GlobalBatchNorm`` (in place) whose
    collectives run on ``group`` (default: a new group of every rank, apart from DDP's and the
    embedding exchange's; a collective, call it on every rank); returns how many. Without it
    each rank normalises by its own rows' statistics, as DDP does."""
    if group is None:
        group = dist.new_group(backend=ctx.backend, timeout=datetime.timedelta(
            seconds=ctx.timeout_s))
    return len(_replace(model, nn.BatchNorm1d, lambda name, m: GlobalBatchNorm(m, ctx, group)))


def wrap_ddp(model: nn.Module, ctx: DistContext, **ddp_kwargs) -> DistributedDataParallel:
    """``model`` (already sharded) under DDP on ``ctx.group``: the dense parameters are
    broadcast from rank 0 once and their gradients averaged every step; the sharded tables and
    their buffers are left out (each rank holds different ones). Buffers are not broadcast per
    step (``forward_sync_buffers=False``): batch-norm statistics stay per rank."""
    ignore = []
    for name, mod in model.named_modules():
        if isinstance(mod, (ShardedEmbeddingBagCollection, ShardedDynamicEmbedding)):
            ignore += [f"{name}.{b}" for b, _ in mod.named_buffers()]
            ignore += [f"{name}.{p}" for p, _ in mod.named_parameters()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        ddp_kwargs.setdefault("forward_sync_buffers", False)
    else:  # torch before the option's rename
        ddp_kwargs.setdefault("broadcast_buffers", False)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    with ctx.guard("setting up DDP"):
        return DistributedDataParallel(model, device_ids=device_ids, process_group=ctx.group,
                                       **ddp_kwargs)


def local_rows(batch_size: int, ctx: DistContext) -> slice:
    """The rows of a global batch of ``batch_size`` rows that this rank trains on: a contiguous
    share of ``batch_size / world`` rows (rank order = row order, so each table's gradients meet
    in the order a single process sums them). The batch must divide evenly: DDP averages the
    ranks' mean losses, which is the batch's mean loss only for equal shares."""
    if batch_size % ctx.world:
        raise ValueError(f"distributed run: the global batch of {batch_size} rows does not split "
                         f"evenly over {ctx.world} ranks (use a multiple of {ctx.world}, or "
                         "drop the last partial batch)")
    n = batch_size // ctx.world
    return slice(ctx.rank * n, (ctx.rank + 1) * n)


def local_batch(batch, ctx: DistContext):
    """This rank's rows of a global ``Batch`` (see ``local_rows``)."""
    s = local_rows(batch.batch_size, ctx)
    return batch.slice(s.start, s.stop)
