# SPDX-License-Identifier: Apache-2.0
"""Pretrain, then fine-tune: warm-start a model from another run, freeze parts of it, or train
LoRA adapters on its dense towers.

:func:`init_from` copies a trained source model into a freshly built target model whose schema
may differ:

* **fields are matched by name** (``rename={source name: target name}`` for a renamed field);
  a target field without a source starts fresh, a source field the target lacks is ignored;
* **categorical values are matched by raw value**: the row of value v in the target table gets
  the source's row of v (the two vocabularies may order, add or drop values freely); values new
  to the target keep their fresh rows, and the out-of-vocabulary row 0 gets the source's row 0.
  A hashed target field of the same ``hash_size`` and ``salt`` as its source takes every row as
  it is (same value, same hash); a hashed field fed from a vocabulary field takes the row of each
  source value at that value's hash (on a collision, the more frequent value's row); two hashed
  fields with different settings share no row (fresh, and said so);
* **dynamic tables** (``vocab: dynamic``, keyed by a salted 64-bit hash of the value) are
  filled by key: a vocabulary source gives the key of each of its values the value's row; a
  dynamic source of the same salt gives every key of its map (its tables share one map, so the
  keys of a dropped dynamic field come along, never read); a vocabulary target reads the source
  key of each of its values. Copied keys count as seen once, at the table's clock. Only a fresh
  dynamic table is filled;
* **dense weights are matched by meaning**: a layer that reads the model's input (the first
  layer of a tower, DCN-v2's cross layers and head, DLRM's top MLP over field pairs, the
  dense-feature weights) is copied entry by entry through labels of its input columns (which
  field, which embedding coordinate, which dense feature, which pair of fields), so that a
  different field set or order copies the columns of the matched fields and leaves the others
  fresh; every other tensor (hidden layers, batch norm, the head) is copied when its shape
  matches and skipped, with the reason, when it does not (different hidden widths). The dense
  part is copied only between models of the same name.

Embedding widths must agree (a ``ValueError`` says which). The fused optimizer's row state is
not copied by default: fine-tuning starts with fresh Adagrad accumulators, so copied rows move
at the target's learning rate (``copy_optimizer_state=True`` carries them over).

:func:`freeze` stops updates to ``"embeddings"`` (no fused update), ``"dense"`` (no gradient;
batch norm keeps its running statistics) or ``"text"`` (a text field's encoder projection).
:func:`add_adapters` puts LoRA adapters (:mod:`adrec_fast.nn.lora`) on the MLP towers and
freezes every other dense weight but the head's bias. :func:`trainable_counts` counts what
trains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.base import SparseLookup
from ..nn.lora import add_lora, check_rank, lora_layers

#: the parts ``freeze`` knows
FREEZE_PARTS = ("embeddings", "dense", "text")


@dataclass
class TransferReport:
    """What :func:`init_from` copied.

    ``fields``: target field -> ``{"source": its source field or None, "rows": rows copied,
    "of": rows of its table, "how": "vocabulary" | "hash" | "hash-from-vocabulary" | "dense" |
    "vector" | "fresh", "note"?}`` (table rows are per lookup: ``rows`` counts the main
    lookup's); ``dropped``: source fields absent from the target; ``dense``: tensor name ->
    "copied", "copied k of n entries" or "skipped: reason"."""

    source: str
    fields: dict = field(default_factory=dict)
    dropped: list = field(default_factory=list)
    dense: dict = field(default_factory=dict)
    lookups: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"source": self.source, "fields": self.fields, "dropped": self.dropped,
                "dense": self.dense, "lookups": self.lookups}

    def summary(self) -> str:
        """A few lines for a log: per field its source and rows copied, then the dense part."""
        lines = [f"init-from {self.source}:"]
        for name, f in self.fields.items():
            src = f["source"]
            what = ("new field, starts fresh" if src is None else
                    f"from {src!r}" if src != name else "matched")
            if f["how"] in ("vocabulary", "hash", "hash-from-vocabulary", "keys",
                            "keys-from-vocabulary", "vocabulary-from-keys"):
                of = "" if f.get("of") is None else f" of {f['of']:,}"
                what += f", {f['rows'] or 0:,}{of} rows copied ({f['how']})"
            if f.get("note"):
                what += f"; {f['note']}"
            lines.append(f"  {name}: {what}")
        if self.dropped:
            lines.append(f"  not in the target (ignored): {', '.join(self.dropped)}")
        copied = sum(v == "copied" for v in self.dense.values())
        partial = {k: v for k, v in self.dense.items() if v.startswith("copied ")}
        skipped = {k: v for k, v in self.dense.items() if v.startswith("skipped")}
        lines.append(f"  dense: {copied} tensors copied, {len(partial)} in part, "
                     f"{len(skipped)} skipped")
        for k, v in {**partial, **skipped}.items():
            lines.append(f"    {k}: {v}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- field matching
def _source_names(src_schema, tgt_schema, rename: dict) -> dict:
    """target field -> source field name (or None: a new field)."""
    rename = dict(rename or {})
    for s, t in rename.items():
        if s not in src_schema.names:
            raise ValueError(f"rename {s}={t}: the source has no field {s!r} (fields: "
                             f"{', '.join(src_schema.names)})")
        if t not in tgt_schema.names:
            raise ValueError(f"rename {s}={t}: the target has no field {t!r} (fields: "
                             f"{', '.join(tgt_schema.names)})")
    inverse = {}
    for s, t in rename.items():
        if t in inverse:
            raise ValueError(f"rename: two source fields ({inverse[t]!r}, {s!r}) map to {t!r}")
        inverse[t] = s
    out = {}
    for t in tgt_schema.names:
        if t in inverse:
            out[t] = inverse[t]
        elif t in src_schema.names and t not in rename:
            out[t] = t
        else:
            out[t] = None
    return out


def _kind(f) -> str:
    return "sparse" if f.is_sparse else f.type


def _hash(values: list, owner) -> np.ndarray:
    import pyarrow as pa

    from ..data import columns as C

    return C.stable_hash(pa.array(values, type=pa.string()), owner.salt, owner.hash_size)


def _row_pairs(tgt, src) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Table owners ``tgt``, ``src`` (``Field``s) -> (target ids, source ids, how, note): local
    row pairs to copy, row 0 (out of vocabulary) included when both have one."""
    zero = np.zeros(1, dtype=np.int64)
    if tgt.vocab == "build":
        values = list(tgt.vocabulary)
        t_ids = np.arange(1, len(values) + 1, dtype=np.int64)
        if src.vocab == "build":
            pos = {v: i + 1 for i, v in enumerate(src.vocabulary)}
            s_ids = np.array([pos.get(v, 0) for v in values], dtype=np.int64)
            how = "vocabulary"
        else:
            s_ids = _hash(values, src) if values else np.zeros(0, dtype=np.int64)
            how = "hash"
        keep = s_ids > 0
        return np.r_[zero, t_ids[keep]], np.r_[zero, s_ids[keep]], how, ""
    # hashed target
    if src.vocab == "hash":
        if src.hash_size == tgt.hash_size and src.salt == tgt.salt:
            ids = np.arange(tgt.hash_size, dtype=np.int64)
            return ids, ids, "hash", ""
        return zero[:0], zero[:0], "fresh", (
            f"hash settings differ (source hash_size {src.hash_size} salt {src.salt!r}, target "
            f"{tgt.hash_size} {tgt.salt!r}): no raw values to match, starts fresh")
    values = list(src.vocabulary)
    if not values:
        return zero, zero, "hash-from-vocabulary", ""
    t_ids = _hash(values, tgt)
    # the vocabulary runs most frequent first: on a collision the first value's row wins
    t_ids, first = np.unique(t_ids, return_index=True)
    s_ids = first.astype(np.int64) + 1
    return np.r_[zero, t_ids], np.r_[zero, s_ids], "hash-from-vocabulary", ""


def _key_salt(f) -> str:
    """The salt of a dynamic table's keys (its own, else its field's name)."""
    return f.salt or f.name


def _values_keys(schema, name: str, values: list) -> np.ndarray:
    import pyarrow as pa

    return np.asarray(schema.lookup(name, pa.array(values, type=pa.string())), dtype=np.int64)


def _table_plan(tgt_schema, t_name, src_schema, s_name):
    """How the rows of target table ``t_name`` come from source table ``s_name``: a dict with
    ``t`` ("static" + local ids, or "dynamic" + keys), ``s`` ("static" + local ids + table,
    "dynamic" + keys, or "all-keys": every key of the source's dynamic map), how, note."""
    tgt, src = tgt_schema.field(t_name), src_schema.owner(s_name)
    t_dyn, s_dyn = tgt.vocab == "dynamic", src.vocab == "dynamic"
    if not t_dyn and not s_dyn:
        t_ids, s_ids, how, note = _row_pairs(tgt, src)
        return {"t": ("static", t_ids), "s": ("static", s_ids), "how": how, "note": note,
                "rows": int(t_ids.size)}
    if t_dyn and s_dyn:
        if _key_salt(tgt) == _key_salt(src):
            return {"t": ("dynamic", None), "s": ("all-keys", None), "how": "keys", "note":
                    "the same keys: every key of the source's dynamic tables is copied",
                    "rows": None}
        return {"t": None, "s": None, "how": "fresh", "rows": 0, "note":
                f"dynamic tables salted differently ({_key_salt(src)!r}, {_key_salt(tgt)!r}): "
                "no raw values to match, starts fresh"}
    if t_dyn:  # a vocabulary (or hashed) source into a dynamic target: keys of its values
        if src.vocab != "build":
            return {"t": None, "s": None, "how": "fresh", "rows": 0, "note":
                    "a hashed source has no raw values to key a dynamic table: starts fresh"}
        values = list(src.vocabulary)
        if not values:
            return {"t": None, "s": None, "how": "fresh", "rows": 0, "note": ""}
        keys = _values_keys(tgt_schema, t_name, values)
        return {"t": ("dynamic", keys),
                "s": ("static", np.arange(1, len(values) + 1, dtype=np.int64)),
                "how": "keys-from-vocabulary", "note": "", "rows": len(values)}
    # a dynamic source into a vocabulary (or hashed) target: the source keys of its values
    if tgt.vocab != "build":
        return {"t": None, "s": None, "how": "fresh", "rows": 0, "note":
                "a dynamic source cannot fill a hashed table (no raw values): starts fresh"}
    values = list(tgt.vocabulary)
    keys = _values_keys(src_schema, s_name, values) if values else np.zeros(0, np.int64)
    return {"t": ("static", np.arange(1, len(values) + 1, dtype=np.int64)),
            "s": ("dynamic", keys), "how": "vocabulary-from-keys", "note": "", "rows": None}


def _static_index(schema, name: str) -> int:
    """Index of ``name``'s table among the schema's static (non-dynamic) tables."""
    static = [n for n, _ in schema.tables() if schema.field(n).vocab != "dynamic"]
    return static.index(schema.owner(name).name)


@torch.no_grad()
def _fill_dynamic(dyn, keys: torch.Tensor, vecs: torch.Tensor, states: torch.Tensor | None,
                  row0: torch.Tensor | None, where: str) -> None:
    """Give a fresh DynamicEmbedding the rows ``vecs [n, D]`` for ``keys [n]`` (rows 1..n,
    each counted as seen once at the table's clock), optionally their optimizer state and the
    unadmitted row 0."""
    if dyn.num_keys:
        raise NotImplementedError(f"init_from: the {where!r} dynamic table already holds keys; "
                                  "only a fresh one is filled")
    st = dyn.state_tensors()
    n, D = keys.numel(), dyn.embedding_dim
    U = n + 1
    R = max(int(st["weight"].size(0)), U)
    weight = torch.zeros(R, D, dtype=st["weight"].dtype)
    weight[: st["weight"].size(0)] = st["weight"]
    weight[1:U] = vecs.to(weight.dtype)
    if row0 is not None:
        weight[0] = row0
    state = st["state"]
    if state.numel():
        state = torch.zeros(R, dtype=state.dtype)
        if states is not None:
            state[1:U] = states
    clock = int(st["scalars"][1])
    scalars = st["scalars"].clone()
    scalars[0] = R
    row_keys = torch.cat([torch.zeros(1, dtype=torch.int64), keys.to(torch.int64)])
    counts = torch.ones(U, dtype=torch.int64)
    counts[0] = 0
    dyn.load_state_tensors({**st, "weight": weight, "state": state, "row_keys": row_keys,
                            "row_counts": counts,
                            "row_last_seen": torch.full((U,), clock, dtype=torch.int64),
                            "free_rows": torch.zeros(0, dtype=torch.int64), "scalars": scalars})


def _copy_tables(model, src_model, names: dict, report: TransferReport,
                 copy_optimizer_state: bool) -> None:
    tgt_schema, src_schema = model.schema, src_model.schema
    tgt_lookups = {p: m for p, m in model.named_modules() if isinstance(m, SparseLookup)}
    src_lookups = {p: m for p, m in src_model.named_modules() if isinstance(m, SparseLookup)}
    plans = {}  # target table owner -> plan
    for t_name, _ in tgt_schema.tables():
        s_name = names[t_name]
        entry = {"source": s_name, "rows": 0, "of": _rows_of(tgt_schema, t_name),
                 "how": "fresh"}
        if s_name is not None and src_schema.field(s_name).is_sparse:
            plan = _table_plan(tgt_schema, t_name, src_schema, s_name)
            if plan["t"] is not None:
                plans[t_name] = (plan, s_name)
            entry.update(how=plan["how"], rows=plan["rows"])
            if plan["note"]:
                entry["note"] = plan["note"]
        elif s_name is not None:
            entry["note"] = (f"the source field is {src_schema.field(s_name).type}: starts "
                             "fresh")
        report.fields[t_name] = entry
    for path, lk in tgt_lookups.items():
        sl = src_lookups.get(path)
        if sl is None:
            report.lookups[path] = "fresh: the source model has no such lookup"
            continue
        if sl.dim != lk.dim:
            raise ValueError(f"init_from: the {path!r} embeddings are {sl.dim} wide in the "
                             f"source and {lk.dim} in the target; build the target with "
                             f"embedding_dim={sl.dim} (--embedding-dim {sl.dim})")
        for c in (lk.ebc, sl.ebc):
            if c is not None:
                c.flush_l2()
        n_static, dyn_parts = 0, []  # (keys [k], rows [k, D], state [k] or None)
        row0 = None
        for t_name, (plan, s_name) in plans.items():
            s_kind, s_ids = plan["s"]
            # the source rows (vectors and optimizer state) of this table's pairs
            if s_kind == "static":
                base = int(sl.ebc.table_offsets[_static_index(src_schema, s_name)])
                s_rows, s_w, s_st = torch.from_numpy(s_ids + base), sl.ebc.weight, sl.ebc.state
                keep = torch.ones(s_rows.numel(), dtype=torch.bool)
            elif s_kind == "dynamic":
                s_rows = sl.dyn.rows(torch.from_numpy(s_ids))  # read-only: 0 = absent
                s_w, s_st = sl.dyn.weight, sl.dyn.state
                keep = s_rows > 0
            else:  # every key of the source map
                ms = sl.dyn.state_tensors()
                live = torch.nonzero(ms["row_counts"] > 0).view(-1)
                live = live[live > 0]
                s_rows, s_w, s_st = live, sl.dyn.weight, sl.dyn.state
                keep = torch.ones(live.numel(), dtype=torch.bool)
                row0 = sl.dyn.weight[0].clone()
            t_kind, t_ids = plan["t"]
            vec = s_w.index_select(0, s_rows[keep])  # [k, D]
            st = (s_st.index_select(0, s_rows[keep])
                  if copy_optimizer_state and s_st.numel() else None)
            if t_kind == "static":
                base = int(lk.ebc.table_offsets[_static_index(tgt_schema, t_name)])
                t_rows = torch.from_numpy(t_ids + base)[keep]
                with torch.no_grad():
                    lk.ebc.weight.index_copy_(0, t_rows, vec.to(lk.ebc.weight.dtype))
                    if st is not None and lk.ebc.state.numel():
                        lk.ebc.state.index_copy_(0, t_rows, st)
                n_static += int(t_rows.numel())
                if plan["rows"] is None:
                    report.fields[t_name]["rows"] = int(t_rows.numel())
            else:
                keys = (ms["row_keys"][s_rows] if s_kind == "all-keys"
                        else torch.from_numpy(t_ids)[keep])
                dyn_parts.append((keys, vec, st))
                if plan["rows"] is None:
                    report.fields[t_name]["rows"] = int(keys.numel())
        n_dyn = 0
        if dyn_parts:
            keys = torch.cat([k for k, _, _ in dyn_parts])
            vecs = torch.cat([v for _, v, _ in dyn_parts])
            sts = (torch.cat([s for *_, s in dyn_parts])
                   if all(s is not None for *_, s in dyn_parts) else None)
            uniq, first = np.unique(keys.numpy(), return_index=True)
            first = torch.from_numpy(np.sort(first))
            _fill_dynamic(lk.dyn, keys[first], vecs[first],
                          None if sts is None else sts[first], row0, path)
            n_dyn = int(first.numel())
        total = 0 if lk.ebc is None else int(lk.ebc.weight.shape[0])
        report.lookups[path] = (f"{n_static:,} of {total:,} static rows copied"
                                + (f", {n_dyn:,} dynamic keys" if n_dyn else ""))


def _rows_of(schema, name: str):
    """Rows of ``name``'s table (None for a dynamic table: rows come with keys)."""
    return None if schema.field(schema.owner(name).name).vocab == "dynamic" \
        else schema.cardinality(name)


# ---------------------------------------------------------------------------- dense layouts
def _input_labels(model, names: dict | None) -> dict:
    """Labels of the input columns of the layers that read the model's input, for the zoo's
    models: {state-dict key: (labels of axis 0 or None, labels of axis 1 or None)}; a label
    says what the column holds (("emb", field, d), ("dense", field), ("vec", field, k),
    ("pair", {field, field}), ("pos", j) for a hidden unit). ``names`` maps this model's field
    names to the target's (None: they are the target's)."""
    schema = model.schema
    nm = (lambda n: n) if names is None else (lambda n: names.get(n, n))
    D = model.embedding_dim
    # the model's fields: the bags, then the text fields (``CTRModel.with_text``)
    bags = [nm(n) for n, _ in schema.sparse_fields()] + [nm(n) for n in _text_names(schema)]
    emb = [("emb", b, d) for b in bags for d in range(D)]
    dense = [("dense", nm(n)) for n in schema.dense_fields()]
    dense += [("vec", nm(n), k) for n, dim in schema.vector_fields() for k in range(dim)]
    known = {"categorical", "multi_categorical", "dense", "vector", "text"}
    if any(f.type not in known for f in schema.fields):
        return {}  # a field kind whose columns this table does not place: shapes only
    name = model.config.get("name")

    def pos(n):
        return [("pos", j) for j in range(n)]

    out = {}
    if name in ("lr", "fm"):
        out["head.head.weight"] = (dense,)
    elif name == "deepfm":
        out["deep.0.weight"] = (None, emb + dense)
        out["dense_linear.weight"] = (None, dense)
    elif name == "dcnv2":
        x0 = emb + dense
        for i in range(len(model.cross.weights)):
            out[f"cross.weights.{i}"] = (x0, x0)
            out[f"cross.biases.{i}"] = (x0,)
        first = "deep.0.weight"
        out[first] = (None, x0)
        if model.structure == "parallel":
            width = model.head.in_features - model.k
            out["head.head.weight"] = (x0 + pos(width),)
        elif not list(model.deep):  # no MLP: the head reads the cross output
            out["head.head.weight"] = (x0,)
    elif name == "dlrm":
        fields = ([("dvec",)] if model.bottom is not None else []) + [("bag", b) for b in bags]
        off = 0 if model.self_interaction else 1
        i, j = np.triu_indices(len(fields), k=off)
        pairs = [("pair", frozenset((fields[a], fields[b]))) for a, b in zip(i, j)]
        top_in = ([("dv", d) for d in range(D)] if model.bottom is not None else []) + pairs
        if model.bottom is not None:
            out["bottom.0.weight"] = (None, dense)
        out["top.0.weight"] = (None, top_in)
    elif name == "din":
        seqs = [("emb", nm(s), d) for s in model.sequences for d in range(D)]
        out["deep.0.weight"] = (None, emb + seqs + dense)
    return out


def _text_names(schema) -> list[str]:
    return schema.text_fields() if hasattr(schema, "text_fields") else []


def _source_key(key: str, model, src_model, names: dict) -> str:
    """The source's state-dict key for the target's ``key``: a text field's projection
    (``text.<part>.<i>``, one per text field in schema order) is the one of its source field."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "text" and parts[2].isdigit():
        t_text, s_text = _text_names(model.schema), _text_names(src_model.schema)
        i = int(parts[2])
        src = names.get(t_text[i]) if i < len(t_text) else None
        if src not in s_text:
            return ""
        parts[2] = str(s_text.index(src))
    return ".".join(parts)


def _axis_index(t_labels, s_labels, t_size: int, s_size: int):
    """(target positions, source positions) of the matched entries of one axis, or a reason
    string when the axis cannot be matched."""
    if t_labels is None:
        if t_size != s_size:
            return f"size {s_size} in the source, {t_size} in the target"
        idx = torch.arange(t_size)
        return idx, idx
    t_pos = sum(1 for x in t_labels if x[0] == "pos")
    s_pos = sum(1 for x in s_labels if x[0] == "pos")
    if t_pos != s_pos:
        return f"hidden width {s_pos} in the source, {t_pos} in the target"
    where = {x: i for i, x in enumerate(s_labels)}
    ti = [i for i, x in enumerate(t_labels) if x in where]
    si = [where[t_labels[i]] for i in ti]
    return torch.tensor(ti, dtype=torch.long), torch.tensor(si, dtype=torch.long)


def _copy_dense(model, src_model, names: dict, report: TransferReport) -> None:
    t_name, s_name = model.config.get("name"), src_model.config.get("name")
    lookups = tuple(f"{p}." for p, m in model.named_modules() if isinstance(m, SparseLookup))
    tsd = model.state_dict()
    dense_keys = [k for k in tsd if not k.startswith(lookups)]
    if t_name != s_name:
        for k in dense_keys:
            report.dense[k] = f"skipped: the source model is {s_name}, the target {t_name}"
        return
    ssd = src_model.state_dict()
    inverse = {s: t for t, s in names.items() if s is not None}
    t_lab = _input_labels(model, None)
    s_lab = _input_labels(src_model, inverse)
    with torch.no_grad():
        for k in dense_keys:
            tv = tsd[k]
            sk = _source_key(k, model, src_model, names)
            if sk not in ssd:
                report.dense[k] = "skipped: not in the source"
                continue
            sv = ssd[sk]
            if k in t_lab and k in s_lab:
                idx = [_axis_index(tl, sl, tv.shape[a], sv.shape[a])
                       for a, (tl, sl) in enumerate(zip(t_lab[k], s_lab[k]))]
                bad = [x for x in idx if isinstance(x, str)]
                if bad:
                    report.dense[k] = f"skipped: {bad[0]}"
                    continue
                if len(idx) == 1:
                    tv[idx[0][0]] = sv[idx[0][1]].to(tv.dtype)
                    n = idx[0][0].numel()
                else:
                    (ti, si), (tj, sj) = idx
                    tv[ti[:, None], tj[None, :]] = sv[si[:, None], sj[None, :]].to(tv.dtype)
                    n = ti.numel() * tj.numel()
                report.dense[k] = ("copied" if n == tv.numel() else
                                   f"copied {n:,} of {tv.numel():,} entries (matched columns)")
            elif tv.shape == sv.shape:
                tv.copy_(sv)
                report.dense[k] = "copied"
            else:
                report.dense[k] = (f"skipped: shape {tuple(sv.shape)} in the source, "
                                   f"{tuple(tv.shape)} in the target")


def _load_source(source):
    """A source run directory (or checkpoint, or a model object) -> (model, where)."""
    if isinstance(source, nn.Module):
        return source, type(source).__name__
    from ..models import checkpoint as ckpt

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"init-from {path}: no such directory")
    try:
        ckpt.resolve(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"init-from {path}: not a trained model (a run directory "
                                f"written by `adrec-fast train`, or a checkpoint with "
                                f"{ckpt.META_FILE} and {ckpt.MODEL_FILE})") from None
    model, _, _ = ckpt.load_model(path)
    return model, str(path)


def init_from(model, source, rename: dict | None = None,
              copy_optimizer_state: bool = False) -> TransferReport:
    """Warm-start ``model`` (built on the target schema) from ``source``: a run directory, a
    checkpoint directory or a model. See the module docstring for what is matched and how.
    ``rename``: {source field: target field}. Returns the :class:`TransferReport`."""
    src_model, where = _load_source(source)
    if lora_layers(model):
        raise ValueError("init_from: load the source before adding LoRA adapters")
    report = TransferReport(source=where)
    names = _source_names(src_model.schema, model.schema, rename)
    used = {s for s in names.values() if s is not None}
    report.dropped = [n for n in src_model.schema.names if n not in used]
    _copy_tables(model, src_model, names, report, copy_optimizer_state)
    for t in model.schema.names:  # the non-table fields: dense, vector, sharing ones
        if t in report.fields:
            continue
        s = names[t]
        tf = model.schema.field(t)
        entry = {"source": s, "how": "fresh" if s is None else _kind(tf)}
        if s is not None:
            sf = src_model.schema.field(s)
            if _kind(sf) != _kind(tf) or (tf.type == "vector" and tf.dim != sf.dim):
                entry.update(how="fresh", note=f"the source field is {sf.type}"
                             + (f" of dim {sf.dim}" if sf.type == "vector" else "")
                             + ": starts fresh")
                names[t] = None
            elif tf.is_sparse:
                entry["how"] = "shared table"
        report.fields[t] = entry
    report.fields = {t: report.fields[t] for t in model.schema.names}  # schema order
    _copy_dense(model, src_model, names, report)
    return report


# ---------------------------------------------------------------------------- what trains
def _table_keys(model) -> set:
    return {id(c.weight) for c in model.embedding_collections()}


def _dense_params(model) -> list[tuple[str, nn.Parameter]]:
    """Every parameter but the embedding tables."""
    tables = _table_keys(model)
    return [(n, p) for n, p in model.named_parameters() if id(p) not in tables]


def _has_text(model) -> bool:
    return any(f.type == "text" for f in model.schema.fields)


def _text_params(model) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in _dense_params(model)
            if any(part.startswith("text") for part in n.split("."))]


def parse_parts(parts) -> list[str]:
    """``"embeddings,dense"`` or a list -> the parts, checked against ``FREEZE_PARTS``."""
    if isinstance(parts, str):
        parts = [p.strip() for p in parts.split(",") if p.strip()]
    parts = list(dict.fromkeys(parts))
    for p in parts:
        if p not in FREEZE_PARTS:
            raise ValueError(f"freeze: unknown part {p!r}; expected a comma list of "
                             f"{', '.join(FREEZE_PARTS)}")
    if not parts:
        raise ValueError(f"freeze: name at least one part of {', '.join(FREEZE_PARTS)}")
    return parts


def _hold_running_stats(m: nn.Module, _inputs) -> None:
    # a frozen batch norm normalises with its running statistics and never updates them
    m.training = False


def freeze(model, parts) -> list[str]:
    """Stop updates to ``parts`` (a comma string or a list of ``FREEZE_PARTS``) of ``model``,
    before its Trainer is made: "embeddings" drops the fused optimizer of every embedding
    collection (the lookup then runs without an update; a table with sparse gradients stops
    requiring them), "dense" turns off the gradient of every other parameter and makes batch
    norm use its running statistics, "text" that of the text fields' parameters (modules whose
    path starts with ``text``). Returns the parts frozen."""
    parts = parse_parts(parts)
    for p in parts:
        if p == "embeddings":
            for c in model.embedding_collections():
                if hasattr(c, "flush_l2"):
                    c.flush_l2()
                c.optimizer = None
                if isinstance(c.weight, nn.Parameter):
                    c.weight.requires_grad_(False)
        elif p == "dense":
            for _, q in _dense_params(model):
                q.requires_grad_(False)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.register_forward_pre_hook(_hold_running_stats)
        else:
            if not _has_text(model):
                raise ValueError("freeze text: the model has no text field")
            params = _text_params(model)
            if not params:
                raise ValueError("freeze text: the model has a text field but no parameter "
                                 "under a 'text*' module to freeze")
            for _, q in params:
                q.requires_grad_(False)
    c = trainable_counts(model)
    if c["embedding_trainable"] + c["dense_trainable"] == 0:
        raise ValueError(f"freeze {','.join(parts)}: nothing would train")
    return parts


def parse_adapter(spec: str) -> int:
    """``"lora:RANK"`` -> RANK (an integer >= 1)."""
    kind, _, rank = str(spec).partition(":")
    if kind != "lora" or not rank:
        raise ValueError(f"adapter {spec!r}: expected lora:RANK (e.g. lora:8)")
    try:
        return check_rank(rank)
    except ValueError:
        raise ValueError(f"adapter {spec!r}: the rank must be an integer >= 1") from None


def add_adapters(model, rank: int, alpha: float | None = None,
                 train_head_bias: bool = True, train_biases: bool = False) -> list[str]:
    """LoRA on ``model``'s dense towers: every MLP Linear gets rank-``rank`` adapters
    (``nn.lora``), and every other dense parameter (base weights, cross layers, heads, batch
    norm affine terms) stops training, except the head's bias with ``train_head_bias`` and,
    with ``train_biases``, every bias and norm shift/scale of the dense part (vectors: a few
    hundred numbers, which move each unit's operating point where a low-rank update of the
    weights cannot). Embeddings keep training unless frozen. Returns the adapted layers'
    paths; a model without an MLP raises ``ValueError``."""
    rank = check_rank(rank)
    layers = add_lora(model, rank, alpha)
    if not layers:
        raise ValueError(f"adapter lora:{rank}: model {model.config.get('name')!r} has no MLP "
                         "tower to adapt")
    adapters = {id(p) for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)}
    head_bias = None
    if train_head_bias and hasattr(model, "head"):
        h = model.head
        head_bias = h.head.bias if h.in_features > 0 else h.bias
    keep = adapters | {id(head_bias)} | (_bias_ids(model) if train_biases else set())
    for _, q in _dense_params(model):
        q.requires_grad_(id(q) in keep)
    return layers


def _bias_ids(model) -> set[int]:
    """The dense part's additive and norm vectors: every Linear's bias (adapted or not) and the
    shift and scale of every batch or layer norm (not a head's weight, which is a vector too)."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm)
    out = set()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            out.add(id(m.bias))
        elif isinstance(m, norms):
            out.update(id(q) for q in (m.weight, m.bias) if q is not None)
    return out


def trainable_counts(model) -> dict:
    """{"embedding", "embedding_trainable", "dense", "dense_trainable", "adapter"}: parameter
    counts; ``dense`` counts the model's own dense weights (LoRA adapters excluded, so that
    ``dense_trainable / dense`` is the fraction that an adapter run trains)."""
    emb = emb_t = 0
    for c in model.embedding_collections():
        n = c.weight.numel()
        emb += n
        fused = c.optimizer is not None
        if fused or (isinstance(c.weight, nn.Parameter) and c.weight.requires_grad):
            emb_t += n
    adapters = {id(p) for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)}
    dense = dense_t = ad = 0
    for _, q in _dense_params(model):
        if id(q) in adapters:
            ad += q.numel()
            dense_t += q.numel()
            continue
        dense += q.numel()
        if q.requires_grad:
            dense_t += q.numel()
    return {"embedding": emb, "embedding_trainable": emb_t, "dense": dense,
            "dense_trainable": dense_t, "adapter": ad}
