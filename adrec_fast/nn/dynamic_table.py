# SPDX-License-Identifier: Apache-2.0
"""DynamicEmbedding: an embedding table keyed by raw 64-bit values, with no vocabulary pass.

A native map (``csrc/cpu/dynamic_table.cpp``) turns keys into rows of one ``weight [R, D]``
buffer with zero collisions (open addressing over whole keys); the pooled lookup, backward and
fused optimizer update are the ones of :func:`adrec_fast.functional.embedding_bag`.
"""
from __future__ import annotations

import json
import math
import weakref
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .. import functional as F
from .._dynamic_table import UNADMITTED_ROW, DynamicTable
from .._memory import empty_table, huge_pages_enabled
from ..data.tensorfile import read_metadata, read_tensors
from ..optim import FusedRowwiseAdagrad, FusedSGD

#: what a full table does (see DynamicEmbedding)
EVICTION = ("grow", "lfu", "ttl")


class _Pending:
    """A training forward whose backward (and so fused update) has not run: referenced only by
    a hook in its autograd graph, so it dies with a graph dropped without backward."""

    __slots__ = ("done", "epoch", "__weakref__")

    def __init__(self, epoch: int):
        self.done = False
        self.epoch = epoch  # the map's number for the call

    def mark(self, *_) -> None:
        """The post-hook of the lookup's backward node: its fused update has run."""
        self.done = True


class DynamicEmbedding(nn.Module):
    """Pooled embedding bags over raw int64 keys (hashes of feature values).

    ``forward(keys, offsets=None, per_sample_weights=None, now=None) -> [B, D]``: bag b pools
    the rows of ``keys[offsets[b]:offsets[b+1]]`` (``offsets [B+1]``; None: one key per bag,
    ``[n, D]``).

    **Training** (``self.training`` and grad enabled) looks keys up and inserts new ones:

    * *admission*: a new key gets its own row once it has been seen ``min_count`` times (a
      count-min sketch of 4 x ``sketch_width`` 16-bit counters) and, with ``admit_prob``, when a
      coin says yes: one coin per key and training call, a hash of ``seed``, the key and the
      call (so it does not depend on the other keys, and a table split by key draws the same). Until then it reads row 0, the **unadmitted row**: a real row of the
      table, zero at the start and trained by every lookup of an unadmitted key (the role of the
      out-of-vocabulary row of a static table), never a zero vector outside the table.
    * *time*: ``now`` is the stream time of the batch (any int64 unit); None counts training
      calls (steps). With ``ttl``, a key not seen for more than ``ttl`` is expired: it is a new
      key again (its row freed, re-initialised once re-admitted) and serving reads row 0 for it.
    * *a full table* (``capacity`` keys): ``eviction="grow"`` doubles the rows when a call
      could bring more new keys than there are spare rows (the call's length is the bound),
      after sweeping out the expired keys. Growing copies the rows to new storage, so it is
      refused (RuntimeError) while the backward of an earlier training forward through the
      table is pending: that fused update would land in the old storage. ``"lfu"`` evicts the
      keys with the fewest lookups (ties: the least recently seen); ``"ttl"`` the least
      recently seen (ties: fewest lookups). Expired keys go first. Eviction frees ``evict_fraction`` of the keys at once (at least one), so that one
      scan of the table pays for many inserts. Keys used by the current call, or by an earlier
      training forward whose backward has not run yet, are neither evicted nor expired (that
      update must find its rows).
      An insert never fails: only a call with more distinct new keys than the table has rows
      sends the surplus to row 0 (counted in ``overflow``).
    * a row given to a new key (fresh, or reused after eviction) is re-initialised
      (``initializer(keys) -> [k, D]``, default N(0, init_std)) and its optimizer state zeroed
      before anything reads it.

    **Eval / no grad** is read-only: unknown, unadmitted and expired keys read row 0. It is safe
    while another thread trains: the map is read under a shared lock, and the rows are read
    after the map, from the storage current at that point (a grown table is copied, never
    shrunk). A concurrent update may be seen half-applied, as in any Hogwild-style reader.

    ``optimizer``: ``FusedSGD`` / ``FusedRowwiseAdagrad`` fuse the update into the backward
    (``weight`` and ``state`` are buffers, updated in place); None is a lookup-only table (no
    gradient reaches it). Forward, backward and update are deterministic, as is the map
    (admission coins and row order follow key order).

    Checkpoints: :meth:`save` / :meth:`load` (safetensors: keys, rows, optimizer state,
    counters, sketch, config). Inside a model, the same tensors (:meth:`state_tensors`) are the
    module's entries in ``state_dict`` (``<prefix>weight``, ``<prefix>row_keys``, ...), whose
    shapes follow the table's size; ``load_state_dict`` restores them whatever the size of the
    table it loads into. ``copy.deepcopy`` copies the map too.
    """

    def __init__(
        self,
        embedding_dim: int,
        capacity: int,
        *,
        min_count: int = 1,
        admit_prob: float | None = None,
        ttl: int | None = None,
        eviction: str = "grow",
        optimizer: FusedSGD | FusedRowwiseAdagrad | None = None,
        pooling: str = "sum",
        init_std: float | None = None,
        initializer: Callable[[Tensor], Tensor] | None = None,
        seed: int = 0,
        evict_fraction: float = 0.01,
        sketch_width: int | None = None,
    ):
        super().__init__()
        name = "DynamicEmbedding"
        for arg, v in (("embedding_dim", embedding_dim), ("capacity", capacity),
                       ("min_count", min_count), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: {arg} must be an int, got {type(v).__name__}")
        if embedding_dim <= 0:
            raise ValueError(f"{name}: embedding_dim must be > 0, got {embedding_dim}")
        if capacity <= 0:
            raise ValueError(f"{name}: capacity must be > 0 keys, got {capacity}")
        if eviction not in EVICTION:
            raise ValueError(f"{name}: eviction must be one of {EVICTION}, got {eviction!r}")
        if ttl is not None and not (isinstance(ttl, int) and ttl > 0):
            raise ValueError(f"{name}: ttl must be a positive int (time units or steps) or "
                             f"None, got {ttl!r}")
        if admit_prob is not None and not 0.0 < float(admit_prob) <= 1.0:
            raise ValueError(f"{name}: admit_prob must be in (0, 1] or None, got {admit_prob}")
        if optimizer is not None and not isinstance(optimizer, (FusedSGD, FusedRowwiseAdagrad)):
            raise TypeError(f"{name}: optimizer must be adrec_fast.optim.FusedSGD, "
                            f"FusedRowwiseAdagrad or None, got {type(optimizer).__name__}")
        F.check_pooling(pooling)
        self.embedding_dim = embedding_dim
        self.capacity = capacity
        self.min_count = min_count
        self.admit_prob = None if admit_prob is None else float(admit_prob)
        self.ttl = ttl
        self.eviction = eviction
        self.optimizer = optimizer
        self.pooling = pooling
        self.init_std = 0.1 / math.sqrt(embedding_dim) if init_std is None else float(init_std)
        self.initializer = initializer
        self.seed = seed
        self.evict_fraction = float(evict_fraction)
        self.sketch_width = sketch_width
        # the map checks min_count, evict_fraction and sketch_width, with messages naming them
        self._map = self._new_map()
        self._gen = torch.Generator().manual_seed(seed)
        self.step = 0  # training calls so far: the clock when no stream time is given
        self._pending: list[weakref.ref] = []  # training forwards awaiting their backward
        self._iota = torch.arange(1)
        rows = capacity + 1  # row 0: the unadmitted row
        self.register_buffer("weight", self._zeros(rows, embedding_dim), persistent=False)
        self.register_buffer("state", self._zeros(rows if self._adagrad else 0), persistent=False)
        self._tofs = (rows, torch.tensor([0, rows]))
        self._init_following()

    @property
    def _adagrad(self) -> bool:
        return isinstance(self.optimizer, FusedRowwiseAdagrad)

    @staticmethod
    def _zeros(*shape: int) -> Tensor:
        t = empty_table(*shape)  # huge pages for a large table (_memory.py)
        t.zero_()
        return t

    # ------------------------------------------------------------------ lookups
    def forward(self, keys: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None, now: int | None = None) -> Tensor:
        train = self.training and torch.is_grad_enabled()
        rows = self.rows(keys, now=now, train=train)  # [n]
        if offsets is None:  # one key per bag: a prefix of a cached 0, 1, 2, ...
            if self._iota.numel() <= rows.numel():
                self._iota = torch.arange(max(rows.numel() + 1, 2 * self._iota.numel()))
            offsets = self._iota[: rows.numel() + 1]
        weight = self.weight  # read after the map (see the class docstring)
        n, tofs = self._tofs  # one tuple, swapped whole: it may belong to another weight
        if n != weight.size(0):
            tofs = torch.tensor([0, weight.size(0)])
        if train and self.optimizer is not None:
            out = F.embedding_bag(weight, tofs, rows, offsets, per_sample_weights, self.pooling,
                                  optimizer=self.optimizer,
                                  state=self.state if self._adagrad else None)
            if out.requires_grad:
                self._track(out)
            return out
        return F.embedding_bag(weight, tofs, rows, offsets, per_sample_weights, self.pooling)

    def rows(self, keys: Tensor, now: int | None = None, train: bool = False) -> Tensor:
        """keys int64 [n] -> rows int64 [n] of ``weight``. ``train``: admit, insert, evict and
        re-initialise as in a training forward (``now`` as there); otherwise read-only, row 0
        for a key outside the table."""
        if not isinstance(keys, Tensor):
            raise TypeError(f"DynamicEmbedding: keys must be an int64 tensor [n], got "
                            f"{type(keys).__name__}")
        if keys.dtype != torch.int64 or keys.dim() != 1 or keys.device.type != "cpu":
            raise TypeError(f"DynamicEmbedding: keys must be a CPU int64 tensor [n], got "
                            f"{keys.dtype} {list(keys.shape)} on {keys.device}")
        if self._sharing:
            got = self._followed_rows(keys, train)
            if got is not None:
                return got
        k = keys.detach().numpy()  # a view; a strided one is refused by the map, by name
        if not train:
            return torch.from_numpy(self._map.find(k))
        self.step += 1
        now = self.step if now is None else int(now)
        # the rows of forwards whose backward is still to run stay with their keys
        since = min((t.epoch for r in self._pending if (t := r()) is not None and not t.done),
                    default=0)
        if self.eviction == "grow":
            self._reserve(k.shape[0], now, since)
        rows, fresh_rows, fresh_keys = self._map.lookup(k, now, since)
        if self._map.rows > self.weight.size(0):  # the map grew on its own: follow it
            self._grow(self._map.rows)
        if fresh_rows.size:
            self._reset(torch.from_numpy(fresh_rows), torch.from_numpy(fresh_keys))
        rows = torch.from_numpy(rows)
        if self._follower is not None:  # its next call may take its rows from this one
            self._last = (keys, rows)
        return rows

    def _track(self, out: Tensor) -> None:
        tok = _Pending(self._map.epoch)
        # a hook on the node (called once its backward, the fused update, has run) costs
        # about half of a tensor hook, which every training step pays
        out.grad_fn.register_hook(tok.mark)
        pending = self._pending  # updated in place: nn.Module.__setattr__ costs microseconds
        if pending:
            pending[:] = [r for r in pending if (t := r()) is not None and not t.done]
        pending.append(weakref.ref(tok))

    def _reserve(self, n: int, now: int, since: int) -> None:
        """Rows for up to n new keys, before the map may hand them out (so that a reader never
        gets a row the storage lacks): sweep out the expired keys, else double."""
        spare = self._map.spare_rows()
        if spare >= n:
            return
        if self.ttl is not None:
            self._map.expire(now, since)
            spare = self._map.spare_rows()
            if spare >= n:
                return
        if since:
            # the pending backward would update the old storage: refuse rather than lose it
            raise RuntimeError(
                f"DynamicEmbedding: the table ({self.num_keys} keys) must grow for new keys, but "
                "the backward of an earlier training forward through it has not run; its fused "
                "update would land in the old storage. Run backward before the next training "
                "forward through this table, or give it a larger capacity.")
        rows = self.weight.size(0)
        self._grow(max(2 * rows, rows + n - spare))
        self._map.reserve_rows(self.weight.size(0))

    @torch.no_grad()
    def _grow(self, rows: int) -> None:
        old = self.weight.size(0)
        w = self._zeros(rows, self.embedding_dim)
        w[:old].copy_(self.weight)
        s = self.state
        if self._adagrad:
            s = self._zeros(rows)
            s[:old].copy_(self.state)
        self.weight, self.state = w, s
        self._tofs = (rows, torch.tensor([0, rows]))

    def _reset(self, rows: Tensor, keys: Tensor) -> None:
        """Rows just given to new keys [k]: fresh values, zero optimizer state (written through
        ``.data``: autograd never sees it, with no no_grad context to pay for every call)."""
        if self.initializer is not None:
            with torch.no_grad():
                v = self.initializer(keys)
            if not isinstance(v, Tensor) or tuple(v.shape) != (keys.numel(), self.embedding_dim):
                raise ValueError(f"DynamicEmbedding: initializer(keys [{keys.numel()}]) must "
                                 f"return [{keys.numel()}, {self.embedding_dim}], got "
                                 f"{getattr(v, 'shape', type(v).__name__)}")
        else:
            v = torch.empty(keys.numel(), self.embedding_dim)
            v.normal_(0.0, self.init_std, generator=self._gen)
        # through .data: no version bump. A pending backward saved the storage, and the
        # version check would refuse it, but it never reads these rows (the map keeps the rows
        # of pending forwards from being reused), so it is unaffected.
        self.weight.data.index_copy_(0, rows, v.to(self.weight.dtype))
        if self._adagrad:
            self.state.data.index_fill_(0, rows, 0.0)

    # ------------------------------------------------------------------ following a leader
    def _new_map(self) -> DynamicTable:
        return DynamicTable(self.capacity, self.min_count, self.admit_prob or 1.0, self.ttl or 0,
                            self.eviction, self.seed, self.evict_fraction,
                            self.sketch_width or 0, huge_pages_enabled())

    def _init_following(self) -> None:
        # plain attributes (object.__setattr__): the tables are other modules' submodules
        object.__setattr__(self, "_lead", None)  # the table whose map this one may share
        object.__setattr__(self, "_follower", None)  # the table that may share this one's
        self._last = None  # (keys, rows) of the last training call, kept for the follower
        self._seen = torch.zeros(0, dtype=torch.bool)  # [rows] sharing: rows this table holds

    @property
    def _sharing(self) -> bool:
        return self._lead is not None and self._map is self._lead._map

    def _first_sight(self) -> bool:
        """Admits a key at its first training sighting and never expires nor evicts one."""
        return (self.min_count == 1 and self.admit_prob in (None, 1.0) and self.ttl is None
                and self.eviction == "grow")

    def follow(self, leader: DynamicEmbedding) -> bool:
        """Shares ``leader``'s key -> row map: a training forward whose keys begin the keys of
        the leader's last training call takes its rows from that call instead of probing the
        map a second time (a first-order table behind its model's embedding table, which looks
        the same keys up first). Reads (eval, no grad) use the shared map.

        Only where it changes no answer: both tables admit a key at its first training
        sighting and never expire or evict one (``min_count`` 1, no ``admit_prob``, no
        ``ttl``, ``eviction="grow"``), and this table's new rows start at zero (``init_std``
        0, no ``initializer``). The shared map holds keys that only the leader looked up; this
        table keeps its own set (``_seen``: the rows its training calls read), reads row 0 for
        the others as its own map would, and its checkpoints (``state_tensors``) list only its
        own keys. Loading a state that disagrees with the leader's map, a training call whose
        keys are not the leader's, or an initializer set later gives this table a map of its
        own again, holding its keys at their rows (same answers); loading a state into the
        leader does too, until this table loads a state that agrees. Returns whether the map
        is shared."""
        if not isinstance(leader, DynamicEmbedding) or leader is self:
            raise TypeError(f"DynamicEmbedding.follow: the leader must be another "
                            f"DynamicEmbedding, got {type(leader).__name__}")
        if not (self._first_sight() and leader._first_sight() and self.init_std == 0.0
                and self.initializer is None):
            return False
        if self._follower is not None or leader._lead is not None:
            return False  # one level: a leader follows nobody, a follower leads nobody
        if leader._follower is not None and leader._follower is not self:
            leader._follower._unshare()
            object.__setattr__(leader._follower, "_lead", None)
        object.__setattr__(self, "_lead", leader)
        object.__setattr__(leader, "_follower", self)
        self._share()
        return self._sharing

    def _share(self) -> None:
        """Takes the leader's map when this table's own keys sit at the same rows there (each
        row this table holds is the leader's row of the same key); else keeps its own."""
        lead = self._lead
        mine, theirs = self._map.state(), lead._map.state()
        live = np.flatnonzero(mine["row_counts"] > 0)
        live = live[live > 0]
        U = theirs["row_keys"].size
        if live.size and (live[-1] >= U or (theirs["row_counts"][live] == 0).any()
                          or (theirs["row_keys"][live] != mine["row_keys"][live]).any()):
            return
        rows = max(self.weight.size(0), lead.weight.size(0))
        if rows > self.weight.size(0):
            self._grow(rows)
        seen = torch.zeros(rows, dtype=torch.bool)
        seen[torch.from_numpy(live)] = True
        free = ~seen
        free[0] = False  # row 0, the unadmitted row, is this table's own
        # a row this table does not hold is new to it when it first reads it: zero
        self.weight.data[free] = 0.0
        if self._adagrad:
            self.state.data[free] = 0.0
        self._seen = seen
        self._map = lead._map
        lead._last = None

    def _unshare(self) -> None:
        """A map of its own again, holding this table's keys at their rows."""
        st = self._own_state()
        self._map = self._new_map()
        self._map.load_state(st["row_keys"].numpy(), st["row_counts"].numpy(),
                             st["row_last_seen"].numpy(), st["free_rows"].numpy(),
                             st["sketch"].numpy().astype("uint16"), st["scalars"].numpy())
        if st["weight"].size(0) > self.weight.size(0):
            self._grow(st["weight"].size(0))
        self._seen = torch.zeros(0, dtype=torch.bool)

    def _followed_rows(self, keys: Tensor, train: bool) -> Tensor | None:
        """Rows of ``keys`` while sharing the leader's map; None: the call goes to a map of
        this table's own (see follow)."""
        seen = self._seen
        if not train:
            rows = torch.from_numpy(self._map.find(keys.detach().numpy()))
            held = seen[rows.clamp(max=seen.numel() - 1)] & (rows < seen.numel())
            return torch.where(held, rows, 0)
        last, n = self._lead._last, keys.numel()
        # (numpy compares and marks in about half of torch's time per step)
        if (last is None or last[0].numel() < n or self.initializer is not None
                or self.init_std != 0.0 or not (last[0][:n].numpy() == keys.numpy()).all()):
            self._unshare()  # not the leader's keys, or new rows that do not start at zero
            return None
        rows = last[1][:n]
        if self._lead.weight.size(0) > self.weight.size(0):  # the leader grew: follow it
            if any((t := r()) is not None and not t.done for r in self._pending):
                raise RuntimeError(
                    "DynamicEmbedding: the table must grow with the table it follows, but the "
                    "backward of an earlier training forward through it has not run; its "
                    "fused update would land in the old storage. Run backward first.")
            self._grow(self._lead.weight.size(0))
        if seen.numel() < self.weight.size(0):
            grown = torch.zeros(self.weight.size(0), dtype=torch.bool)
            grown[: seen.numel()] = seen
            self._seen = seen = grown
        # a row first read here is new to this table: zero, as the leader's fresh rows and
        # every row this table has not held are (shared rows are never freed: no eviction)
        mark = seen.numpy()
        mark[rows.numpy()] = True
        mark[0] = False
        self.step += 1
        return rows

    def _own_state(self) -> dict[str, Tensor]:
        """state_tensors while sharing: the leader's map restricted to this table's keys (the
        other used rows listed as free)."""
        m = self._map.state()
        U = m["row_keys"].size
        seen = self._seen
        rows = max(self.weight.size(0), int(m["scalars"][0]))
        held = np.zeros(U, dtype=bool)
        k = min(U, seen.numel())
        held[:k] = seen[:k].numpy()
        held[0] = False
        counts = np.where(held, m["row_counts"], 0)
        keys = np.where(held, m["row_keys"], 0)
        extra = np.flatnonzero((m["row_counts"] > 0) & ~held)
        extra = extra[extra > 0]
        weight, state = self.weight, self.state
        if rows > weight.size(0):
            weight = torch.cat([weight, weight.new_zeros(rows - weight.size(0), weight.size(1))])
            if self._adagrad:
                state = torch.cat([state, state.new_zeros(rows - state.size(0))])
        scalars = m["scalars"].copy()
        scalars[0] = rows
        return {
            "weight": weight, "state": state,
            "row_keys": torch.from_numpy(keys),
            "row_counts": torch.from_numpy(counts),
            "row_last_seen": torch.from_numpy(m["row_last_seen"]),
            "free_rows": torch.from_numpy(np.concatenate([m["free_rows"], extra])),
            "sketch": torch.from_numpy(m["sketch"].astype("int32")),
            "scalars": torch.from_numpy(scalars),
            "step": torch.tensor([self.step]),
            "init_rng": self._gen.get_state(),
        }

    # ------------------------------------------------------------------ maintenance
    def expire(self, now: int | None = None) -> int:
        """Evicts every key not seen for more than ``ttl`` before ``now`` (default: the current
        step); returns how many. Training also expires keys lazily, one at a time."""
        return self._map.expire(self.step if now is None else int(now))

    def take_evicted(self) -> Tensor:
        """int64 [k]: the keys evicted since the last call (requires ``record_evictions``)."""
        return torch.from_numpy(self._map.take_evicted())

    @property
    def record_evictions(self) -> bool:
        return self._map.record_evictions

    @record_evictions.setter
    def record_evictions(self, on: bool) -> None:
        self._map.record_evictions = bool(on)

    def check(self) -> None:
        """Verifies the map's invariants (one row per key, one key per row); raises if broken."""
        self._map.check()

    @property
    def num_keys(self) -> int:
        """Keys that hold a row."""
        if self._sharing:
            return int(self._seen.sum())
        return self._map.size

    @property
    def num_rows(self) -> int:
        """Rows of ``weight`` (row 0 included)."""
        return self.weight.size(0)

    @property
    def overflow(self) -> int:
        """New keys sent to row 0 because one call held more distinct keys than rows."""
        return self._map.overflow

    # ------------------------------------------------------------------ checkpoints
    #: the entries of state_dict, in state_tensors order
    STATE_KEYS = ("weight", "state", "row_keys", "row_counts", "row_last_seen", "free_rows",
                  "sketch", "scalars", "step", "init_rng")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for k, v in self.state_tensors().items():
            destination[prefix + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        got = {k: state_dict[prefix + k] for k in self.STATE_KEYS if prefix + k in state_dict}
        if len(got) < len(self.STATE_KEYS):
            missing_keys.extend(prefix + k for k in self.STATE_KEYS if k not in got)
            return
        try:
            self.load_state_tensors(got)
        except ValueError as e:
            error_msgs.append(f"{prefix}: {e}")

    def __deepcopy__(self, memo) -> DynamicEmbedding:
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        skip = {"_map", "_buffers", "_pending", "_gen", "_lead", "_follower", "_last", "_seen"}
        for k, v in self.__dict__.items():
            if k not in skip:
                new.__dict__[k] = copy.deepcopy(v, memo)
        new.__dict__["_buffers"] = {}
        new._pending = []
        new._gen = torch.Generator()  # its state comes with the tensors
        new._map = self._new_map()
        new._init_following()
        new.register_buffer("weight", self._zeros(1, self.embedding_dim), persistent=False)
        new.register_buffer("state", self._zeros(0), persistent=False)
        new.load_state_tensors({k: v.clone() for k, v in self.state_tensors().items()})
        if self._lead is not None:  # the copy follows the copy of the leader
            new.follow(copy.deepcopy(self._lead, memo))
        return new

    def config(self) -> dict:
        opt = self.optimizer
        return {
            "embedding_dim": self.embedding_dim, "capacity": self.capacity,
            "min_count": self.min_count, "admit_prob": self.admit_prob, "ttl": self.ttl,
            "eviction": self.eviction, "pooling": self.pooling, "init_std": self.init_std,
            "seed": self.seed, "evict_fraction": self.evict_fraction,
            "sketch_width": self.sketch_width,
            "optimizer": None if opt is None else {"name": opt.name, "lr": opt.lr, "eps": opt.eps},
        }

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything that defines the table, as tensors: rows, optimizer state, the key of
        every row, its counters, the free rows, the sketch, the clocks and the init RNG."""
        if self._sharing:
            return self._own_state()
        m = self._map.state()
        return {
            "weight": self.weight, "state": self.state,
            "row_keys": torch.from_numpy(m["row_keys"]),
            "row_counts": torch.from_numpy(m["row_counts"]),
            "row_last_seen": torch.from_numpy(m["row_last_seen"]),
            "free_rows": torch.from_numpy(m["free_rows"]),
            "sketch": torch.from_numpy(m["sketch"].astype("int32")),
            "scalars": torch.from_numpy(m["scalars"]),
            "step": torch.tensor([self.step]),
            "init_rng": self._gen.get_state(),
        }

    def load_state_tensors(self, t: dict[str, Tensor]) -> None:
        """Restores what :meth:`state_tensors` returned (same configuration)."""
        missing = [k for k in self.STATE_KEYS if k not in t]
        if missing:
            raise ValueError(f"DynamicEmbedding: the checkpoint lacks {missing}")
        w, s = t["weight"], t["state"]
        if w.dim() != 2 or w.size(1) != self.embedding_dim:
            raise ValueError(f"DynamicEmbedding: checkpoint weight is {list(w.shape)}, this "
                             f"table has dim {self.embedding_dim}")
        if s.numel() != (w.size(0) if self._adagrad else 0):
            raise ValueError(f"DynamicEmbedding: checkpoint state has {s.numel()} entries for "
                             f"{w.size(0)} rows and optimizer {self.optimizer}")
        rows = int(t["scalars"][0])
        if rows != w.size(0):
            raise ValueError(f"DynamicEmbedding: checkpoint map has {rows} rows, weight "
                             f"{w.size(0)}")
        if self._follower is not None and self._follower._sharing:
            self._follower._unshare()  # it keeps its keys in a map of its own
        self._last = None
        if self._sharing:  # the state is this table's own: into a map of its own first
            self._map = self._new_map()
        self._map.load_state(t["row_keys"].numpy(), t["row_counts"].numpy(),
                             t["row_last_seen"].numpy(), t["free_rows"].numpy(),
                             t["sketch"].numpy().astype("uint16"), t["scalars"].numpy())
        weight = self._zeros(*w.shape)
        weight.copy_(w)
        state = self._zeros(s.numel())
        state.copy_(s)
        self.weight, self.state = weight, state
        self._tofs = (weight.size(0), torch.tensor([0, weight.size(0)]))
        self.step = int(t["step"][0])
        self._gen.set_state(t["init_rng"])
        if self._lead is not None:
            self._share()  # when this state agrees with the leader's map

    def save(self, path) -> None:
        """Writes the table to ``path`` (safetensors; the config in its metadata). Call it from
        the training thread: rows and map are read one after the other."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_tensors().items()}, str(path),
                  metadata={"config": json.dumps(self.config())})

    @classmethod
    def load(cls, path, optimizer: FusedSGD | FusedRowwiseAdagrad | None = None,
             initializer: Callable[[Tensor], Tensor] | None = None) -> DynamicEmbedding:
        """The table :meth:`save` wrote; its optimizer is rebuilt from the file unless given."""
        meta = read_metadata(path)
        if "config" not in meta:
            raise ValueError(f"DynamicEmbedding.load: {path} has no config: not a table that "
                             "DynamicEmbedding.save wrote")
        cfg = json.loads(meta["config"])
        opt = cfg.pop("optimizer")
        if optimizer is None and opt is not None:
            kind = FusedRowwiseAdagrad if opt["name"] == FusedRowwiseAdagrad.name else FusedSGD
            optimizer = kind(lr=opt["lr"]) if kind is FusedSGD else kind(lr=opt["lr"],
                                                                          eps=opt["eps"])
        table = cls(cfg.pop("embedding_dim"), cfg.pop("capacity"), optimizer=optimizer,
                    initializer=initializer, **cfg)
        table.load_state_tensors(read_tensors(path))
        return table

    def extra_repr(self) -> str:
        return (f"dim={self.embedding_dim}, capacity={self.capacity}, keys={self.num_keys}, "
                f"rows={self.num_rows}, min_count={self.min_count}, admit_prob={self.admit_prob}, "
                f"ttl={self.ttl}, eviction={self.eviction!r}, optimizer={self.optimizer}")


__all__ = ["DynamicEmbedding", "EVICTION", "UNADMITTED_ROW"]
