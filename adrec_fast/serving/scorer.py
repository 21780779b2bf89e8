# SPDX-License-Identifier: Apache-2.0
"""Low-latency scoring of one user against N candidates, from a trained checkpoint.

``Scorer.load(dir, quantize=None | "fp16" | "int8", threads=None, mlp=None | "bf16",
missing="error" | "default")`` builds an immutable model version; ``score(user, candidates) ->
np.ndarray [N]`` probabilities; ``top_k``; ``score_ids`` (ids already encoded, dicts per field);
``ids_path(cand_fields)`` (the leanest path: id arrays in, probabilities out); ``swap(dir)``
replaces the version atomically; ``apply_delta(path)`` and ``follow(DIR)`` apply the row deltas
of online training as new versions (serving/deltas.py).

Field split. A request names the user/context side once (``user``: one value per field) and the
candidate side per candidate (``candidates``: a dict of equal-length columns, or a list of dicts).
The split is per request: a field is candidate-side when ``candidates`` holds it, user-side
otherwise. A field may not be given on both sides; a field in neither is an error naming it,
unless the Scorer was loaded with ``missing="default"`` (then it takes its training default: id 0,
the dense ``fill``, an empty history).

The executor. Every zoo model describes itself (``model.serving_spec()``,
adrec_fast/models/serving_spec.py): slots and sides, interaction (FM, DLRM dot, DCN-v2 cross,
target attention over a behaviour history), layers and head. ``pack`` lays such a spec out once
per field split (fp32 or, with ``mlp="bf16"``, bfloat16 layer weights in the blocked layout of
common/linear_blocked.h; the first layer split into the columns of the shared inputs and those
that vary per candidate; a candidate-side bag of a small table is gathered instead: its rows'
products with the first layers are computed at packing, ``GATHER_BYTES``), and one native call
runs a request (``ops.scorer.serving_handle``,
csrc/cpu/scorer.cpp): the user side once (user embeddings, history keys, shared first-layer
products, DLRM's bottom MLP), then the candidates. The GIL is released while it runs.
A model without a spec (a user-defined one, or a schema with multi-valued bags or vectors) is
served by its own torch forward on the request expanded to N rows, with a warning at load.

Raw values are encoded into ids in the same native call style: ``serving/encoder.py``
(``_C.RequestEncoder``, vocabulary tables built at load, the training hash for hashed fields, the
dense transforms) encodes and validates a request as ``Schema.encode`` encodes training rows,
and its errors name the field: an unknown field or no candidates -> ``ValueError``, a value of a
wrong type -> ``TypeError``, NaN in a dense value -> ``ValueError``; an unseen categorical value
is id 0 (out of vocabulary), ``None`` is missing (id 0, the dense ``fill``). On the id paths an
id out of range is an ``IndexError`` naming the field.

Threads. A version's buffers are never written after loading and are shared by every thread; a
request reads ``self._version`` once at its start and uses only that version, so a concurrent
``swap`` never mixes two versions in one answer and never fails a request. ``threads`` sets
torch's intra-op thread count (process-wide: ``torch.set_num_threads``), which the executor uses.

Quantization (``quantize``): ``"fp16"`` stores the tables in float16; ``"int8"`` stores them row-wise
as uint8 with a float32 (scale, bias) per row, ``x ~= q * scale + bias`` with
``scale = (max - min) / 255``, ``bias = min`` (error <= scale / 2 per element). The executor
dequantizes on lookup; on the torch path the dequantized values replace the fp32 tables (same
numbers, no memory saving). First-order weights stay float32.
"""
from __future__ import annotations

import copy
import threading
import warnings
import weakref

import numpy as np
import torch

from .. import _C
from ..models.checkpoint import load_model, resolve
from ..models.serving_spec import ServingSpec
from ..ops import scorer as _op
from .deltas import base_id
from .encoder import RequestEncoder, UnknownValue
from .quantize import QUANTIZE, dequantize_rows, own_rows, quantize_rows

MLP = (None, "fp32", "bf16")
MISSING = ("error", "default")


# ---------------------------------------------------------------------------- packing
_MAGIC = 0x4144524543534532  # csrc/cpu/scorer.cpp kMagic, and its header below
_HEADER = ("magic prec kind D T S Kd Tu Tc hb nb nf lt ncross Ps Pv flags dense_w cross_head "
           "bias Ks Kv Kx dvar G").split()
_ACT = {"none": 0, "relu": 1, "cross": 2}
_IN_ZV, _IN_PREV, _IN_CROSS = 0, 1, 2
#: A candidate-side bag whose projected rows (its first-layer columns times each row of its
#: table, for every first layer) take at most this many bytes is gathered rather than
#: multiplied: a candidate adds its row of first-layer outputs, Ob * 16 floats, where the
#: product takes D times as many multiply-adds over weights every candidate shares. That pays
#: while the projected table stays in the core's cache (categories, ad formats); a row read
#: from L3 costs about as much as the multiply-adds it saves (DeepFM 400-wide, 900-row tables,
#: N=64: no gain), so larger tables are multiplied.
GATHER_BYTES = 512 << 10


def _pad16(k: int) -> int:
    return (k + 15) // 16 * 16


def _block_layer(w: torch.Tensor, b: torch.Tensor, Kp: int, bf16: bool):
    """w [O, K], b [O] -> (Ob, weight bytes, bias bytes) in the blocked layout of
    common/linear_blocked.h: fp32 [Ob][Kp][16], bf16 [Ob][Kp/2][16][2] (round to nearest even);
    the bias stays float32 [Ob * 16]. Padding is zero."""
    O, K = w.shape
    Ob = (O + 15) // 16
    wp = torch.zeros(Ob * 16, Kp)
    wp[:O, :K] = w
    bp = torch.zeros(Ob * 16)
    bp[:O] = b
    if bf16:
        blk = wp.to(torch.bfloat16).view(Ob, 16, Kp // 2, 2).permute(0, 2, 1, 3).contiguous()
    else:
        blk = wp.view(Ob, 16, Kp).permute(0, 2, 1).contiguous()
    return Ob, blk.view(-1).view(torch.uint8), bp.view(torch.uint8)


def pack(spec: ServingSpec, bag_base, bag_card, seq_base, seq_card, n_dense: int, cand_slots,
         dense_cand=(), mlp: str | None = None, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay ``spec`` out for one field split -> (meta [H] int64, blob [bytes] uint8), the model
    operand of ``adrec::serving_forward``.

    ``bag_base`` / ``bag_card`` [T]: each bag's first row in ``spec.table`` and its table size;
    ``seq_base`` / ``seq_card`` likewise for ``spec.sequences``; ``n_dense``: the dense width
    K_d; ``cand_slots``: the bags given
    per candidate, ``dense_cand``: the dense positions given per candidate (every other one is
    shared). The first layer that reads the concatenated input (x0 = [fields, dense], or DLRM's
    [bottom output, pairs]) is split by columns: those of shared inputs become a product
    computed once per request (its bias), the others stay per candidate. ``mlp="bf16"`` stores
    the layer weights in bfloat16 (activations are rounded to bfloat16, accumulation is
    float32).

    ``rows(t) -> [bag_card[t], D]`` float32, the rows the executor reads for bag t: given it, a
    candidate-side bag of an fp32 concat model whose projected rows fit ``GATHER_BYTES`` is
    gathered: its columns leave the per-candidate product, and each first layer gets a table
    [bag_card[t], Ob * 16] of the products of its rows (zero padded), read per candidate."""
    if mlp not in MLP:
        raise ValueError(f"mlp must be one of {MLP}, got {mlp!r}")
    bf16 = mlp == "bf16"
    D = int(spec.table.shape[1])
    T, S = len(bag_base), len(spec.sequences)
    cset, dset = {int(c) for c in cand_slots}, {int(j) for j in dense_cand}
    dot = spec.interaction == "dot"
    bottom = spec.bottom if dot else []
    hb = bool(bottom)
    Kd = int(n_dense)
    dvar = len(dset)
    # fields: DLRM [bottom output?, bags]; the others [bags, pooled histories]
    if dot:
        F = T + int(hb)
        shared = ([dvar == 0] if hb else []) + [t not in cset for t in range(T)]
    else:
        F = T + S
        shared = [t not in cset for t in range(T)] + [t not in cset for _, t in spec.sequences]
    # the tower: (weight [O, K], bias [O], act, input), input one of "x0" (split), prev, cross
    tower = []
    for i, (w, b) in enumerate(spec.cross):
        tower.append((w, b, "cross", "x0" if i == 0 else _IN_CROSS))
    deep_in = "x0" if not spec.cross or spec.structure == "parallel" else _IN_CROSS
    for i, ly in enumerate(spec.deep):
        tower.append((ly.weight, ly.bias, ly.act, deep_in if i == 0 else _IN_PREV))
    if spec.head is not None:
        tower.append((spec.head[None], torch.zeros(1), "none", deep_in if not spec.deep
                      else _IN_PREV))
    firsts = [(w, b) for w, b, _, inp in tower if inp == "x0"]
    out16 = sum(_pad16(w.shape[0]) for w, _ in firsts)
    gathered = [] if rows is None or dot or bf16 else [
        t for t in sorted(cset) if 0 < int(bag_card[t]) * out16 * 4 <= GATHER_BYTES]
    # first-layer columns (in the model's input order) that are shared / vary
    scols, vcols, ps, pv = [], [], [], []
    if dot:
        if hb:
            (scols if dvar == 0 else vcols).extend(range(D))
        p, k0 = 0, D if hb else 0
        for i in range(F):
            for j in range(i if spec.self_interaction else i + 1, F):
                if shared[i] and shared[j]:
                    scols.append(k0 + p)
                    ps.append((i, j))
                else:
                    vcols.append(k0 + p)
                    pv.append((i, j))
                p += 1
        Kin = k0 + p
    else:
        for f in range(F):
            if f not in gathered:  # the bags are the first T fields
                (scols if shared[f] else vcols).extend(range(f * D, (f + 1) * D))
        for j in range(Kd):
            (vcols if j in dset else scols).append(F * D + j)
        Kin = F * D + Kd
    Kx = Kin if spec.cross else 0
    s_idx, v_idx = torch.tensor(scols, dtype=torch.long), torch.tensor(vcols, dtype=torch.long)
    Ksp, Kvp, Kxp = _pad16(len(scols)), _pad16(len(vcols)), _pad16(Kx)

    records, blobs = [], []  # (Kp, Ob, act, in, ubias, weight bytes, bias bytes)

    def add(w, b, Kp, act, inp=0, ub=-1):
        Ob, wb, bb = _block_layer(w, b, Kp, bf16)
        records.append([Kp, Ob, _ACT[act], inp, ub])
        blobs.append((wb, bb))

    kp = _pad16(Kd)
    for ly in bottom:
        add(ly.weight, ly.bias, kp, ly.act)
        kp = _pad16(ly.weight.shape[0])
    nf = sum(1 for *_, inp in tower if inp == "x0")
    for w, b, *_ in (t for t in tower if t[3] == "x0"):  # u_j = W_s s + b: once per request
        if w.shape[1] != Kin:
            raise ValueError(f"a first layer has {w.shape[1]} inputs, expected {Kin}")
        add(w[:, s_idx], b, Ksp, "none")
    j = 0
    for w, b, act, inp in tower:
        if inp == "x0":
            add(w[:, v_idx], torch.zeros_like(b), Kvp, act, _IN_ZV, j)
            j += 1
        else:
            add(w, b, Kxp if inp == _IN_CROSS or act == "cross" else _pad16(w.shape[1]), act, inp)
    chunks, pos = [], 0

    def put(t: torch.Tensor) -> int:
        nonlocal pos
        off = pos
        pad = (-t.numel()) % 64
        chunks.extend([t, torch.zeros(pad, dtype=torch.uint8)])
        pos += t.numel() + pad
        return off

    for rec, (wb, bb) in zip(records, blobs):
        rec += [put(wb), put(bb)]
    # gathered bag t: (its candidate column, its table size, one table per first layer)
    slots = sorted(cset)
    gmeta = []
    for t in gathered:
        e = rows(t).float()  # [card, D]
        offs = []
        for w, _ in firsts:
            pj = torch.zeros(e.shape[0], _pad16(w.shape[0]))
            pj[:, :w.shape[0]] = e @ w[:, t * D:(t + 1) * D].float().T  # [card, O]
            offs.append(put(pj.contiguous().view(-1).view(torch.uint8)))
        gmeta += [slots.index(t), int(bag_card[t])] + offs + [-1] * (2 - len(offs))

    def vec(t) -> int:
        return -1 if t is None else put(t.detach().float().contiguous().view(torch.uint8))

    hdr = dict(magic=_MAGIC, prec=int(bf16), kind=int(dot), D=D, T=T, S=S, Kd=Kd,
               Tu=T - len(cset), Tc=len(cset), hb=int(hb), nb=len(bottom), nf=nf,
               lt=len(tower), ncross=len(spec.cross), Ps=len(ps), Pv=len(pv),
               flags=int(spec.lin is not None) | 2 * int(spec.fm), dense_w=vec(spec.dense_w),
               cross_head=vec(spec.cross_head), bias=vec(torch.tensor([spec.bias])),
               Ks=len(scols), Kv=len(vcols), Kx=Kx, dvar=dvar, G=len(gathered))
    base, card = np.asarray(bag_base, np.int64), np.asarray(bag_card, np.int64)
    meta = ([hdr[k] for k in _HEADER] + base.tolist() + card.tolist()
            + [int(t in cset) for t in range(T)] + [int(j in dset) for j in range(Kd)]
            + list(map(int, seq_base)) + list(map(int, seq_card))
            + [t for _, t in spec.sequences] + [i for i, _ in ps] + [j for _, j in ps]
            + [i for i, _ in pv] + [j for _, j in pv] + gmeta + [x for r in records for x in r])
    blob = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)
    return torch.tensor(meta, dtype=torch.long), blob


# ---------------------------------------------------------------------------- one version
class _Version:
    """One loaded checkpoint: immutable after ``__init__`` (shared by every request thread)."""

    def __init__(self, path, quantize: str | None, serial: int, mlp: str | None = None,
                 missing: str = "error"):
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        if mlp not in MLP:
            raise ValueError(f"mlp must be one of {MLP}, got {mlp!r}")
        if missing not in MISSING:
            raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
        # the exporter's base id of what is loaded (None for another checkpoint): deltas name
        # it; an exporter may replace DIR/base at any time (a rebase), so the id is read before
        # and after the load, and the load repeated when they differ
        for _ in range(3):
            base = base_id(path)
            model, schema, config = load_model(path)
            if base_id(path) == base:
                break
        else:
            raise RuntimeError(f"{path}: the checkpoint was replaced during each of 3 loads")
        self.path = str(resolve(path))
        self.delta_base = base
        self.serial = serial
        self.quantize = quantize
        self.mlp = None if mlp == "fp32" else mlp
        self.missing = missing
        self.schema = schema
        self.config = dict(config)
        self.name = config["name"]
        for p in model.parameters():
            p.requires_grad_(False)
        self.by_source = {f.source: f for f in schema.fields}
        self.bags = [name for name, _ in schema.sparse_fields()]
        self.bag_pos = {schema.field(n).source: i for i, n in enumerate(self.bags)}
        tofs = schema.table_offsets()
        self.bag_base = np.array([int(tofs[t]) for _, t in schema.sparse_fields()], dtype=np.int64)
        self.bag_card = np.array([schema.cardinality(n) for n in self.bags], dtype=np.int64)
        self.dense = [schema.field(n) for n in schema.dense_fields()]
        self.seq_names = [n for n, _ in schema.sequence_fields()]
        simple = all(f.type in ("categorical", "dense", "text")
                     or (f.type == "multi_categorical" and f.sequence) for f in schema.fields)
        # dynamic tables (64-bit keys, rows found by the model's DynamicEmbedding): the schema
        # hashes the request's values as it hashed training rows, and the model's forward
        # looks the keys up read-only (a key outside the table reads the unadmitted row)
        dynamic = schema.has_dynamic
        simple = simple and not dynamic
        # raw values -> ids in one native call (serving/encoder.py); None: pooled multi-valued
        # bags or vectors, encoded by the schema itself
        self.text_known = None  # set by _text_slots for a schema with text fields
        text = self._text_slots(model, schema, tofs) if simple else None
        simple = simple and (text is not None or not schema.text_fields())
        self.encoder = RequestEncoder(schema, missing, text) if simple else None
        spec = model.serving_spec() if simple else None
        if spec is None and text is not None:  # the torch path encodes text through the schema
            self.encoder = None
        seqs = [s for s, _ in spec.sequences] if spec is not None else []
        # the encoder hands over every history of the schema, in order: the executor reads
        # them all, or none (a model without attention on a schema with histories)
        partial = bool(seqs) and seqs != self.seq_names
        self.spec = None
        if spec is not None and not partial:
            st, sb = quantize_rows(spec.table, quantize)
            self.weights = own_rows(st)
            self.scale_bias = sb
            self.lin = None if spec.lin is None else spec.lin.detach().float().contiguous().clone()
            self.spec = copy.copy(spec)
            self.spec.table = self.weights  # packing reads only its width
            seq_table = dict(schema.sequence_fields())
            self.seqs = seqs
            self.seq_base = [int(tofs[seq_table[s]]) for s in self.seqs]
            self.seq_card = [schema.cardinality(s) for s in self.seqs]
            self.model = None  # the executor needs none of the model's tensors
        else:
            what = ("dynamic tables" if dynamic
                    else "multi-valued bags or vector fields" if not simple
                    else f"model {self.name!r} attends to {seqs} of the schema's histories "
                    f"{self.seq_names}" if partial
                    else f"no serving spec for model {self.name!r}")
            warnings.warn(f"Scorer: {what}: requests run the model's torch forward on N rows",
                          stacklevel=4)
            if mlp == "bf16":
                raise ValueError(f"mlp='bf16' needs the executor; {self.name!r} runs its torch "
                                 "forward in float32 (use mlp=None)")
            if quantize is not None:
                model = copy.deepcopy(model)
                for ebc in model.embedding_collections():
                    st, sb = quantize_rows(ebc.weight, quantize)
                    with torch.no_grad():
                        ebc.weight.copy_(dequantize_rows(st, sb))
            self.model = model
        if self.text_known is not None and self.spec is not None:
            self.model = model  # a text value not cached at load runs the torch path
        self.handles: dict = {}  # (cand slots, dense cand) -> its handle (benign race)
        self.bind()

    def bind(self) -> None:
        """Sets ``score_raw(user, candidates)``, this version's raw-value path: one native call
        (encoder and executor, ``front``) where the executor runs the model; for text fields,
        the model's forward when a text value is not among the packed rows; else the schema's
        encoding and the model's forward. Called again on a copy (serving/deltas.py).

        Neither ``front`` nor ``score_raw`` holds the version itself, only a weak reference: a
        cycle through the native ``front`` (which the garbage collector cannot traverse) kept
        every replaced version, tables and all, alive for good. A caller holds the version for
        the duration of a request (``Scorer.score``)."""
        ref = weakref.ref(self)
        self.front = (_C.ServingFront(self.encoder._impl,
                                      lambda *split: ref().handle_for(*split))
                      if self.spec is not None and self.encoder is not None else None)
        front = self.front
        if front is None and self.encoder is not None:
            def score_raw(user, candidates):
                v = ref()
                r = v.encoder.encode(user, candidates)
                return v.forward_ids(r.user_ids, r.cand_slots, r.cand_ids, r.dense,
                                     r.dense_cand, r.seqs)
        elif front is None:
            def score_raw(user, candidates):
                return _score_general(ref(), user, candidates)
        elif self.text_known is not None:
            def score_raw(user, candidates):
                try:
                    return front.score(user, candidates)
                except UnknownValue:  # a text value not packed (or a bad one): the forward
                    return _score_general(ref(), user, candidates)  # encodes or names it
        else:
            score_raw = front.score  # the native method itself: no Python frame
        self.score_raw = score_raw

    def _text_slots(self, model, schema, tofs) -> dict | None:
        """Text fields become bags after the schema's (one table each, after its tables): the
        model's rows for every value cached at load (``TextFields.serving_rows``), the encoder's
        vocabulary the same values. Returns {field: values} (None: no text fields, or a model
        without ``TextFields``, served by its forward)."""
        self.text_known = None
        text = getattr(model, "text", None)
        if not schema.text_fields() or text is None:
            return None
        values = dict(zip(text.names, text.freeze_for_serving()))
        base = int(tofs[-1])
        for name in text.names:
            f = schema.field(name)
            self.bag_pos[f.source] = len(self.bags)
            self.bags.append(name)
            self.bag_base = np.append(self.bag_base, base)
            self.bag_card = np.append(self.bag_card, len(values[name]) + 1)
            base += len(values[name]) + 1
        # raw values the packed tables hold (None: missing, row 0); others take the torch path
        self.text_known = {schema.field(n).source: frozenset(v) | {None}
                           for n, v in values.items()}
        return values

    def packed_for(self, cand_slots, dense_cand=()) -> tuple[torch.Tensor, torch.Tensor]:
        """(meta, blob) of this version packed for one field split."""
        return pack(self.spec, self.bag_base, self.bag_card, self.seq_base, self.seq_card,
                    len(self.dense), cand_slots, dense_cand, self.mlp, self.bag_rows)

    def bag_rows(self, t: int) -> torch.Tensor:
        """The rows of bag ``t`` as the executor reads them -> [bag_card[t], D] float32."""
        r0, n = int(self.bag_base[t]), int(self.bag_card[t])
        sb = None if self.scale_bias is None else self.scale_bias[r0:r0 + n]
        return dequantize_rows(self.weights[r0:r0 + n], sb)

    def handle_for(self, cand_slots, dense_cand=()):
        """The executor's numpy entry point for one field split (cached)."""
        key = (tuple(sorted(int(c) for c in cand_slots)), tuple(sorted(dense_cand)))
        got = self.handles.get(key)
        if got is None:
            meta, blob = self.packed_for(*key)
            got = self.handles.setdefault(key, _op.serving_handle(
                meta, blob, self.weights, self.scale_bias, self.lin))
        return got

    def forward_ids(self, user_ids: np.ndarray, cand_slots: list[int], cand_ids: np.ndarray,
                    dense: np.ndarray, dense_cand=(), seqs=None) -> np.ndarray:
        """user_ids [T] int64 (ignored at candidate slots), cand_ids [N, Tc] int64 of the slots
        ``cand_slots`` (bag order), dense [Nd, K_d] float32 (Nd = 1: shared), seqs: one int64
        array per history -> probabilities [N]."""
        if self.spec is not None:
            sid, sl = _seq_arrays(seqs, len(self.seqs))
            return self.handle_for(cand_slots, dense_cand)(user_ids, cand_ids, dense, sid, sl)
        from ..data.batch import Batch

        N, T = cand_ids.shape[0], len(self.bags)
        idx = np.empty((T, N), dtype=np.int64)  # table-major bags, one id each
        idx[:] = user_ids[:, None]
        if len(cand_slots):
            idx[list(cand_slots)] = cand_ids.T
        d = np.broadcast_to(dense, (N, dense.shape[1])).astype(np.float32)
        seq_i, seq_o = {}, {}
        for name, s in zip(self.seq_names, seqs if seqs is not None else []):
            s = torch.as_tensor(np.asarray(s, dtype=np.int64))
            seq_i[name] = s.repeat(N)  # every candidate row has the user's history
            seq_o[name] = torch.arange(N + 1, dtype=torch.long) * s.numel()
        batch = Batch(indices=torch.from_numpy(idx.reshape(-1)),
                      offsets=torch.arange(T * N + 1, dtype=torch.long),
                      dense=torch.from_numpy(d), labels=torch.full((N,), float("nan")),
                      vectors=torch.zeros(N, 0), num_bags=T, seq_indices=seq_i, seq_offsets=seq_o)
        return self.forward_batch(batch)

    def forward_batch(self, batch) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(self.model(batch)).numpy()


def _seq_arrays(seqs, S: int):
    if S == 0:
        return None, None
    seqs = [np.zeros(0, np.int64)] * S if seqs is None else seqs
    if len(seqs) != S:
        raise ValueError(f"{S} behaviour histories expected, got {len(seqs)}")
    parts = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
    return (np.concatenate(parts) if S > 1 else parts[0],
            np.array([p.shape[0] for p in parts], dtype=np.int64))


class Scorer:
    """Scores one user against N candidate ads with a trained checkpoint (see module doc)."""

    def __init__(self, version: _Version, quantize: str | None, mlp: str | None = None,
                 missing: str = "error"):
        self._version = version
        self._quantize = quantize
        self._mlp = mlp
        self._missing = missing
        self._swap_lock = threading.Lock()
        self._shadow = None  # serving/deltas.py: the model behind the deltas applied so far

    @classmethod
    def load(cls, checkpoint_dir, quantize: str | None = None, threads: int | None = None,
             mlp: str | None = None, missing: str = "error") -> Scorer:
        """Load a checkpoint directory (or a run directory: its best/, else last/).
        ``mlp="bf16"`` (opt-in): the layer weights and activations in bfloat16 with float32
        accumulation (AVX512_BF16 where the CPU has it); the default keeps everything in
        float32. ``missing="default"``: a field a request leaves out takes its training default
        instead of raising."""
        if threads is not None:
            if int(threads) < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(int(threads))
        return cls(_Version(checkpoint_dir, quantize, 0, mlp, missing), quantize, mlp, missing)

    # -- versions -----------------------------------------------------------------------
    @property
    def version(self) -> tuple[int, str]:
        """(serial, checkpoint path) of the version new requests use."""
        v = self._version
        return v.serial, v.path

    @property
    def native(self) -> bool:
        """True when requests run on the native executor (every zoo model)."""
        return self._version.spec is not None

    @property
    def schema(self):
        return self._version.schema

    def swap(self, checkpoint_dir) -> tuple[int, str]:
        """Load ``checkpoint_dir`` (same settings) and make it the version of every request that
        starts afterwards; requests in flight finish on the version they started with.
        On a load error the current version stays. Returns the new ``version``."""
        with self._swap_lock:
            new = _Version(checkpoint_dir, self._quantize, self._version.serial + 1, self._mlp,
                           self._missing)
            self._version = new  # one reference store: atomic for readers
        return new.serial, new.path

    def apply_delta(self, path) -> tuple[int, str]:
        """Apply one row delta of online training (its ``.json`` manifest or ``.safetensors``
        file) as the next version, swapped in as by ``swap``. A corrupt, partial,
        out-of-sequence or wrong-base delta raises ``serving.deltas.DeltaError`` naming the
        file, and the current version stays (see serving/deltas.py)."""
        from . import deltas

        with self._swap_lock:
            new = deltas.apply(self, path)
            self._version = new
        return new.serial, new.path

    def follow(self, directory, poll_s: float = 1.0):
        """Apply the deltas an exporter writes to ``directory`` (``DIR`` or ``DIR/deltas``) in
        a background thread, every ``poll_s`` seconds, in sequence order; returns the running
        ``serving.deltas.Follower`` (``stop()`` it; ``errors`` lists the refused deltas)."""
        from . import deltas

        return deltas.Follower(self, directory, poll_s).start()

    # -- raw requests -------------------------------------------------------------------
    def score(self, user: dict, candidates) -> np.ndarray:
        """user: {column: value} (user and context fields, once); candidates: {column: [N]
        values} or a list of N {column: value} dicts -> probabilities [N] float32."""
        v = self._version  # this request's version, held for its whole duration
        return v.score_raw(user, candidates)

    def top_k(self, user: dict, candidates, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best candidates: (indices [k'] int64, probabilities [k']) best first,
        k' = min(k, N); ties keep candidate order."""
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return _top_k(self.score(user, candidates), int(k))

    # -- the leanest path: id arrays ---------------------------------------------------
    def ids_path(self, cand_fields) -> IdsPath:
        """A callable for requests of one field split, ids already encoded:
        ``fn(user_ids, cand_ids, dense, seqs) -> probabilities [N]``. See :class:`IdsPath`."""
        return IdsPath(self, cand_fields)

    # -- the fast path: encoded ids ----------------------------------------------------
    def score_ids(self, user_ids: dict, cand_ids: dict, dense=None, seqs=None) -> np.ndarray:
        """Fast path, no schema work. ``user_ids``: {field: id}, ``cand_ids``: {field: int
        array [N]}, ids within the field's table as the schema encodes them (a sparse field in
        neither gets id 0); ``dense``: transformed dense values in ``schema.dense_fields()``
        order, [K_d] (shared) or [N, K_d]; required when the schema has dense fields; ``seqs``:
        one id array per behaviour history (``schema.sequence_fields()`` order).
        Raises IndexError for an id out of range."""
        v = self._version
        T = len(v.bags)
        uid = np.zeros(T, dtype=np.int64)
        for name, i in user_ids.items():
            pos = v.bag_pos.get(name)
            if pos is None:
                raise ValueError(f"unknown sparse field {name!r}; sparse fields: {v.bags}")
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"field {name!r}: id must be an int, got {type(i).__name__}")
            uid[pos] = i
        cols, n = {}, None
        for name, a in cand_ids.items():
            pos = v.bag_pos.get(name)
            if pos is None:
                raise ValueError(f"unknown sparse field {name!r}; sparse fields: {v.bags}")
            if name in user_ids:
                raise ValueError(f"field {name!r} given both for the user and per candidate")
            a = np.asarray(a)
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise TypeError(f"field {name!r}: candidate ids must be a 1-D integer array, "
                                f"got {a.dtype} {a.shape}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"field {name!r}: {a.shape[0]} candidate ids, expected {n}")
            cols[pos] = a.astype(np.int64, copy=False)
        if not n:
            raise ValueError("empty candidate list")
        slots = sorted(cols)
        cand = np.ascontiguousarray(np.stack([cols[s] for s in slots], axis=1))  # [N, Tc]
        _check_ids(v, [t for t in range(T) if t not in cols], uid, slots, cand)
        K = len(v.dense)
        dcand: tuple = ()
        if K == 0:
            d = np.zeros((1, 0), dtype=np.float32)
        else:
            if dense is None:
                raise ValueError(f"dense values needed for {[f.name for f in v.dense]}")
            d = np.asarray(dense, dtype=np.float32)
            if d.ndim == 1:
                d = d[None]
            if d.ndim != 2 or d.shape[1] != K or d.shape[0] not in (1, n):
                raise ValueError(f"dense must be [{K}] or [{n}, {K}], got {d.shape}")
            if np.isnan(d).any():
                raise ValueError("NaN dense value")
            d = np.ascontiguousarray(d)
            if d.shape[0] > 1:
                dcand = tuple(range(K))
        return v.forward_ids(uid, slots, cand, d, dcand, seqs)


def _score_general(v: _Version, user, candidates) -> np.ndarray:
    """Schemas with pooled multi-valued bags or vectors: the schema encodes the request expanded
    to N rows (its DataError names the field), and the model's forward runs on them."""
    if not isinstance(user, dict):
        raise TypeError(f"user must be a dict of field -> value, got {type(user).__name__}")
    if isinstance(candidates, dict):
        cols = {k: list(c) for k, c in candidates.items()}
    elif isinstance(candidates, (list, tuple)) and all(isinstance(c, dict) for c in candidates):
        keys = dict.fromkeys(k for c in candidates for k in c)
        cols = {k: [c.get(k) for c in candidates] for k in keys}
    else:
        raise TypeError("candidates must be a dict of columns or a list of dicts, "
                        f"got {type(candidates).__name__}")
    n = len(next(iter(cols.values()))) if cols else len(candidates) if candidates else 0
    if not n:
        raise ValueError("empty candidate list")
    bad = [k for k in [*user, *cols] if k not in v.by_source] + sorted(set(user) & set(cols))
    if bad or any(len(c) != n for c in cols.values()):
        raise ValueError(f"request fields {bad or sorted(cols)}: unknown, given on both sides, or "
                         f"candidate columns of different lengths; fields: {sorted(v.by_source)}")
    full = {**cols, **{k: [x] * n for k, x in user.items()}}
    gone = [f for f in v.by_source if f not in full]
    if gone and v.missing == "error":
        raise ValueError(f"missing fields {gone}: give each in user or per candidate, or load "
                         "with missing='default' to fill them with their training defaults")
    full.update({f: [None] * n for f in gone})
    try:
        batch = v.schema.encode_columns(full)
    except Exception as e:  # a DataError or an arrow error: the value was of a wrong type
        raise TypeError(f"request could not be encoded: {e}") from e
    return v.forward_batch(batch)


def _check_ids(v: _Version, user_slots, uid, cand_slots, cand) -> None:
    """IndexError naming the field of the first id out of its table (a dynamic table's key,
    cardinality 0, is any int64)."""
    user_slots = [t for t in user_slots if v.bag_card[t]]
    cand_slots = [t if v.bag_card[t] else None for t in cand_slots]
    for t in user_slots:
        if not 0 <= uid[t] < v.bag_card[t]:
            raise IndexError(f"field {v.bags[t]!r}: id {int(uid[t])} out of range "
                             f"[0, {int(v.bag_card[t])})")
    for c, t in enumerate(cand_slots):
        if t is None:
            continue
        bad = np.flatnonzero((cand[:, c] < 0) | (cand[:, c] >= v.bag_card[t]))
        if bad.size:
            r = int(bad[0])
            raise IndexError(f"field {v.bags[t]!r}: candidate {r} id {int(cand[r, c])} out of "
                             f"range [0, {int(v.bag_card[t])})")


class IdsPath:
    """The leanest request path: one field split, ids already encoded, numpy in and out.

    ``cand_fields``: the candidate-side sparse fields (raw column names); every other sparse
    field is user-side, in schema order: ``user_fields``. A call takes ``user_ids`` int64
    [len(user_fields)], ``cand_ids`` int64 [N, len(cand_fields)] (ids within each field's table,
    as the schema encodes them), ``dense`` float32 [K_d] (transformed values in
    ``schema.dense_fields()`` order, shared by every candidate; omit it when the schema has no
    dense field) and ``seqs`` (one int64 id array per behaviour history, for DIN), and returns
    probabilities [N] float32: one call of the executor's numpy entry point on the model packed
    for this split. Bad requests: a wrong dtype or shape -> TypeError / ValueError naming the
    argument, an id out of range -> IndexError naming the field, no candidates or a NaN dense
    value -> ValueError. Hot swaps apply: every call uses the version current at its start."""

    def __init__(self, scorer: Scorer, cand_fields):
        v = scorer._version
        if v.spec is None:
            raise NotImplementedError(f"ids_path needs a model the executor runs, not "
                                      f"{v.name!r}; use score_ids()")
        cand_fields = list(cand_fields)
        for name in cand_fields:
            if name not in v.bag_pos:
                raise ValueError(f"unknown sparse field {name!r}; sparse fields: "
                                 f"{sorted(v.bag_pos)}")
        if len(set(cand_fields)) != len(cand_fields):
            raise ValueError(f"candidate fields repeat: {cand_fields}")
        by_slot = {i: name for name, i in v.bag_pos.items()}
        self.cand_fields = tuple(cand_fields)
        self.user_fields = tuple(by_slot[t] for t in range(len(v.bags))
                                 if by_slot[t] not in cand_fields)
        slots = [v.bag_pos[f] for f in self.cand_fields]
        # the executor reads candidate columns in slot order
        self._perm = None if slots == sorted(slots) else np.argsort(slots)
        self._scorer = scorer
        self._bound = None

    def _bind(self, v: _Version):
        if v.spec is None:
            raise NotImplementedError(f"the current version ({v.name!r}) has no serving spec")
        b = (v, v.handle_for([v.bag_pos[f] for f in self.cand_fields]), len(v.seqs))
        self._bound = b  # one reference store; a racing thread binds the same values
        return b

    def __call__(self, user_ids: np.ndarray, cand_ids: np.ndarray, dense=None,
                 seqs=None) -> np.ndarray:
        b = self._bound
        v = self._scorer._version  # this request's version
        if b is None or b[0] is not v:
            b = self._bind(v)
        if not isinstance(user_ids, np.ndarray) or user_ids.dtype != np.int64:
            raise TypeError(f"ids_path: user_ids must be a numpy int64 array "
                            f"[{len(self.user_fields)}], got {_describe(user_ids)}")
        if user_ids.ndim != 1 or user_ids.shape[0] != len(self.user_fields):
            raise ValueError(f"ids_path: user_ids must be [{len(self.user_fields)}] "
                             f"({list(self.user_fields)}), got {_describe(user_ids)}")
        if self._perm is not None and isinstance(cand_ids, np.ndarray) and cand_ids.ndim == 2:
            cand_ids = np.ascontiguousarray(cand_ids[:, self._perm])
        sid, sl = _seq_arrays(seqs, b[2])
        try:
            return b[1](user_ids, cand_ids, dense, sid, sl)
        except IndexError:
            raise self._index_error(v, user_ids, cand_ids) from None

    def _index_error(self, v: _Version, user_ids, cand_ids) -> IndexError:
        user_slots = [v.bag_pos[f] for f in self.user_fields]
        uid = np.zeros(len(v.bags), dtype=np.int64)
        uid[user_slots] = user_ids
        slots = sorted(v.bag_pos[f] for f in self.cand_fields)
        try:
            _check_ids(v, user_slots, uid, slots, cand_ids)
        except IndexError as e:
            return e
        return IndexError("ids_path: a history id is out of range")


def _describe(x) -> str:
    return f"{x.dtype} array {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(-scores, kind="stable")[:k].astype(np.int64)  # score desc, then index
    return idx, scores[idx]


def load(checkpoint_dir, quantize: str | None = None, threads: int | None = None,
         mlp: str | None = None, missing: str = "error") -> Scorer:
    """Same as :meth:`Scorer.load`."""
    return Scorer.load(checkpoint_dir, quantize, threads, mlp, missing)


__all__ = ["MISSING", "MLP", "QUANTIZE", "IdsPath", "Scorer", "dequantize_rows", "load", "pack",
           "quantize_rows"]
