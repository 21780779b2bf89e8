# SPDX-License-Identifier: Apache-2.0
"""All-to-all with explicit split sizes, the one transport of the embedding exchange.

``all_to_all_single`` with uneven splits is what the exchange wants, but not every backend of
every torch release has it (gloo's all-to-all arrived late), so ``Exchange`` probes it once at
start-up and otherwise falls back to one ``scatter`` per source rank, with the chunks padded to
that source's largest one (scatter needs equal sizes). The fallback can be forced
(``mode="scatter"``) so that both paths are tested.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from .process_group import DistContext

#: ``Exchange`` modes: probe and choose, or force one path
MODES = ("auto", "all_to_all", "scatter")


def probe_all_to_all(ctx: DistContext) -> bool:
    """Whether ``all_to_all_single`` with uneven explicit splits works (and moves the right
    values) on ``ctx.emb_group``; every rank gets the same answer."""
    rank, world = ctx.rank, ctx.world
    send = [(rank + j) % 3 + 1 for j in range(world)]  # rank r sends (r + j) % 3 + 1 to j
    recv = [(s + rank) % 3 + 1 for s in range(world)]
    x = torch.cat([torch.full((n,), rank * world + j, dtype=torch.int64, device=ctx.device)
                   for j, n in enumerate(send)])  # [sum send]
    want = torch.cat([torch.full((n,), s * world + rank, dtype=torch.int64, device=ctx.device)
                      for s, n in enumerate(recv)])  # [sum recv]
    out = torch.empty_like(want)
    try:
        dist.all_to_all_single(out, x, recv, send, group=ctx.emb_group)
        ok = torch.equal(out, want)
    except (RuntimeError, NotImplementedError, ValueError):
        # a missing implementation; a dead peer fails the all-reduce below as well
        ok = False
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=ctx.device)
    with ctx.guard("the all_to_all_single probe"):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=ctx.emb_group)
    return bool(flag.item())


def _row_bytes(x: Tensor) -> int:
    """Bytes of one row (index along dim 0) of ``x``, also when ``x`` is empty."""
    n = x.element_size()
    for d in x.shape[1:]:
        n *= d
    return n


class Exchange:
    """Variable-size all-to-all on ``ctx.emb_group``, with byte and time counters.

    ``mode``: ``"auto"`` probes ``all_to_all_single`` and uses it when it works, else the
    scatter fallback; ``"all_to_all"`` or ``"scatter"`` force a path. ``self.mode`` holds the
    path in use. Counters (``reset_stats``/``stats``): bytes sent to and received from other
    ranks (payload; the scatter path also moves its padding, counted apart), the bytes sent per
    kind of exchange ("count", "id", "row", "gradient"), seconds inside collectives (waiting for
    the slowest rank included), calls.
    """

    def __init__(self, ctx: DistContext, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"Exchange: mode must be one of {MODES}, got {mode!r}")
        self.ctx = ctx
        if mode == "auto":
            mode = "all_to_all" if probe_all_to_all(ctx) else "scatter"
        self.mode = mode
        self.reset_stats()

    def reset_stats(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.sent_by_kind: dict[str, int] = {}
        self.padding_bytes = 0
        self.seconds = 0.0
        self.calls = 0

    def stats(self) -> dict:
        return {"mode": self.mode, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "sent_by_kind": dict(self.sent_by_kind),
                "padding_bytes": self.padding_bytes, "seconds": self.seconds,
                "calls": self.calls}

    def counts(self, send_counts: Tensor) -> Tensor:
        """send_counts [world] int64 (what this rank sends to each rank) -> [world] int64, what
        each rank sends to this one."""
        ctx = self.ctx
        t0 = time.perf_counter()
        with ctx.guard(f"the embedding count exchange ({self.mode})"):
            if self.mode == "all_to_all":
                out = torch.empty_like(send_counts)
                dist.all_to_all_single(out, send_counts, group=ctx.emb_group)
            else:
                rows = [torch.empty_like(send_counts) for _ in range(ctx.world)]
                dist.all_gather(rows, send_counts, group=ctx.emb_group)
                out = torch.stack(rows)[:, ctx.rank].contiguous()  # column: sent to me
        self._account(send_counts, [1] * ctx.world, [1] * ctx.world, "count", t0)
        return out

    def variable(self, x: Tensor, send_splits: list[int], recv_splits: list[int],
                 what: str) -> Tensor:
        """x [sum send_splits, ...]: rows ``send_splits[j]`` go to rank j, in rank order ->
        [sum recv_splits, ...]: the rows from each rank, in rank order."""
        ctx = self.ctx
        t0 = time.perf_counter()
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        with ctx.guard(f"the embedding {what} exchange ({self.mode})"):
            if self.mode == "all_to_all":
                dist.all_to_all_single(out, x, recv_splits, send_splits, group=ctx.emb_group)
            else:
                self._scatter(x, out, send_splits, recv_splits)
        self._account(x, send_splits, recv_splits, what, t0)
        return out

    def _scatter(self, x: Tensor, out: Tensor, send_splits: list[int],
                 recv_splits: list[int]) -> None:
        """One scatter per source rank, chunks padded to the source's largest: the sizes of
        every source are gathered first (a rank knows only what it sends and receives)."""
        ctx = self.ctx
        mine = torch.tensor(send_splits, dtype=torch.int64, device=x.device)
        table = [torch.empty_like(mine) for _ in range(ctx.world)]
        dist.all_gather(table, mine, group=ctx.emb_group)
        sizes = torch.stack(table).tolist()  # [src][dst]
        chunks = list(torch.split(x, send_splits))
        starts = [0]
        for n in recv_splits:
            starts.append(starts[-1] + n)
        for src in range(ctx.world):
            pad = max(sizes[src])
            buf = x.new_empty((pad, *x.shape[1:]))
            scatter_list = None
            if src == ctx.rank:
                scatter_list = []
                for c in chunks:
                    if c.shape[0] < pad:
                        c = torch.cat([c, c.new_zeros((pad - c.shape[0], *c.shape[1:]))])
                    scatter_list.append(c)
                self.padding_bytes += sum(pad - n for j, n in enumerate(send_splits)
                                          if j != ctx.rank) * _row_bytes(x)
            dist.scatter(buf, scatter_list, src=src, group=ctx.emb_group)
            n = recv_splits[src]
            out[starts[src]:starts[src] + n] = buf[:n]

    def _account(self, x: Tensor, send_splits: list[int], recv_splits: list[int], what: str,
                 t0: float) -> None:
        me = self.ctx.rank
        sent = sum(n for j, n in enumerate(send_splits) if j != me) * _row_bytes(x)
        self.bytes_sent += sent
        self.sent_by_kind[what] = self.sent_by_kind.get(what, 0) + sent
        self.bytes_received += sum(n for j, n in enumerate(recv_splits) if j != me) * \
            _row_bytes(x)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
