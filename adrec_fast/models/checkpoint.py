# SPDX-License-Identifier: Apache-2.0
"""Checkpoints: safetensors for tensors, JSON for everything else; written atomically.

Format (``FORMAT = "adrec_fast.checkpoint"``, ``VERSION = 1``). A checkpoint is a DIRECTORY:

``model.safetensors``
    ``model.state_dict()``: every weight (dense layers, ``<lookup>.ebc.weight [N_total, D]``
    embedding tables) and every buffer, which includes the fused embedding optimizer's state
    (``<lookup>.ebc.state [N_total]`` float32 for row-wise Adagrad, empty for SGD). Keys are
    the module paths, e.g. ``lookup.ebc.weight``, ``linear.ebc.weight``, ``deep.0.weight``,
    ``head.head.weight``. Metadata: ``{"format", "version", "model"}``. A model with dynamic
    tables (``vocab: dynamic`` fields) adds each ``DynamicEmbedding``'s tensors under its path
    (``lookup.dyn.weight``, ``.state``, ``.row_keys``, ``.row_counts``, ``.row_last_seen``,
    ``.free_rows``, ``.sketch``, ``.scalars``, ``.step``, ``.init_rng``: rows, optimizer state,
    the key of every row, counters, the admission sketch, clocks), sized as the table was.
``optimizer.safetensors`` (training checkpoints, and any model with LoRA adapters)
    the dense torch optimizer's state tensors as ``state.<param index>.<key>`` (e.g.
    ``state.3.exp_avg``; indices follow ``model.dense_parameters()`` order), the sparse
    optimizer's (``embedding_optimizer="none"`` only) as ``sparse_state.<i>.<key>``, and the RNG
    state ``rng.torch`` (uint8, ``torch.get_rng_state()``). A model with LoRA adapters
    (``nn.lora``) stores each adapted layer unmerged as ``adapter.<layer>.weight`` (the frozen
    base), ``adapter.<layer>.lora_A`` and ``adapter.<layer>.lora_B``, while
    ``model.safetensors`` holds the merged plain model: every reader loads the plain model, and
    a model built with the same adapters resumes training exactly.
``checkpoint.json``
    ``{"format", "version", "adrec_fast", "torch",
       "model": model.config   # {"name", "embedding_dim", ...kwargs}: build_model(**config)
       "schema": Schema.to_dict(),         # fitted vocabularies and dense statistics
       "embedding_optimizers": [{"name", "lr", "eps"} per EmbeddingBagCollection, or null],
       "optimizer": {"class", "param_groups": [...without params], "extra_state": {...}},
       "sparse_optimizer": {...same, only with embedding_optimizer="none"},
       "epoch": completed epochs, "global_step", "metrics": {...last epoch...},
       "history": [{per-epoch metrics}], "trainer": {fit settings and early-stopping state},
       "rng": {"seed", "torch_state": "optimizer.safetensors:rng.torch"}}``
``schema.json``
    the same schema on its own (``Schema.load``), for serving tools.
``text_cache.<i>.safetensors``, ``text_cache.<i>.json`` (schemas with text fields)
    the cache of the i-th text encoder: ``hashes`` [V] int64 and ``vectors`` [V, E] float32,
    and the values in the same order (``adrec_fast.data.text``), merged back by ``load_model``.

A distributed run writes the same directory with its embedding tables split by rows
(``adrec_fast.distributed.save_sharded``): ``model.safetensors`` then holds everything but those
tables, checkpoint.json says ``"sharded": "manifest.json"``, and ``manifest.json`` lists every
file (bytes, sha256) and, per split tensor (``lookup.ebc.weight``, ``lookup.ebc.state``), its
full shape and dtype and its row blocks (``{"file", "name", "rows": [lo, hi]}``, one per table,
in the shard file of the rank that held it). :func:`load_state` assembles the full tensors, so
:func:`load_model` (and everything built on it) reads such a run on one machine as it is.

Writing is atomic: files go to a temporary sibling directory that is then renamed into place
(an existing checkpoint is first renamed aside, then deleted), so a reader sees either the old
or the new checkpoint, never a half-written one.

A training run's ``checkpoint_dir`` holds ``last/`` (every epoch; resume reads it) and
``best/`` (the best validation epoch); :func:`load_model` on that directory picks ``best/``,
then ``last/``. ``load_model(dir) -> (model, schema, config)`` is what serving builds on.

The format lives beside the models, not in the trainer, so that a serving process loads a model
without importing the training package.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import torch

from ..data.schema import Schema
from ..data.tensorfile import read_tensors
from ..data.text import load_caches, save_caches
from ..nn.lora import lora_layers, merged_state_dict
from .registry import build_model

FORMAT = "adrec_fast.checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
#: the unmerged LoRA layers' tensors in OPTIM_FILE (see the module docstring)
ADAPTER_PREFIX = "adapter."
META_FILE = "checkpoint.json"
SCHEMA_FILE = "schema.json"
MANIFEST_FILE = "manifest.json"


def _plain(x):
    """JSON-able copy (tuples -> lists, tensors -> numbers)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _tensors_for_safetensors(sd: dict) -> dict:
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def optimizer_state_tensors(optimizer, prefix: str = "state.") -> tuple[dict, dict]:
    """A torch optimizer -> (tensors {"<prefix><i>.<key>": Tensor}, json {"class", ...})."""
    sd = optimizer.state_dict()
    tensors, extra = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}{i}.{k}"] = v
            else:
                extra[f"{i}.{k}"] = v
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
              for g in sd["param_groups"]]
    return tensors, {"class": type(optimizer).__name__, "param_groups": _plain(groups),
                     "extra_state": _plain(extra)}


def load_optimizer_state(optimizer, tensors: dict, meta: dict, prefix: str = "state.") -> None:
    """Inverse of :func:`optimizer_state_tensors`."""
    if meta.get("class") != type(optimizer).__name__:
        raise ValueError(f"checkpoint optimizer is {meta.get('class')}, "
                         f"but the trainer uses {type(optimizer).__name__}")
    state: dict = {}
    for key, v in tensors.items():
        if not key.startswith(prefix):
            continue
        i, k = key[len(prefix):].split(".", 1)
        state.setdefault(int(i), {})[k] = v
    for key, v in meta.get("extra_state", {}).items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        for k in ("betas",):
            if k in g and isinstance(g[k], list):
                g[k] = tuple(g[k])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path``, replacing what is there: a reader sees
    the old directory or the new one, never a mix (the old one is removed afterwards)."""
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _atomic_dir(path: Path, write) -> None:
    """Call ``write(tmp_dir)``, then move tmp_dir to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_doc(model, *, optimizer=None, sparse_optimizer=None, meta: dict | None = None,
                   rng: bool = True) -> tuple[dict, dict]:
    """(checkpoint.json document, optimizer.safetensors tensors) of ``model`` (see
    :func:`save_checkpoint`)."""
    from .. import __version__

    doc = {
        "format": FORMAT,
        "version": VERSION,
        "adrec_fast": __version__,
        "torch": torch.__version__,
        "model": _plain(model.config),
        "schema": model.schema.to_dict(),
        "embedding_optimizers": [
            None if c.optimizer is None else
            {"name": c.optimizer.name, "lr": float(c.optimizer.lr), "eps": float(c.optimizer.eps)}
            for c in model.embedding_collections()
        ],
    }
    opt_tensors: dict = {}
    if optimizer is not None:
        opt_tensors, doc["optimizer"] = optimizer_state_tensors(optimizer)
    if sparse_optimizer is not None:
        t, doc["sparse_optimizer"] = optimizer_state_tensors(sparse_optimizer, "sparse_state.")
        opt_tensors.update(t)
    for layer, m in lora_layers(model).items():  # exact resume of an adapter run
        for k, t in (("weight", m.weight), ("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            opt_tensors[f"{ADAPTER_PREFIX}{layer}.{k}"] = t.detach().cpu().clone()
    if rng:
        opt_tensors["rng.torch"] = torch.get_rng_state()
        doc.setdefault("rng", {})["torch_state"] = f"{OPTIM_FILE}:rng.torch"
    doc.update(_plain(meta or {}))
    return doc, opt_tensors


def save_checkpoint(path, model, *, optimizer=None, sparse_optimizer=None,
                    meta: dict | None = None, rng: bool = True) -> Path:
    """Write ``model`` (and the dense ``optimizer``'s state; ``sparse_optimizer``: the torch
    optimizer of tables without a fused optimizer) as a checkpoint directory at ``path``,
    atomically. ``meta`` adds keys to checkpoint.json (epoch, metrics, history, trainer...).
    Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    doc, opt_tensors = checkpoint_doc(model, optimizer=optimizer,
                                      sparse_optimizer=sparse_optimizer, meta=meta, rng=rng)

    def write(tmp: Path):
        # LoRA adapters are folded into their layers: the file holds the plain model
        save_file(_tensors_for_safetensors(merged_state_dict(model)), str(tmp / MODEL_FILE),
                  metadata={"format": FORMAT, "version": str(VERSION),
                            "model": str(model.config.get("name"))})
        if opt_tensors:
            save_file(_tensors_for_safetensors(opt_tensors), str(tmp / OPTIM_FILE),
                      metadata={"format": FORMAT, "version": str(VERSION)})
        (tmp / META_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
        (tmp / SCHEMA_FILE).write_text(model.schema.to_json(indent=1), encoding="utf-8")
        if model.schema.text_fields():
            save_caches(model.schema, tmp)

    _atomic_dir(path, write)
    return path


def resolve(path) -> Path:
    """The checkpoint directory that ``path`` names: itself, else its ``best/``, else ``last/``."""
    path = Path(path)
    for cand in (path, path / "best", path / "last"):
        if (cand / META_FILE).is_file() and (cand / MODEL_FILE).is_file():
            return cand
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint directory: {path}")
    raise FileNotFoundError(f"{path} is not an adrec_fast checkpoint (no {META_FILE} + "
                            f"{MODEL_FILE} in it or in its best/ or last/)")


def read_meta(path) -> dict:
    path = resolve(path)
    doc = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path / META_FILE}: not an adrec_fast checkpoint")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path / META_FILE}: checkpoint version {doc.get('version')} is not "
                         f"supported (expected {VERSION})")
    return doc


def read_manifest(path, doc: dict) -> dict:
    """The manifest of a sharded checkpoint (``doc``: its checkpoint.json), checked: it is
    there, and the row blocks of every split tensor cover its rows exactly once."""
    path = Path(path)
    name = doc["sharded"]
    file = path / name
    if not file.is_file():
        raise FileNotFoundError(f"{path}: sharded checkpoint without its manifest {name} "
                                "(incomplete copy?)")
    try:
        man = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{file}: the manifest is not valid JSON ({e})") from None
    if man.get("format") != FORMAT or man.get("version") != VERSION:
        raise ValueError(f"{file}: not a version-{VERSION} adrec_fast manifest")
    for key, spec in man["tensors"].items():
        n, at = spec["shape"][0], 0
        for b in sorted(spec["blocks"], key=lambda b: b["rows"][0]):
            lo, hi = b["rows"]
            if lo != at or hi < lo:
                raise ValueError(f"{file}: the row blocks of {key} do not tile its {n} rows "
                                 f"(a block starts at row {lo}, expected {at})")
            if b["file"] not in man["files"]:
                raise ValueError(f"{file}: {key} rows {lo}:{hi} name a file the manifest does "
                                 f"not list: {b['file']}")
            at = hi
        if at != n:
            raise ValueError(f"{file}: the row blocks of {key} end at row {at} of {n}")
    return man


def verify_files(path, manifest: dict, names=None) -> None:
    """Check that the files ``names`` (default: all) of a sharded checkpoint are there, whole
    and unchanged (size and sha256 as the manifest lists them)."""
    path = Path(path)
    for name in manifest["files"] if names is None else names:
        want = manifest["files"][name]
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{path}: checkpoint file {name} is missing (partial copy, "
                                    "or a rank's shard was lost)")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise ValueError(f"{file}: {size} bytes, the manifest says {want['bytes']} "
                             "(truncated or partial file)")
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != want["sha256"]:
            raise ValueError(f"{file}: contents differ from the manifest's sha256 (corrupt file)")


def sharded_rows(path, manifest: dict, key: str, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo:hi`` of the split tensor ``key``, read from the blocks that hold them (only
    those rows are read)."""
    from safetensors import safe_open

    spec = manifest["tensors"][key]
    dtype = getattr(torch, spec["dtype"])
    out = torch.empty([hi - lo, *spec["shape"][1:]], dtype=dtype)
    for b in spec["blocks"]:
        a, z = max(lo, b["rows"][0]), min(hi, b["rows"][1])
        if a >= z:
            continue
        with safe_open(str(Path(path) / b["file"]), "pt") as f:
            part = f.get_slice(b["name"])
            if list(part.get_shape()) != [b["rows"][1] - b["rows"][0], *spec["shape"][1:]]:
                raise ValueError(f"{Path(path) / b['file']}: {b['name']} has shape "
                                 f"{part.get_shape()}, the manifest says rows {b['rows']} of "
                                 f"{spec['shape']}")
            out[a - lo:z - lo] = part[a - b["rows"][0]:z - b["rows"][0]]
    return out


def fold_bias_into_batch_norm(model, sd: dict) -> dict:
    """``sd`` with the bias of each tower Linear that ``model`` runs without one, because batch
    norm follows it (``models.mlp``), folded into that batch norm's running mean: in eval mode
    ``BN(Wx + b)`` with running mean ``m`` is ``BN(Wx)`` with running mean ``m - b``. So a
    checkpoint whose towers still hold such a bias loads exactly; ``sd`` itself is not
    changed."""
    out = None
    for path, seq in model.named_modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        pre = f"{path}." if path else ""
        for i in range(len(seq) - 1):
            lin, bn = seq[i], seq[i + 1]
            key = f"{pre}{i}.bias"
            if (isinstance(lin, torch.nn.Linear) and lin.bias is None
                    and isinstance(bn, torch.nn.BatchNorm1d) and key in sd
                    and f"{pre}{i + 1}.running_mean" in sd):
                out = dict(sd) if out is None else out
                mean = f"{pre}{i + 1}.running_mean"
                out[mean] = out[mean] - out.pop(key).to(out[mean].dtype)
    return sd if out is None else out


def read_state(model, path) -> tuple[dict, dict]:
    """(the state dict of the checkpoint at ``path`` in the form ``model`` loads, its
    checkpoint.json document): sharded tables assembled, an old Linear bias in front of batch
    norm folded into it, and, for a model with LoRA adapters, the adapted layers unmerged."""
    path = resolve(path)
    doc = read_meta(path)
    manifest = None
    if doc.get("sharded"):
        manifest = read_manifest(path, doc)
        verify_files(path, manifest)
    sd = read_tensors(path / MODEL_FILE)
    if manifest is not None:
        for key, spec in manifest["tensors"].items():
            sd[key] = sharded_rows(path, manifest, key, 0, spec["shape"][0])
    layers = lora_layers(model)
    if layers:
        extra = read_tensors(path / OPTIM_FILE) if (path / OPTIM_FILE).is_file() else {}
        for layer in layers:
            pre = f"{layer}." if layer else ""
            try:
                for k in ("weight", "lora_A", "lora_B"):
                    sd[pre + k] = extra[f"{ADAPTER_PREFIX}{layer}.{k}"]
            except KeyError:
                raise ValueError(
                    f"{path}: layer {layer!r} has LoRA adapters in the model but the checkpoint "
                    "holds no unmerged adapters for it (saved without them, or merged): load "
                    "it into a model without adapters") from None
    return fold_bias_into_batch_norm(model, sd), doc


def load_state(model, path) -> dict:
    """Load a checkpoint's weights (and fused optimizer state, embedding lr) into ``model``;
    returns the checkpoint.json document."""
    sd, doc = read_state(model, path)
    model.load_state_dict(sd, strict=True)
    for c, o in zip(model.embedding_collections(), doc.get("embedding_optimizers", [])):
        if o is not None and c.optimizer is not None:
            c.optimizer.lr = float(o["lr"])
    return doc


def load_model(path, map_location: str | torch.device = "cpu"):
    """``(model, schema, config)`` from a checkpoint directory (or a training run's directory:
    its best/, else last/). The model is in eval mode, on ``map_location``."""
    path = resolve(path)
    doc = read_meta(path)
    schema = Schema.from_dict(doc["schema"])
    if schema.text_fields():  # the encoder outputs of every value seen: no encoder run needed
        load_caches(schema, path)
    config = dict(doc["model"])
    name = config.pop("name")
    model = build_model(name, schema, **config)
    load_state(model, path)
    model.to(map_location)
    model.eval()
    return model, schema, doc["model"]
