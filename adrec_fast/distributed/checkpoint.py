# SPDX-License-Identifier: Apache-2.0
"""Sharded checkpoints: every rank writes the tables it holds, and a load reshards them onto any
number of ranks, or onto one process with ``models.checkpoint.load_model`` as it is.

The directory is the single-process checkpoint format (``models/checkpoint.py``) with its
embedding tables split by rows:

``model.safetensors``, ``optimizer.safetensors``, ``checkpoint.json``, ``schema.json``
    written by rank 0: the dense parameters and buffers, the dense optimizer's state, the
    config, schema and embedding lr (``checkpoint.json`` adds ``"sharded": "manifest.json"`` and
    ``"distributed": {"world", "plans"}``, the owner of each table when it was saved);
``shard-<r>-of-<world>.safetensors``
    written by rank r: per table it holds, its rows of ``<collection>.weight`` (and of the
    row-wise Adagrad ``<collection>.state``) as ``<key>@<first row>``;
``manifest.json``
    written last, by rank 0: every file's size and sha256, and per split tensor its full shape,
    dtype and row blocks.

A dynamic table (sharded by key, ``distributed.dynamic``) is saved as the one table a single
process would hold: its per-row tensors (``<path>.weight``, ``.state``, ``.row_keys``,
``.row_counts``, ``.row_last_seen``) split by rows, each rank writing its shard's rows (shard
0's first, row 0 included, then each shard's in rank order), and its free rows, count-min
sketch (the shards' counts summed), clocks and generator merged by rank 0 into
``model.safetensors``. A load onto any number of ranks reads the whole table on each and keeps
the keys each owns; ``load_model`` reads it as a single process's. The text fields' caches
(``text_cache.<i>.*``) are rank 0's, as the single-process checkpoint writes them.

A load reads only what it needs (a rank, the rows of the tables its new plan gives it) and
checks those files against the manifest first, so a missing, truncated or altered file is
refused by name instead of loading wrong rows. Writing is atomic for the run as a whole: the
ranks write into one temporary directory that rank 0 renames into place once every rank has
reported success; a rank that fails leaves no checkpoint behind (the old one stays). The ranks
must see one file system at ``path`` (a shared disk when the ranks are on several machines).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.schema import Schema
from ..data.tensorfile import read_tensors
from ..models import checkpoint as ckpt
from ..models.registry import build_model
from ..nn import EmbeddingBagCollection
from ..nn.dynamic_table import DynamicEmbedding
from .dynamic import (ROW_KEYS, ShardedDynamicEmbedding, merge_small, merged_bases,
                      shard_rows)
from .exchange import Exchange
from .planner import ShardingPlan
from .process_group import DistContext
from .sharding import ShardedEmbeddingBagCollection, model_plans, shard_model


def _shard_file(rank: int, world: int) -> str:
    return f"shard-{rank}-of-{world}.safetensors"


def _file_entry(file: Path) -> dict:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"bytes": file.stat().st_size, "sha256": h.hexdigest()}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def save_sharded(path, model: nn.Module, ctx: DistContext, *, optimizer=None,
                 meta: dict | None = None, rng: bool = True) -> Path:
    """Write a sharded ``model`` (after ``shard_model``; a DDP wrapper is unwrapped) and the
    dense ``optimizer``'s state as one checkpoint directory at ``path`` (see the module
    docstring). A collective: every rank calls it with the same ``path``. ``meta`` adds keys
    to checkpoint.json. Raises on every rank when any rank failed to write; returns the path."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    sharded = {n: m for n, m in model.named_modules()
               if isinstance(m, ShardedEmbeddingBagCollection)}
    dynamic = {n: m for n, m in model.named_modules()
               if isinstance(m, ShardedDynamicEmbedding)}
    if not sharded and not dynamic:
        raise ValueError("save_sharded: the model has no sharded tables; save it with "
                         "adrec_fast.models.checkpoint.save_checkpoint")
    path = Path(path).absolute()
    world = ctx.world
    # every shard's state, and its rows' place in the whole table (all ranks need the sizes)
    dyn_state = {p: m.shard_state() for p, m in dynamic.items()}
    used = {p: [t["row_keys"].numel()] for p, t in dyn_state.items()}
    with ctx.guard("counting the dynamic tables' rows"):
        for p in dynamic:
            everyone: list = [None] * world
            dist.all_gather_object(everyone, used[p][0], group=ctx.group)
            used[p] = everyone
    name: list = [None]
    if ctx.rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            name = [tmp.name]
        except OSError as e:  # every rank must hear of it, or the others wait for rank 0
            name = [OSError(f"{type(e).__name__}: {e}")]
    with ctx.guard("agreeing on the checkpoint directory"):
        dist.broadcast_object_list(name, src=0, group=ctx.group)
    if isinstance(name[0], OSError):
        raise RuntimeError(f"save_sharded: the checkpoint {path} was not written (rank 0: "
                           f"{name[0]})")
    tmp = path.parent / name[0]
    report: dict = {"error": None, "blocks": [], "files": {}}
    try:
        tensors = {}
        for p, m in sharded.items():
            if m.local is None:
                continue
            m.local.flush_l2()  # the saved table is W itself (lazy L2 folded in)
            adagrad = m.local.state.numel() > 0
            start = 0
            for t, first, end in m.plan.blocks_of(ctx.rank):
                lo, hi = int(m.table_offsets[t]) + first, int(m.table_offsets[t]) + end
                for what, src in (("weight", m.local.weight), ("state", m.local.state)):
                    if what == "state" and not adagrad:
                        continue
                    tensors[f"{p}.{what}@{lo}"] = src[start:start + hi - lo].detach().cpu()
                    report["blocks"].append({"key": f"{p}.{what}", "file":
                                             _shard_file(ctx.rank, world),
                                             "name": f"{p}.{what}@{lo}", "rows": [lo, hi],
                                             "dtype": str(src.dtype).removeprefix("torch.")})
                start += hi - lo
        for p, t in dyn_state.items():
            _dynamic_blocks(p, t, used[p], dynamic[p], ctx.rank, world, tensors, report)
        shard = tmp / _shard_file(ctx.rank, world)
        save_file(ckpt._tensors_for_safetensors(tensors), str(shard),
                  metadata={"format": ckpt.FORMAT, "version": str(ckpt.VERSION),
                            "rank": str(ctx.rank), "world": str(world)})
        report["files"][shard.name] = _file_entry(shard)
    except Exception as e:  # reported to every rank below, then raised everywhere
        report["error"] = f"{type(e).__name__}: {e}"
    # the dynamic tables' small parts (free rows, sketch, clocks) are merged by rank 0
    small = {p: {k: v for k, v in t.items() if k not in ROW_KEYS} for p, t in dyn_state.items()}
    smalls: list = [None] * world
    with ctx.guard("collecting the dynamic tables' counters"):
        dist.all_gather_object(smalls, small, group=ctx.group)
    if ctx.rank == 0 and report["error"] is None:
        try:
            merged = {p: merge_small([s[p] for s in smalls], used[p],
                                     {"sketch": m.sketch_base, "overflow": m.overflow_base},
                                     m.capacity) for p, m in dynamic.items()}
            report["files"].update(_write_rank0(tmp, model, {**sharded, **dynamic}, merged,
                                                ctx, optimizer, meta, rng))
        except Exception as e:
            report["error"] = f"{type(e).__name__}: {e}"
    reports: list = [None] * world
    with ctx.guard("collecting the checkpoint shards"):
        dist.all_gather_object(reports, report, group=ctx.group)
    failed = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if rep["error"]]
    outcome = [None]
    if ctx.rank == 0:
        try:
            if failed:
                raise RuntimeError("; ".join(failed))
            _write_manifest(tmp, sharded, reports, world, _dynamic_shapes(dynamic, used))
            ckpt.replace_dir(tmp, path)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = [f"{type(e).__name__}: {e}"]
    with ctx.guard("finishing the checkpoint"):
        dist.broadcast_object_list(outcome, src=0, group=ctx.group)
    if outcome[0] is not None:
        raise RuntimeError(f"save_sharded: the checkpoint {path} was not written ({outcome[0]})")
    return path


def _write_rank0(tmp: Path, model, sharded: dict, merged: dict, ctx: DistContext, optimizer,
                 meta, rng: bool) -> dict:
    """Rank 0's files: the dense state (with the dynamic tables' ``merged`` small parts), the
    optimizer, checkpoint.json, schema.json, the text fields' caches."""
    from safetensors.torch import save_file

    from ..data.text import save_caches

    dense = {}
    for k, v in model.state_dict().items():
        owner = next((p for p in sharded if k.startswith(p + ".")), None)
        if owner is None:
            dense[k] = v
    for p, m in sharded.items():
        if m.optimizer.name != "rowwise_adagrad":  # SGD: an empty state, as one process has
            dense[f"{p}.state"] = torch.zeros(0)
    for p, small in merged.items():
        dense.update({f"{p}.{k}": v for k, v in small.items()})
    doc, opt_tensors = ckpt.checkpoint_doc(model, optimizer=optimizer, meta=meta, rng=rng)
    doc["sharded"] = ckpt.MANIFEST_FILE
    doc["distributed"] = {"world": ctx.world,
                          "plans": {p: m.plan.to_dict() for p, m in sharded.items()
                                    if isinstance(m, ShardedEmbeddingBagCollection)},
                          "dynamic": sorted(merged)}
    save_file(ckpt._tensors_for_safetensors(dense), str(tmp / ckpt.MODEL_FILE),
              metadata={"format": ckpt.FORMAT, "version": str(ckpt.VERSION),
                        "model": str(model.config.get("name"))})
    names = [ckpt.MODEL_FILE, ckpt.META_FILE, ckpt.SCHEMA_FILE]
    if opt_tensors:
        save_file(ckpt._tensors_for_safetensors(opt_tensors), str(tmp / ckpt.OPTIM_FILE),
                  metadata={"format": ckpt.FORMAT, "version": str(ckpt.VERSION)})
        names.append(ckpt.OPTIM_FILE)
    (tmp / ckpt.META_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
    (tmp / ckpt.SCHEMA_FILE).write_text(model.schema.to_json(indent=1), encoding="utf-8")
    if model.schema.text_fields():  # the encoder outputs of every value rank 0 has seen
        before = set(os.listdir(tmp))
        save_caches(model.schema, tmp)
        names += sorted(set(os.listdir(tmp)) - before)
    return {n: _file_entry(tmp / n) for n in names}


def _dynamic_blocks(p: str, t: dict, used: list[int], m: ShardedDynamicEmbedding, rank: int,
                    world: int, tensors: dict, report: dict) -> None:
    """This rank's rows of the whole dynamic table ``p`` (``merged_bases``: shard 0's rows
    0.., then each shard's rows 1.. in rank order), and rank 0 the zero rows after them up to
    the table's capacity, as ``<p>.<key>@<first row>`` blocks."""
    base = merged_bases(used)[rank]
    rows = shard_rows(t, rank)
    lo = base + rows.start
    n_used = merged_bases(used)[-1] + used[-1]
    R = max(n_used, m.capacity + 1)
    file = _shard_file(rank, world)
    for k in ROW_KEYS:
        src = t[k]
        if k == "state" and not src.numel():
            continue
        parts = [(lo, src[rows])]
        if rank == 0 and k in ("weight", "state") and R > n_used:
            parts.append((n_used, src.new_zeros((R - n_used, *src.shape[1:]))))
        for first, part in parts:
            if not part.shape[0]:
                continue
            name = f"{p}.{k}@{first}"
            tensors[name] = part.detach().cpu().contiguous()
            report["blocks"].append({"key": f"{p}.{k}", "file": file, "name": name,
                                     "rows": [first, first + part.shape[0]],
                                     "dtype": str(part.dtype).removeprefix("torch.")})


def _dynamic_shapes(dynamic: dict, used: dict) -> dict:
    """The full shape of every split tensor of the dynamic tables."""
    out = {}
    for p, m in dynamic.items():
        n_used = merged_bases(used[p])[-1] + used[p][-1]
        R = max(n_used, m.capacity + 1)
        out[f"{p}.weight"] = [R, m.embedding_dim]
        if m.local.state.numel():
            out[f"{p}.state"] = [R]
        for k in ("row_keys", "row_counts", "row_last_seen"):
            out[f"{p}.{k}"] = [n_used]
    return out


def _write_manifest(tmp: Path, sharded: dict, reports: list, world: int,
                    dynamic: dict) -> None:
    tensors = {}
    for p, m in sharded.items():
        N, D = int(m.table_offsets[-1]), m.embedding_dim
        tensors[f"{p}.weight"] = {"shape": [N, D], "dtype": None, "blocks": []}
        if m.optimizer.name == "rowwise_adagrad":
            tensors[f"{p}.state"] = {"shape": [N], "dtype": None, "blocks": []}
    for key, shape in dynamic.items():
        tensors[key] = {"shape": shape, "dtype": None, "blocks": []}
    files = {}
    for rep in reports:
        files.update(rep["files"])
        for b in rep["blocks"]:
            spec = tensors[b["key"]]
            if spec["dtype"] not in (None, b["dtype"]):
                raise ValueError(f"{b['key']}: the ranks hold it in {spec['dtype']} and "
                                 f"{b['dtype']}")
            spec["dtype"] = b["dtype"]
            spec["blocks"].append({k: b[k] for k in ("file", "name", "rows")})
    man = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "world": world, "files": files,
           "tensors": tensors}
    (tmp / ckpt.MANIFEST_FILE).write_text(json.dumps(man, indent=1), encoding="utf-8")
    ckpt.read_manifest(tmp, {"sharded": ckpt.MANIFEST_FILE})  # every row written exactly once


def load_sharded(path, ctx: DistContext, *, plans: dict[str, ShardingPlan] | None = None,
                 access: dict[str, list[float]] | None = None,
                 exchange: Exchange | None = None):
    """``(model, schema, doc)``: the checkpoint at ``path`` (sharded, or a single-process one)
    loaded onto the ranks of ``ctx`` and sharded by ``plans`` (module path -> plan; default
    ``plan_tables`` with ``access``), which need not be the plan it was saved with, nor the
    same number of ranks. A collective. Each rank reads the dense state and only the rows of
    the tables it now owns, with their optimizer state and embedding lr; the model is in eval
    mode (``model.train()`` to go on training). The dense optimizer comes back with
    ``load_optimizer`` once it is built over ``wrap_ddp``'s parameters."""

    path = ckpt.resolve(path)
    doc = ckpt.read_meta(path)
    manifest = ckpt.read_manifest(path, doc) if doc.get("sharded") else None
    schema = Schema.from_dict(doc["schema"])
    if schema.text_fields():  # the encoder outputs of the values seen, as load_model reads
        from ..data.text import load_caches

        load_caches(schema, path)
    config = dict(doc["model"])
    name = config.pop("name")
    with torch.random.fork_rng(devices=[]):  # every rank's RNG stays where it was
        model = build_model(name, schema, **config)
    model.to(ctx.device)
    plans = model_plans(model, ctx.world, access, plans)
    if manifest is not None:
        need = {ckpt.MODEL_FILE}
        for p, plan in plans.items():
            for lo, hi in _rows_of(model, p, plan, ctx.rank):
                for key in (f"{p}.weight", f"{p}.state"):
                    for b in manifest["tensors"].get(key, {"blocks": []})["blocks"]:
                        if b["rows"][0] < hi and lo < b["rows"][1]:
                            need.add(b["file"])
        ckpt.verify_files(path, manifest, sorted(need))
    dense = read_tensors(path / ckpt.MODEL_FILE)
    split = set(manifest["tensors"]) if manifest is not None else set()
    # a dynamic table is read whole on every rank, which then keeps the keys it owns
    dyn_keys = {f"{p}.{k}" for p, m in model.named_modules()
                if isinstance(m, DynamicEmbedding) for k in ROW_KEYS}
    if manifest is not None:
        files = {b["file"] for k in dyn_keys & split for b in manifest["tensors"][k]["blocks"]}
        ckpt.verify_files(path, manifest, sorted(files - need))
        for k in dyn_keys & split:
            dense[k] = ckpt.sharded_rows(path, manifest, k, 0,
                                         manifest["tensors"][k]["shape"][0])
    with torch.no_grad():
        for p, plan in plans.items():
            ebc = model.get_submodule(p)
            for lo, hi in _rows_of(model, p, plan, ctx.rank):
                for what, dst in (("weight", ebc.weight), ("state", ebc.state)):
                    key = f"{p}.{what}"
                    if key in split:
                        dst[lo:hi] = ckpt.sharded_rows(path, manifest, key, lo, hi)
                    elif key in dense and dense[key].numel():
                        dst[lo:hi] = dense[key][lo:hi]
    tables = {f"{p}.{w}" for p in plans for w in ("weight", "state")}
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in dense.items() if k not in tables}, strict=False)
    missing = sorted(set(missing) - tables - (split - dyn_keys))
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not fit its model config (missing "
                         f"{missing}, unexpected {sorted(unexpected)})")
    for c, o in zip(model.embedding_collections(), doc.get("embedding_optimizers", [])):
        if o is not None and c.optimizer is not None:
            c.optimizer.lr = float(o["lr"])
    shard_model(model, ctx, exchange, plans=plans)
    model.eval()
    return model, schema, doc


def _rows_of(model: nn.Module, path: str, plan: ShardingPlan,
             rank: int) -> list[tuple[int, int]]:
    """[first, end) rows of the full layout of every block ``rank`` holds under ``plan``."""
    ebc = model.get_submodule(path)
    if not isinstance(ebc, EmbeddingBagCollection):
        raise TypeError(f"{path} is a {type(ebc).__name__}, not an EmbeddingBagCollection")
    return [(int(ebc.table_offsets[t]) + lo, int(ebc.table_offsets[t]) + hi)
            for t, lo, hi in plan.blocks_of(rank)]


def load_optimizer(optimizer, path) -> None:
    """Restore the dense ``optimizer``'s state (built over the same parameters in the same
    order as the saved one, e.g. ``wrap_ddp(model).parameters()`` or
    ``model.dense_parameters()``) from the checkpoint at ``path``, on every rank or in one
    process, with the file checked against the manifest of a sharded checkpoint."""

    path = ckpt.resolve(path)
    doc = ckpt.read_meta(path)
    if "optimizer" not in doc:
        raise ValueError(f"{path}: the checkpoint holds no optimizer state (saved without one)")
    if doc.get("sharded"):
        ckpt.verify_files(path, ckpt.read_manifest(path, doc), [ckpt.OPTIM_FILE])
    ckpt.load_optimizer_state(optimizer, read_tensors(path / ckpt.OPTIM_FILE),
                              doc["optimizer"])
