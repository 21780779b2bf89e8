# SPDX-License-Identifier: Apache-2.0
"""Row deltas for serving: what online training changed, written for a live Scorer to apply.

An export directory ``DIR`` holds

``base/``
    a checkpoint (``models/checkpoint.py`` format) of the model when exporting started; its
    checkpoint.json carries ``"delta_base": {"id", "position"}``: the id every delta names and
    the stream position (rows trained on) of the base.
``deltas/delta-<seq>.safetensors`` + ``deltas/delta-<seq>.json``
    one delta per ``every_rows`` rows, numbered 1, 2, ... (``seq``, 6 digits). The safetensors
    file holds, per embedding table (keyed by the table's ``state_dict`` name):

    * a static table (``lookup.ebc.weight``): the rows trained since the previous delta,
      ``rows/<key>`` int64 [n] (row ids of that buffer) and ``values/<key>`` float32 [n, D]
      (their values, lazy L2 decay folded in);
    * a dynamic table (``lookup.dyn.weight``, a DynamicEmbedding): ``keys/<key>`` int64 [n],
      the keys trained since the previous delta that hold a row now, ``values/<key>`` [n, D]
      their rows, ``last_seen/<key>`` int64 [n] their last-seen times (so that a Scorer's TTL
      expires them when training's does), ``tombstones/<key>`` int64 [k] the keys evicted or
      expired since the previous delta (applied first: a key evicted and admitted again is in
      both), and ``unadmitted/<key>`` [1, D] row 0, the row of every key without one;
    * on every ``dense_every``-th delta (and the last) ``dense/<key>``: every other
      ``state_dict`` entry of the model (layers, heads, batch-norm statistics, cross layers;
      the first-order tables are embedding tables, so they travel as rows).

    The JSON manifest, the commit point, is ``{"format": "adrec_fast.delta", "version": 1,
    "seq", "base", "position", "rows_trained", "file", "bytes", "sha256", "dense": bool,
    "tables": {key: {"rows", "full"} or {"keys", "dynamic"}}, "tombstones": {key: k},
    "clock": {key: the dynamic table's clock}}``; ``position`` is the stream position the
    delta brings a model to.

Writing is atomic: each file is written under a temporary name, fsynced, and renamed into
place, the tensors first, the manifest last; a reader takes a delta only once its manifest is
there, and checks the tensors against the manifest's size and sha256 (``serving/deltas.py``).

Touched rows are tracked per static table with a bool mask [rows], set from each batch's ids
(bags and behaviour histories, as the lookup maps them to rows); an export takes the set rows
and clears the mask. A dynamic table marks the rows its map finds for each batch's
keys (one read-only lookup per step) and, at the export, takes the keys of the marked rows that
still hold one; its map records the keys it evicts (``record_evictions``). A table with lazy L2
decay (``embedding_l2`` with ``l2_mode="lazy"``) changes every row at every step, so each of its
deltas holds the whole table (``"full": true``).
A delta reads the model without changing it: it does not fold the lazy L2 scale into the
table, as ``state_dict`` does, so training with and without exports gives the same numbers
(the base is a plain checkpoint: it folds a pending scale, a no-op on a model that has not
trained since it was built or loaded).

A new exporter (a new run, or a resumed one) writes a new base with a new id and removes the
deltas of the previous base from ``DIR/deltas``. So does a running exporter with
``rebase_every=K`` after its K-th delta: the chain a Scorer must replay, and the disk the deltas
take (a table with lazy L2 decay travels whole in every delta), stay bounded. A following Scorer
(``Scorer.follow``) that serves an earlier base of ``DIR`` loads the new ``DIR/base`` and goes
on with its deltas. A base is a checkpoint, so writing one mid-run folds a pending lazy-L2 scale
into the table, as every checkpoint does (the same W, rounded once).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import torch

from ..models import checkpoint as ckpt
from ..nn.dynamic_table import DynamicEmbedding
from ..nn.lora import merged_state_dict
from ..nn.embedding_bag import EmbeddingBagCollection
# the format's names live with its reader (a serving process imports no training code)
from ..serving.deltas import BASE_DIR, DELTAS_DIR, FORMAT, VERSION


def delta_name(seq: int) -> str:
    """The file stem of delta ``seq``: ``delta-000001``."""
    return f"delta-{int(seq):06d}"


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path``: a temporary sibling, fsync, rename (a reader sees all or nothing)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the renames are still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dense_state(model) -> dict[str, torch.Tensor]:
    """Every ``state_dict`` entry of ``model`` except its embedding tables and their optimizer
    state, read without ``state_dict`` (whose hooks fold the lazy L2 scale into the tables)."""
    out: dict[str, torch.Tensor] = {}
    skip: list[str] = []
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, EmbeddingBagCollection) or _is_dynamic(m):
            skip.append(name)
            continue
        prefix = f"{name}." if name else ""
        for k, p in m._parameters.items():
            if p is not None:
                out[prefix + k] = p.detach()
        for k, b in m._buffers.items():
            if b is not None and k not in m._non_persistent_buffers_set:
                out[prefix + k] = b.detach()
    # LoRA adapters ship folded into their base weights, as a saved checkpoint holds them
    return merged_state_dict(model, out)


def _is_dynamic(m) -> bool:
    return isinstance(m, DynamicEmbedding)


class _Table:
    """One embedding buffer whose touched rows a delta carries."""

    def __init__(self, key: str, ebc: EmbeddingBagCollection):
        self.key = key  # its state_dict name, e.g. "lookup.ebc.weight"
        self.ebc = ebc
        self.full = ebc.l2 > 0 and ebc.l2_mode == "lazy"  # every row decays every step
        self.mask = torch.zeros(0 if self.full else ebc.weight.shape[0], dtype=torch.bool)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [n] int64, values [n, D] float32) changed since the last call; clears."""
        w = self.ebc.weight.detach()  # [R, D]
        if self.full:
            rows = torch.arange(w.shape[0])
            vals = w.float().clone()
        else:
            rows = self.mask.nonzero().view(-1)
            vals = w.index_select(0, rows).float()
            self.mask.zero_()
        if self.ebc.l2_scale != 1.0:  # the stored table is W / scale (lazy L2)
            vals.mul_(self.ebc.l2_scale)
        return rows, vals


class _DynTable:
    """One DynamicEmbedding whose trained keys, evicted keys and unadmitted row a delta
    carries."""

    def __init__(self, key: str, dyn: DynamicEmbedding):
        self.key = key  # its weight's state_dict name, e.g. "lookup.dyn.weight"
        self.dyn = dyn
        self.mask = torch.zeros(0, dtype=torch.bool)  # [rows] read since the last delta

    def start(self) -> None:
        self.dyn.record_evictions = True
        self.dyn.take_evicted()  # evictions before the base are in the base
        self.mask = torch.zeros(self.dyn.num_rows, dtype=torch.bool)

    def mark(self, keys: torch.Tensor) -> None:
        """After a step: the rows of the keys it read (the map's read-only find; a call never
        evicts the keys it reads, so these are the rows it trained)."""
        rows = self.dyn.rows(keys)  # [n]
        if self.mask.numel() < self.dyn.num_rows:  # the table grew
            grown = torch.zeros(self.dyn.num_rows, dtype=torch.bool)
            grown[: self.mask.numel()] = self.mask
            self.mask = grown
        self.mask[rows] = True

    def take(self) -> dict[str, torch.Tensor]:
        """{"keys" [n], "values" [n, D], "last_seen" [n], "tombstones" [k], "unadmitted"
        [1, D]}: the keys of the rows read since the last call that hold a row now (a row
        evicted since is skipped: its key is a tombstone; a row taken by a new key since was
        read for it), their rows and last-seen times (a Scorer's TTL answers as training's),
        the keys evicted since, row 0."""
        dyn = self.dyn
        rows = self.mask.nonzero().view(-1)
        self.mask.zero_()
        m = dyn._map.state()  # per used row: key, count (0: free), last seen
        rows = rows[rows < len(m["row_keys"])]
        cnt = torch.from_numpy(m["row_counts"])[rows]
        rows = rows[(cnt > 0) & (rows > 0)]
        w = dyn.weight.detach()
        return {"keys": torch.from_numpy(m["row_keys"])[rows],
                "values": w.index_select(0, rows).float(),
                "last_seen": torch.from_numpy(m["row_last_seen"])[rows],
                "tombstones": dyn.take_evicted(), "unadmitted": w[:1].float().clone()}


class DeltaExporter:
    """Writes ``DIR/base`` and a delta every ``every_rows`` rows of online training (see the
    module doc). ``train_online(..., exporter=DeltaExporter(model, DIR, every_rows=...))``
    calls :meth:`start`, :meth:`observe` after each step and :meth:`finish` at the end.

    Args:
        model: the ``CTRModel`` being trained (read, never changed).
        directory: the export directory ``DIR``.
        every_rows: rows between deltas (a delta is written after the step that reaches it).
        dense_every: the dense weights go in every that many deltas (and in the last); 1: in
            every delta.
        on_export: ``callable(manifest dict)``, called in the training thread right after a
            delta is committed (the model then holds exactly the delta's state).
        rebase_every: after that many deltas, write a new base (the model then) and drop the
            deltas before it; None: one base for the whole run.
    """

    def __init__(self, model, directory, *, every_rows: int, dense_every: int = 1,
                 on_export=None, rebase_every: int | None = None):
        if isinstance(every_rows, bool) or not isinstance(every_rows, int) or every_rows < 1:
            raise ValueError(f"export every_rows must be an int >= 1, got {every_rows!r}")
        if isinstance(dense_every, bool) or not isinstance(dense_every, int) or dense_every < 1:
            raise ValueError(f"export dense_every must be an int >= 1, got {dense_every!r}")
        if rebase_every is not None and (isinstance(rebase_every, bool)
                                         or not isinstance(rebase_every, int) or rebase_every < 1):
            raise ValueError(f"export rebase_every must be an int >= 1 or None, got "
                             f"{rebase_every!r}")
        self.model = model
        self.rebase_every = rebase_every
        self.rebases = 0  # bases written after the first
        self.directory = Path(directory)
        self.every_rows = every_rows
        self.dense_every = dense_every
        self.on_export = on_export
        self.tables: list[_Table] = []
        self.dynamic: list[_DynTable] = []
        self._marks = []  # (SparseLookup, its _Table or None, its _DynTable or None)
        from ..models.base import SparseLookup

        for name, m in model.named_modules():
            if isinstance(m, SparseLookup):
                pre = f"{name}." if name else ""
                t = None if m.ebc is None else _Table(f"{pre}ebc.weight", m.ebc)
                d = None if getattr(m, "dyn", None) is None else _DynTable(f"{pre}dyn.weight",
                                                                            m.dyn)
                self.tables += [t] if t is not None else []
                self.dynamic += [d] if d is not None else []
                self._marks.append((m, t, d))
            elif _is_dynamic(m) and not any(m is d.dyn for d in self.dynamic):
                raise NotImplementedError(f"delta export: {name} is a DynamicEmbedding outside "
                                          "a SparseLookup; its keys are not tracked")
        self.base_id: str | None = None
        self.seq = 0
        self.position = 0
        self._next = 0
        self._last_rows = 0  # rows trained since the last delta
        self._last_dense = False  # whether the last delta held the dense weights
        self.stats: list[dict] = []  # per delta: seq, bytes, ms

    # -- the hooks ----------------------------------------------------------------------
    def start(self, position: int = 0) -> Path:
        """Write ``DIR/base`` (the model now, at stream ``position``) under a new id and clear
        ``DIR/deltas``; returns the base path. On an exporter already started at ``position``
        that has written no delta it keeps that base (so a Scorer may load the base before
        training starts)."""
        base = self.directory / BASE_DIR
        if self.base_id is not None and self.seq == 0 and self.position == int(position):
            return base
        self.base_id = uuid.uuid4().hex
        self.seq, self.position = 0, int(position)
        self._next = self.position + self.every_rows
        for t in self.tables:
            t.mask.zero_()
        for d in self.dynamic:
            d.start()
        deltas = self.directory / DELTAS_DIR
        deltas.mkdir(parents=True, exist_ok=True)
        ckpt.save_checkpoint(base, self.model, rng=False,
                             meta={"delta_base": {"id": self.base_id,
                                                  "position": self.position}})
        for f in deltas.iterdir():  # the manifests first: a reader never sees half a delta
            if f.name.startswith("delta-") and f.suffix == ".json":
                f.unlink()
        for f in deltas.iterdir():
            if f.name.startswith(("delta-", ".delta-")):
                f.unlink()
        _fsync_dir(deltas)
        return base

    def observe(self, batch, position: int) -> dict | None:
        """Mark the rows ``batch`` trained (call it after the step); ``position``: the stream
        position after it. Writes a delta when ``every_rows`` more rows were trained; returns
        its manifest, else None."""
        if self.base_id is None:
            raise RuntimeError("DeltaExporter.observe before start()")
        for lookup, t, d in self._marks:
            rows, keys = _reads_of(lookup, batch)
            if t is not None and not t.full:
                t.mask[rows] = True
            if d is not None and keys.numel():
                d.mark(keys)
        self._last_rows += batch.batch_size
        self.position = int(position)
        if self.position >= self._next:
            return self.export()
        return None

    def finish(self, position: int) -> dict | None:
        """The last delta, with the dense weights: when rows were trained since the last delta,
        or when that one had no dense part (so the end state is served whole)."""
        self.position = int(position)
        if self._last_rows or (self.seq and not self._last_dense):
            return self.export(dense=True)
        return None

    # -- writing ------------------------------------------------------------------------
    def export(self, dense: bool | None = None) -> dict:
        """Write the next delta now; returns its manifest."""
        from safetensors.torch import save

        t0 = time.perf_counter()
        seq = self.seq + 1
        if dense is None:
            dense = seq % self.dense_every == 0
        tensors: dict[str, torch.Tensor] = {}
        tables, tombstones = {}, {}
        for t in self.tables:
            rows, vals = t.take()
            tables[t.key] = {"rows": int(rows.numel()), "full": t.full}
            if rows.numel():
                tensors[f"rows/{t.key}"] = rows.contiguous()
                tensors[f"values/{t.key}"] = vals.contiguous()
        clock = {}
        for d in self.dynamic:
            got = d.take()
            tables[d.key] = {"keys": int(got["keys"].numel()), "dynamic": True}
            tombstones[d.key] = int(got["tombstones"].numel())
            clock[d.key] = int(d.dyn._map.clock)
            for name, v in got.items():
                tensors[f"{name}/{d.key}"] = v.contiguous()
        if dense:
            for k, v in dense_state(self.model).items():
                tensors[f"dense/{k}"] = v.contiguous().clone()
        stem = delta_name(seq)
        data = save(tensors, metadata={"format": FORMAT, "seq": str(seq), "base": self.base_id})
        man = {"format": FORMAT, "version": VERSION, "seq": seq, "base": self.base_id,
               "position": self.position, "rows_trained": self._last_rows,
               "file": f"{stem}.safetensors", "bytes": len(data),
               "sha256": hashlib.sha256(data).hexdigest(), "dense": bool(dense),
               "tables": tables, "tombstones": tombstones, "clock": clock,
               "written": time.time()}
        d = self.directory / DELTAS_DIR
        _write_atomic(d / man["file"], data)
        _write_atomic(d / f"{stem}.json", json.dumps(man, indent=1).encode())
        _fsync_dir(d)
        self.seq = seq
        self._last_rows = 0
        self._last_dense = bool(dense)
        self._next = self.position + self.every_rows
        self.stats.append({"seq": seq, "bytes": len(data), "dense": bool(dense),
                           "rows": sum(v.get("rows", v.get("keys", 0))
                                       for v in tables.values()),
                           "ms": (time.perf_counter() - t0) * 1e3})
        if self.on_export is not None:
            self.on_export(man)
        if self.rebase_every is not None and seq >= self.rebase_every:
            self.start(self.position)  # seq > 0: a new base, the old deltas dropped
            self._last_dense = True  # the base holds the dense weights
            self.rebases += 1
        return man


def _reads_of(lookup, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [n] of ``lookup.ebc.weight``, keys [m] of ``lookup.dyn``) that ``batch`` reads:
    the ids of the static bags plus their table's first row, the keys of the dynamic ones, and
    the elements of the histories the lookup embeds likewise."""
    T = lookup.num_bags
    B = batch.batch_size
    none = torch.zeros(0, dtype=torch.long)
    if B == 0:
        return none, none
    idx, ofs = batch.indices, batch.offsets  # [nnz], [T*B+1]
    bag_dyn = getattr(lookup, "bag_dynamic", [False] * T)
    seq_dyn = getattr(lookup, "seq_dynamic", [False] * len(lookup.sequences))
    rows, keys = [], []
    if not any(bag_dyn):
        # B ids per table (bags are table-major): the table of an id is its row of a [T, B] view
        if idx.numel() == T * B and torch.equal(ofs[::B], torch.arange(0, idx.numel() + 1, B)):
            rows.append((idx.view(T, B) + lookup.bag_base[:, None]).view(-1))
        else:
            lengths = ofs[1:] - ofs[:-1]  # [T*B]
            rows.append(idx + torch.repeat_interleave(lookup.bag_base.repeat_interleave(B),
                                                      lengths, output_size=idx.numel()))
    elif all(bag_dyn):
        keys.append(idx)
    else:
        for p, d in enumerate(bag_dyn):  # bag p's ids, in the table-major layout
            ids = idx[int(ofs[p * B]):int(ofs[(p + 1) * B])]
            (keys if d else rows).append(ids if d else ids + lookup.bag_base[p])
    for s, base, d in zip(lookup.sequences, lookup.seq_base, seq_dyn):
        ids = batch.seq_indices[s]  # [L_s]
        (keys if d else rows).append(ids if d else ids + base)

    def cat(parts):
        return none if not parts else parts[0] if len(parts) == 1 else torch.cat(parts)

    return cat(rows), cat(keys)


__all__ = ["BASE_DIR", "DELTAS_DIR", "DeltaExporter", "FORMAT", "VERSION", "delta_name",
           "dense_state"]
