# SPDX-License-Identifier: Apache-2.0
"""Dynamic tables sharded by key: each rank's ``DynamicEmbedding`` holds the keys it owns.

The owner of a key is ``owner_of(key, world)``: a fixed 64-bit mix of the key, modulo the
number of ranks, so a checkpoint reshards to any number of ranks by recomputing it. A training
lookup, on every rank at once (``ShardedDynamicEmbedding``):

1. each rank sends every occurrence of its keys to their owners (key and its place in the
   single process's call, see below), so the owner's map sees each occurrence: its counts,
   count-min sketch, TTL clock and eviction order are those of one process for its keys;
2. the owner sorts what it received into the single process's order and looks it up in its
   map (admitting, inserting, expiring as one process would), then sends back the distinct
   rows each requester needs, with the fused optimizer attached to them, and for each
   occurrence which of those rows it reads;
3. a key outside the table (unknown, unadmitted, expired) reads row 0, the unadmitted row,
   which one process shares between all its keys: every rank holds a copy of it, the
   requesters' gradients of it are summed over the ranks and every copy takes the same fused
   step, so the copies stay equal;
4. rows given to new keys are drawn as one process draws them: every rank draws the values
   of all the call's new keys (over all owners, in the single process's order) from the
   table's generator and keeps its own, so the generators stay in step.

The single process's order: ``SparseLookup`` passes its dynamic table one array of keys made
of blocks (the bags of each table, or of every table row by row, then each history), and the
global batch's array is, block by block, the ranks' blocks in rank order (each rank holds a
contiguous share of the rows). ``dynamic_blocks`` lists the blocks of a rank's call, so that
``(block, rank, place)`` sorts every occurrence into the single process's order.

The admission coins of ``admit_prob < 1`` are a hash of the seed, the key and the call, so
each owner draws the ones one process would. What differs from one process: each shard's
count-min sketch
counts only its own keys (its estimates can only be lower than one process's, whose cells
also count the other shards' keys), and a full table with ``eviction="lfu"``/``"ttl"``
evicts among its shard's keys, each shard holding ``capacity / world`` of them. A growing
table (the default) keeps every key it admits, as one process does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as F
from ..models.base import one_id_per_bag
from ..nn.dynamic_table import DynamicEmbedding
from .exchange import Exchange
from .process_group import DistContext

#: odd 64-bit constant of the owner hash (golden ratio), as a signed int64
_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15
_LOW32 = (1 << 32) - 1
_INT32_MAX = 2**31 - 1
#: bits of an occurrence's place in the sort key (block, rank, place)
_PLACE_BITS, _RANK_BITS = 36, 12


def owner_of(keys: Tensor, world: int) -> Tensor:
    """keys int64 [n] -> the rank [n] int64 that owns each key among ``world`` ranks: the high
    32 bits of ``key * 0x9E3779B97F4A7C15`` (mod 2^64) modulo ``world``. A fixed function of
    the key, so a reshard to another ``world`` only recomputes it."""
    h = (keys * _MIX) >> 32  # arithmetic shift; the low 32 bits of the result are the mix's
    return (h & _LOW32) % world


def dynamic_blocks(lookup, batch) -> list[int]:
    """The lengths of the blocks of keys that ``lookup`` (a ``SparseLookup`` with dynamic
    tables) passes its dynamic table for ``batch``, in call order: the bags of all dynamic
    tables row by row (one key per bag, every table dynamic), else the bags of each dynamic
    table; then each dynamic history. Mirrors ``SparseLookup.forward``'s layout."""
    B, T = batch.batch_size, lookup.num_bags
    indices, offsets = batch.indices, batch.offsets
    seqs = [int(batch.seq_indices[s].numel()) for s, d in
            zip(lookup.sequences, lookup.seq_dynamic) if d]
    if not lookup.mixed and one_id_per_bag(indices, offsets):
        return [B * T, *seqs]
    ends = offsets[::B].tolist()  # [T + 1] first key of each table's bags
    bags = [ends[p + 1] - ends[p] for p, d in enumerate(lookup.bag_dynamic) if d]
    return [*bags, *seqs]


def _sort_keys(blocks: list[int], n: int, rank: int) -> Tensor:
    """[n] int64: ``(block, rank, place in block)`` packed so that the ranks' calls sort into
    the single process's call (see the module docstring)."""
    if sum(blocks) != n:  # not called through SparseLookup: the call is one block
        blocks = [n]
    lengths = torch.tensor(blocks, dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    block = torch.repeat_interleave(torch.arange(len(blocks)), lengths, output_size=n)
    place = torch.arange(n) - starts[block]
    return (block << (_PLACE_BITS + _RANK_BITS)) | (rank << _PLACE_BITS) | place


class _DynamicRows(torch.autograd.Function):
    """Owner rows [R + 1, D] (the rows requested of this rank, then row 0) -> the requesters'
    rows [U + 1, D] (the rows from every owner in rank order, then row 0). Backward: the rows'
    gradients (times ``grad_scale``) go back to their owners, and row 0's is summed over the
    ranks, so every copy of row 0 takes the same step."""

    @staticmethod
    def forward(ctx, rows, exchange, to_requesters, from_owners, grad_scale):
        ctx.exchange, ctx.splits, ctx.grad_scale = exchange, (to_requesters, from_owners), \
            grad_scale
        rows = rows.detach()
        got = exchange.variable(rows[:-1], to_requesters, from_owners, "row")
        return torch.cat([got, rows[-1:]])

    @staticmethod
    def backward(ctx, grad):
        to_requesters, from_owners = ctx.splits
        if grad.is_sparse:  # from the ragged pooling (functional.embedding_bag)
            grad = grad.coalesce().to_dense()
        grad = grad * ctx.grad_scale if ctx.grad_scale != 1.0 else grad.clone()
        ex = ctx.exchange
        back = ex.variable(grad[:-1], from_owners, to_requesters, "gradient")
        g0 = grad[-1:].contiguous()
        with ex.ctx.guard("summing the unadmitted row's gradient"):
            dist.all_reduce(g0, group=ex.ctx.emb_group)
        return torch.cat([back, g0]), None, None, None, None


class _PickRows(torch.autograd.Function):
    """rows [U, D], index [K] -> rows[index] [K, D]; the backward sums the gradients of a row's
    repeats serially, in the order of ``index`` (an accumulating index_put: deterministic, and
    cheaper on the CPU than the scatter_add autograd uses for index_select)."""

    @staticmethod
    def forward(ctx, rows, index):
        ctx.save_for_backward(index)
        ctx.num_rows = rows.shape[0]
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.num_rows, grad.shape[1])
        return out.index_put_((index,), grad, accumulate=True), None


def _gather_var(x: Tensor, ctx: DistContext) -> list[Tensor]:
    """Every rank's 1-D int64 ``x`` (sizes may differ), in rank order, on every rank."""
    n = torch.tensor([x.numel()], dtype=torch.long)
    sizes = [torch.empty_like(n) for _ in range(ctx.world)]
    dist.all_gather(sizes, n, group=ctx.emb_group)
    sizes = [int(s) for s in sizes]
    pad = max(sizes)
    buf = torch.zeros(pad, dtype=x.dtype)
    buf[:x.numel()] = x
    parts = [torch.empty_like(buf) for _ in range(ctx.world)]
    dist.all_gather(parts, buf, group=ctx.emb_group)
    return [p[:s] for p, s in zip(parts, sizes)]


class ShardedDynamicEmbedding(nn.Module):
    """A ``DynamicEmbedding`` sharded by key over the ranks of ``ctx`` (see the module
    docstring): ``self.local`` holds this rank's keys (capacity ``ceil(capacity / world)``,
    the same sketch width as the whole table's), with the table's options and optimizer.
    Same call as ``DynamicEmbedding``: ``forward(keys, offsets=None, per_sample_weights=None,
    now=None) -> [bags, D]`` for this rank's keys; every rank must call it once per step, in
    the same mode. ``table`` may hold keys already (a loaded checkpoint): each rank keeps its
    own, without any communication (every rank splits the same table)."""

    def __init__(self, table: DynamicEmbedding, ctx: DistContext, exchange: Exchange,
                 name: str = "dynamic table"):
        super().__init__()
        world = ctx.world
        if table.capacity < world:
            raise ValueError(f"{name}: capacity {table.capacity} is smaller than the {world} "
                             f"ranks it is sharded over (each rank holds capacity / {world} "
                             f"keys); give a capacity of at least {world}")
        self.ctx, self.exchange, self.name = ctx, exchange, name
        self.embedding_dim, self.capacity = table.embedding_dim, table.capacity
        self.optimizer, self.pooling = table.optimizer, table.pooling
        self.init_std, self.seed = table.init_std, table.seed
        self.sketch_width = table.sketch_width
        self.grad_scale = 1.0 / world
        state = table.state_tensors()
        # the whole table's sketch width (4 rows of counters), whatever chose it: a key's
        # cells are then the same in every shard as in the whole table
        width = state["sketch"].numel() // 4 or None
        self.local = DynamicEmbedding(
            table.embedding_dim, -(-table.capacity // world), min_count=table.min_count,
            admit_prob=table.admit_prob, ttl=table.ttl, eviction=table.eviction,
            optimizer=table.optimizer, pooling="sum", init_std=table.init_std,
            initializer=table.initializer if table.initializer is not None else self._record,
            seed=table.seed, evict_fraction=table.evict_fraction, sketch_width=width)
        self.own_init = table.initializer is None  # draw new rows as one process does
        self._gen = torch.Generator()
        self._fresh: list[Tensor] = []
        self.blocks: list[int] | None = None  # set per call by the lookup's pre-hook
        self.load_table_state(state)

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def load_table_state(self, t: dict[str, Tensor]) -> None:
        """Keep this rank's keys of a whole table's ``state_tensors`` (row 0 and the clocks on
        every rank; the sketch as the base every shard counts on, see ``shard_state``)."""
        keys, counts = t["row_keys"], t["row_counts"]
        live = torch.nonzero(counts > 0).squeeze(1)
        live = live[live > 0]
        mine = live[owner_of(keys[live], self.ctx.world) == self.ctx.rank]  # [K] whole rows
        rows = torch.cat([torch.zeros(1, dtype=torch.long), mine])  # [K + 1]
        adagrad = t["state"].numel() > 0
        want = max(rows.numel(), self.local.capacity + 1)
        weight = torch.zeros(want, self.embedding_dim, dtype=t["weight"].dtype)
        weight[:rows.numel()] = t["weight"][rows]
        state = torch.zeros(want if adagrad else 0)
        if adagrad:
            state[:rows.numel()] = t["state"][rows]
        scalars = t["scalars"].clone()
        scalars[0] = want
        scalars[4] = 0  # overflow: counted per shard from here
        self.local.load_state_tensors({
            "weight": weight, "state": state, "row_keys": keys[rows].clone(),
            "row_counts": counts[rows].clone(), "row_last_seen": t["row_last_seen"][rows].clone(),
            "free_rows": torch.zeros(0, dtype=torch.long), "sketch": t["sketch"].clone(),
            "scalars": scalars, "step": t["step"].clone(), "init_rng": t["init_rng"]})
        self.sketch_base = t["sketch"].clone()  # [4 * width] int32
        self.overflow_base = int(t["scalars"][4])
        self._gen.set_state(t["init_rng"])

    def shard_state(self) -> dict[str, Tensor]:
        """This shard's ``state_tensors`` (its rows, row 0 first), with ``sketch`` holding only
        the counts it added since it was built and ``init_rng`` the table's generator."""
        t = dict(self.local.state_tensors())
        t["sketch"] = t["sketch"] - self.sketch_base
        t["init_rng"] = self._gen.get_state()
        return t

    # ------------------------------------------------------------------ lookups
    def _record(self, keys: Tensor) -> Tensor:
        """The local table's initializer: notes the new keys; their rows are drawn after the
        call, over every shard (``_draw_fresh``)."""
        self._fresh.append(keys.clone())
        return torch.zeros(keys.numel(), self.embedding_dim)

    def forward(self, keys: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None, now: int | None = None) -> Tensor:
        if not isinstance(keys, Tensor) or keys.dtype != torch.int64 or keys.dim() != 1:
            raise TypeError(f"{self.name}: keys must be a CPU int64 tensor [n], got "
                            f"{getattr(keys, 'dtype', type(keys).__name__)}")
        blocks, self.blocks = self.blocks, None
        train = self.training and torch.is_grad_enabled()
        with self.ctx.guard(f"the lookup of {self.name}"):
            if train:
                table, index = self._train_rows(keys, blocks, now)  # [U + 1, D], [n]
            else:
                table, index = self._eval_rows(keys)
        if offsets is None:
            out = _PickRows.apply(table, index)  # [n, D]
            if per_sample_weights is not None:
                out = out * per_sample_weights.reshape(-1, 1).to(out.dtype)
            return out
        return F.embedding_bag(table, torch.tensor([0, table.shape[0]]), index, offsets,
                               per_sample_weights, self.pooling)

    def _train_rows(self, keys: Tensor, blocks, now) -> tuple[Tensor, Tensor]:
        ctx, ex, local = self.ctx, self.exchange, self.local
        world, me, n = ctx.world, ctx.rank, keys.numel()
        own = owner_of(keys, world)  # [n]
        order = torch.argsort(own, stable=True)  # [n] occurrences grouped by owner
        send = torch.bincount(own, minlength=world)
        to_owners = send.tolist()
        from_req = ex.counts(send).tolist()
        sk = _sort_keys(blocks or [n], n, me)  # [n]
        got = ex.variable(torch.stack([keys[order], sk[order]], 1), to_owners, from_req,
                          "id")  # [R, 2]
        g = torch.argsort(got[:, 1])  # [R] into the single process's order
        call = got[:, 0][g].contiguous()
        self._fresh = []
        rows_sorted = local.rows(call, now=now, train=True)  # [R]
        if self.own_init:
            self._draw_fresh(rows_sorted, got[:, 1][g])
        rows = torch.empty_like(rows_sorted)
        rows[g] = rows_sorted  # [R] in received order
        # the distinct rows each requester reads, row 0 apart (every rank has it)
        nrows = local.num_rows
        seg = torch.repeat_interleave(torch.arange(world), torch.tensor(from_req),
                                      output_size=rows.numel())
        uniq, inv = torch.unique(seg * nrows + rows, return_inverse=True)  # [V], [R]
        kept = uniq % nrows != 0
        pos = torch.cumsum(kept, 0) - 1  # [V] place among the kept rows
        back = torch.bincount(uniq[kept] // nrows, minlength=world)  # [world]
        first = torch.cumsum(back, 0) - back  # [world] each requester's first kept row
        reads = torch.where(kept[inv], pos[inv] - first[seg], -1)  # [R] per requester, or -1
        # int32 on the wire on every rank alike (the exchange's buffers take the sender's
        # dtype): an index among the rows one owner sends one requester in one step
        if uniq.numel() > _INT32_MAX:
            raise ValueError(f"{self.name}: {uniq.numel()} distinct rows requested of rank "
                             f"{me} in one step; at most {_INT32_MAX}")
        reads = reads.to(torch.int32)
        to_requesters = back.tolist()
        from_owners = ex.counts(back).tolist()
        where = ex.variable(reads, from_req, to_owners, "id")  # [n] grouped by owner
        wanted = torch.cat([uniq[kept] % nrows, torch.zeros(1, dtype=torch.long)])  # [K + 1]
        adagrad = local.state.numel() > 0
        weight = local.weight
        owned = F.embedding_bag(weight, torch.tensor([0, weight.shape[0]]), wanted,
                                torch.arange(wanted.numel() + 1), None, "sum",
                                optimizer=self.optimizer,
                                state=local.state if adagrad else None)  # [K + 1, D]
        if owned.requires_grad:
            local._track(owned)
        table = _DynamicRows.apply(owned, ex, to_requesters, from_owners,
                                   self.grad_scale)  # [U + 1, D]
        U = table.shape[0] - 1
        starts = torch.tensor(from_owners).cumsum(0) - torch.tensor(from_owners)  # [world]
        own_sorted = own[order]
        idx = torch.where(where >= 0, starts[own_sorted] + where, U)  # [n] owner-grouped
        index = torch.empty_like(idx)
        index[order] = idx
        return table, index

    @torch.no_grad()
    def _draw_fresh(self, rows_sorted: Tensor, sk_sorted: Tensor) -> None:
        """The rows this call gave to new keys, drawn as one process draws them: N(0, init_std)
        for all the call's new keys over every shard, in the single process's order, from the
        table's generator (on every rank); each shard keeps its own keys' rows."""
        fresh = torch.cat(self._fresh) if self._fresh else torch.zeros(0, dtype=torch.long)
        self._fresh = []
        mine = torch.zeros(0, dtype=torch.long)
        fr = self.local.rows(fresh) if fresh.numel() else mine  # [f] their rows
        if fr.numel():
            # a new key's place: its first occurrence that reads its new row (a mask over the
            # rows finds the occurrences of new rows without isin's sort)
            new = torch.zeros(self.local.num_rows, dtype=torch.bool)
            new[fr] = True
            at = torch.nonzero(new[rows_sorted]).squeeze(1)
            u, inv = torch.unique(rows_sorted[at], return_inverse=True)
            first = torch.full((u.numel(),), rows_sorted.numel(), dtype=torch.long)
            first.scatter_reduce_(0, inv, at, "amin")
            mine = sk_sorted[first[torch.searchsorted(u, fr)]]  # [f]
        everyone = torch.cat(_gather_var(mine, self.ctx))  # [F]
        if not everyone.numel():
            return
        values = torch.empty(everyone.numel(), self.embedding_dim)
        values.normal_(0.0, self.init_std, generator=self._gen)
        if fr.numel():
            place = torch.searchsorted(torch.sort(everyone).values, mine)
            w = self.local.weight
            w.data.index_copy_(0, fr, values[place].to(w.dtype))

    def _eval_rows(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Read-only: each distinct key's row from its owner (row 0 for a key outside it)."""
        ctx, ex = self.ctx, self.exchange
        uniq, inv = torch.unique(keys, return_inverse=True)  # [U], [n]
        own = owner_of(uniq, ctx.world)
        order = torch.argsort(own, stable=True)
        send = torch.bincount(own, minlength=ctx.world)
        to_owners = send.tolist()
        from_req = ex.counts(send).tolist()
        wanted = ex.variable(uniq[order], to_owners, from_req, "id")  # [R]
        local = self.local
        rows = local.weight[local.rows(wanted)]  # [R, D]
        got = ex.variable(rows, from_req, to_owners, "row")  # [U, D] by owner
        table = torch.empty_like(got)
        table[order] = got
        return table, inv

    # ------------------------------------------------------------------ properties
    @property
    def num_keys(self) -> int:
        """Keys with a row, over every shard (a collective)."""
        n = torch.tensor([self.local.num_keys], dtype=torch.long)
        with self.ctx.guard(f"counting the keys of {self.name}"):
            dist.all_reduce(n, group=self.ctx.emb_group)
        return int(n)

    @property
    def weight(self) -> Tensor:
        return self.local.weight

    def extra_repr(self) -> str:
        return (f"{self.name}: rank {self.ctx.rank}/{self.ctx.world}, local keys "
                f"{self.local.num_keys}, dim={self.embedding_dim}, capacity={self.capacity}")


def lookup_pre_hook(lookup, args) -> None:
    """Forward pre-hook of a ``SparseLookup`` whose dynamic table is sharded: tells the table
    the blocks of its next call (``dynamic_blocks``)."""
    if lookup.training and torch.is_grad_enabled():
        lookup.dyn.blocks = dynamic_blocks(lookup, args[0])


#: the state tensors with one entry per row of the table (split by rows in a checkpoint)
ROW_KEYS = ("weight", "state", "row_keys", "row_counts", "row_last_seen")


def merged_bases(used: list[int]) -> list[int]:
    """The whole table's rows from the shards' (``used``: each shard's rows in use, row 0
    included): shard 0's rows keep their numbers, shard r's row f >= 1 becomes
    ``bases[r] + f`` (the shards' rows follow each other, row 0 once)."""
    bases = [0]
    for u in used[:-1]:
        bases.append(bases[-1] + u - 1)
    return bases


def merge_small(shards: list[dict], used: list[int], base: dict, capacity: int) -> dict:
    """The whole table's ``free_rows``, ``sketch``, ``scalars``, ``step``, ``init_rng`` from the
    shards' ``shard_state``s (without their row tensors); ``base``: the sketch and overflow the
    shards started from (``sketch_base``, ``overflow_base``)."""
    bases = merged_bases(used)
    n_used = bases[-1] + used[-1]
    free = torch.cat([s["free_rows"] + b for s, b in zip(shards, bases)])
    sketch = base["sketch"] + sum(s["sketch"] for s in shards)
    scalars = shards[0]["scalars"].clone()
    scalars[0] = max(n_used, capacity + 1)
    scalars[1] = max(int(s["scalars"][1]) for s in shards)  # the clock
    scalars[3] = max(int(s["scalars"][3]) for s in shards)  # training calls
    scalars[4] = base["overflow"] + sum(int(s["scalars"][4]) for s in shards)
    return {"free_rows": free, "sketch": sketch.clamp(max=65535), "scalars": scalars,
            "step": shards[0]["step"], "init_rng": shards[0]["init_rng"]}


def shard_rows(t: dict, rank: int) -> slice:
    """The rows of a shard's state that the whole table takes (row 0 from shard 0 only)."""
    return slice(0 if rank == 0 else 1, t["row_keys"].numel())


def merged_state(sharded: ShardedDynamicEmbedding) -> dict[str, Tensor]:
    """The whole table's ``state_tensors``, gathered from every shard (a collective): what
    one process's table holds, loadable into a ``DynamicEmbedding`` of the same options."""
    ctx = sharded.ctx
    mine = sharded.shard_state()
    shards: list = [None] * ctx.world
    with ctx.guard(f"gathering {sharded.name}"):
        dist.all_gather_object(shards, mine, group=ctx.group)
    used = [s["row_keys"].numel() for s in shards]
    out = merge_small(shards, used, {"sketch": sharded.sketch_base,
                                     "overflow": sharded.overflow_base}, sharded.capacity)
    R = int(out["scalars"][0])
    for k in ROW_KEYS:
        parts = [s[k][shard_rows(s, r)] for r, s in enumerate(shards)
                 if k != "state" or s[k].numel()]
        if not parts:  # SGD: no optimizer state
            out[k] = shards[0][k]
            continue
        full = torch.cat(parts)
        if k in ("weight", "state") and full.shape[0] < R:
            full = torch.cat([full, full.new_zeros((R - full.shape[0], *full.shape[1:]))])
        out[k] = full
    return out


__all__ = ["ROW_KEYS", "ShardedDynamicEmbedding", "dynamic_blocks", "lookup_pre_hook",
           "merge_small", "merged_bases", "merged_state", "owner_of", "shard_rows"]
