# SPDX-License-Identifier: Apache-2.0
"""Low-latency scoring of one user against N candidates, from a trained checkpoint.

``Scorer.load(dir, quantize=None | "fp16" | "int8", threads=None, mlp=None | "bf16")`` builds an
immutable model version; ``score(user, candidates) -> np.ndarray [N]`` probabilities; ``top_k``;
``score_ids`` (ids already encoded, dicts per field); ``ids_path(cand_fields)`` (the leanest path:
id arrays in, probabilities out, DLRM); ``swap(dir)`` replaces the version atomically.

Field split. A request names the user/context side once (``user``: one value per field) and the
candidate side per candidate (``candidates``: a dict of equal-length columns, or a list of dicts).
The split is per request: a field is candidate-side when ``candidates`` holds it, user-side
otherwise (a field in neither is missing: id 0 / the dense ``fill``, as in training). A field may
not be given on both sides.

Packed DLRM path (DLRM on a schema of plain categorical + dense fields, every dense field
user-side): ONE native call per request on the model packed once per field split, through the
numpy entry point of the ``adrec::serving_dlrm`` kernel (``ops.scorer.serving_dlrm_handle``, a
pybind11 handle: numpy in and out, no torch.ops dispatch, the GIL released; the op itself stays
registered for torch.compile and runs the same kernel). ``pack_dlrm`` lays the MLP weights out
in blocks, fp32 or, with ``mlp="bf16"``, bfloat16, and splits the first top layer into its
shared columns, computed once per request, and its per-candidate columns. Its kernels are the
project's own, blocked layers of the dense-product op (csrc/cpu/linear_blocked.inc, chosen in
csrc/cpu/linear.cpp: AVX512_BF16 where ``ADREC_CPU_ISA`` allows it, a portable kernel
elsewhere), run by one team of the kernels' thread pool per request, with
reusable per-thread buffers. ``mlp="bf16"`` rounds the MLP weights and every layer input to
bfloat16 and accumulates in float32 (opt-in: the default keeps the fp32 model, equal to the
model's forward within 1e-5).

Native path (DCN-v2 without its first-order ``linear`` term, and DLRM with a candidate-side dense
field, on schemas of plain categorical + dense fields): ONE call of ``adrec::serving_forward`` per
request (lookup with
dequantize-on-lookup, interaction, MLPs, head, sigmoid; csrc/cpu/scorer.cpp). The user-side
embeddings are read once per request; DLRM's bottom MLP runs once per request when every dense
field is user-side (when any dense field is candidate-side, the dense input is per candidate and
the bottom MLP runs on N rows), and DLRM dot products between two user-side fields are computed
once. torch.ops releases the GIL while the kernel runs (pybind_utils ``invokeOperatorFromPython``
drops it around the call; tests/serving checks that another Python thread keeps running).

Torch path (LR, FM, DeepFM, DIN, DCN-v2 with ``linear=True``, schemas with multi-categorical /
sequence / vector fields): the request is expanded to N rows (user values repeated) and the
model's own forward runs once under ``torch.inference_mode`` (one fused op per layer); the user
side is not shared there.

Bad requests: an unknown field -> ``ValueError`` naming it; a value of a wrong type -> ``TypeError``
naming the field; an id out of range on the fast path -> ``IndexError``; no candidates ->
``ValueError``; NaN in a dense value -> ``ValueError`` (``None`` is "missing" and becomes the field's
``fill``, as in training); an unseen categorical value -> id 0 (out of vocabulary), as in training.

Threads. A version's tensors are never written after loading and are shared by every thread; a
request reads ``self._version`` once at its start and uses only that version, so a concurrent
``swap`` never mixes two versions in one answer and never fails a request. ``threads`` sets
torch's intra-op thread count (process-wide: ``torch.set_num_threads``).

Quantization (``quantize``): ``"fp16"`` stores the tables in float16; ``"int8"`` stores them row-wise
as uint8 with a float32 (scale, bias) per row, ``x ~= q * scale + bias`` with
``scale = (max - min) / 255``, ``bias = min`` (error <= scale / 2 per element). The native kernel
dequantizes on lookup; on the torch path the dequantized values replace the fp32 tables (same
numbers, no memory saving).
"""
from __future__ import annotations

import copy
import math
import threading

import numpy as np
import torch
from torch import nn

from ..data import columns as C
from ..data.batch import Batch
from ..data.errors import DataError
from ..ops import scorer as _op
from ..models.checkpoint import load_model, resolve

QUANTIZE = (None, "fp16", "int8")
_KIND = {"dlrm": 0, "parallel": 1, "stacked": 2}


# ---------------------------------------------------------------------------- quantization
def quantize_rows(weight: torch.Tensor, mode: str | None):
    """weight [R, D] float32 -> (storage, scale_bias [R, 2] float32 or None).

    ``"fp16"``: storage [R, D] float16. ``"int8"``: storage [R, D] uint8 with
    ``x ~= q * scale + bias`` per row (scale = (max - min) / 255, bias = min; a constant row
    gets scale 1). ``None``: the float32 weight itself."""
    w = weight.detach().float().contiguous()
    if mode is None:
        return w, None
    if mode == "fp16":
        return w.half().contiguous(), None
    if mode == "int8":
        mn = w.amin(dim=1) if w.numel() else w.new_zeros(w.shape[0])  # [R]
        mx = w.amax(dim=1) if w.numel() else w.new_zeros(w.shape[0])  # [R]
        scale = (mx - mn) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # [R]
        q = ((w - mn[:, None]) / scale[:, None]).round_().clamp_(0, 255).to(torch.uint8)
        return q.contiguous(), torch.stack([scale, mn], dim=1).contiguous()  # [R, D], [R, 2]
    raise ValueError(f"quantize must be one of {QUANTIZE}, got {mode!r}")


def dequantize_rows(storage: torch.Tensor, scale_bias: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` -> [R, D] float32 (the values the kernel reads)."""
    if scale_bias is None:
        return storage.float()
    return storage.float() * scale_bias[:, :1] + scale_bias[:, 1:]


# ---------------------------------------------------------------------------- packed DLRM
MLP = (None, "fp32", "bf16")
_MAGIC = 0x4144524543534431  # csrc/cpu/scorer.cpp kMagic


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


def pack_dlrm(nat: dict, bag_base, bag_card, cand_slots,
              mlp: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a DLRM (the native parameters of a loaded version) for one field split ->
    (meta [H] int64, blob [bytes] uint8), the model operand of ``adrec::serving_dlrm``.

    Fields: the bottom MLP's output (when there is one) is field 0, sparse slot t is field
    t + 1 (t without a bottom MLP); ``cand_slots`` are the candidate-side slots, every other slot
    is user-side. The first top layer is split by columns: those of the dense vector and of the
    pairs of two user-side fields (computed once per request: u = W_s s + b) and those of the
    pairs that involve a candidate field (per candidate: relu(u + W_v z_v)). The head is the last
    layer (one output, no relu). ``mlp="bf16"`` stores the MLP weights in bfloat16 (activations
    are rounded to bfloat16 too, accumulation is float32). Which kernel runs the layers
    (AVX512_BF16 or the portable one) follows ``ADREC_CPU_ISA``, like every CPU kernel."""
    if mlp not in MLP:
        raise ValueError(f"mlp must be one of {MLP}, got {mlp!r}")
    bf16 = mlp == "bf16"
    bottom = nat["bottom"]
    hb = len(bottom) > 0
    D = int(nat["weights"].shape[1])
    T = len(bag_base)
    cset = {int(c) for c in cand_slots}
    user_slots = [t for t in range(T) if t not in cset]
    off = 1 if hb else 0
    F = T + off
    shared = [True] * off + [t not in cset for t in range(T)]
    kd = D if hb else 0  # top-input columns before the pairs
    scols, vcols, ps, pv = list(range(kd)), [], [], []
    p = 0
    for i in range(F):
        for j in range(i if nat["self_interaction"] else i + 1, F):
            if shared[i] and shared[j]:
                scols.append(kd + p)
                ps.append((i, j))
            else:
                vcols.append(kd + p)
                pv.append((i, j))
            p += 1
    top = nat["layers"]
    chain = [(top[k], top[k + 1], True) for k in range(0, len(top), 2)]
    chain.append((nat["head_w"][None], nat["head_b"].reshape(1), False))
    w1, b1, relu1 = chain[0]
    if w1.shape[1] != kd + p:
        raise ValueError(f"first top layer has {w1.shape[1]} inputs, expected {kd + p}")
    layers = []  # (Kp, Ob, relu, weight bytes, bias bytes)
    Kd = int(bottom[0].shape[1]) if hb else 0
    kp = _pad16(Kd)
    for k in range(0, len(bottom), 2):
        Ob, wb, bb = _block_layer(bottom[k], bottom[k + 1], kp, bf16)
        layers.append((kp, Ob, 1, wb, bb))
        kp = Ob * 16
    s_idx, v_idx = torch.tensor(scols, dtype=torch.long), torch.tensor(vcols, dtype=torch.long)
    Ob1, wb, bb = _block_layer(w1[:, s_idx], b1, _pad16(len(scols)), bf16)
    layers.append((_pad16(len(scols)), Ob1, 0, wb, bb))  # u = W_s s + b: no relu
    _, wb, bb = _block_layer(w1[:, v_idx], torch.zeros_like(b1), _pad16(len(vcols)), bf16)
    layers.append((_pad16(len(vcols)), Ob1, int(relu1), wb, bb))  # its bias is u
    kp = Ob1 * 16
    for w, b, relu in chain[1:]:
        Ob, wb, bb = _block_layer(w, b, kp, bf16)
        layers.append((kp, Ob, int(relu), wb, bb))
        kp = Ob * 16
    chunks, pos, desc = [], 0, []
    for kp_, ob, relu, wb, bb in layers:
        offs = []
        for c in (wb, bb):
            offs.append(pos)
            pad = (-c.numel()) % 64
            chunks += [c, torch.zeros(pad, dtype=torch.uint8)]
            pos += c.numel() + pad
        desc += [kp_, ob, relu, offs[0], offs[1]]
    blob = torch.cat(chunks)
    base = np.asarray(bag_base, dtype=np.int64)
    card = np.asarray(bag_card, dtype=np.int64)
    cs = [int(c) for c in cand_slots]
    header = [_MAGIC, int(bf16), D, F, int(hb), Kd, len(user_slots), len(cs),
              len(ps), len(pv), len(layers), len(bottom) // 2, 0, 0, 0, 0]
    meta = (header + [t + off for t in user_slots] + base[user_slots].tolist()
            + card[user_slots].tolist() + [t + off for t in cs] + base[cs].tolist()
            + card[cs].tolist() + [i for i, _ in ps] + [j for _, j in ps]
            + [i for i, _ in pv] + [j for _, j in pv] + desc)
    return torch.tensor(meta, dtype=torch.long), blob


# ---------------------------------------------------------------------------- MLP extraction
def _linear_relu_pairs(seq: nn.Module) -> list[torch.Tensor] | None:
    """An eval-mode ``Linear -> [BatchNorm1d] -> ReLU -> [Dropout]`` stack -> [w0, b0, w1, b1, ...]
    with BatchNorm folded into the linear; None when the stack has another shape."""
    out: list[torch.Tensor] = []
    pending = None  # (w, b) of a Linear not yet followed by its ReLU
    for m in seq:
        if isinstance(m, nn.Linear):
            if pending is not None:
                return None
            b = m.bias if m.bias is not None else torch.zeros(m.out_features)
            pending = [m.weight.detach().float(), b.detach().float()]
        elif isinstance(m, nn.BatchNorm1d):
            if pending is None or not m.track_running_stats or m.running_mean is None:
                return None
            s = (m.weight.detach() if m.affine else 1.0) / torch.sqrt(m.running_var + m.eps)
            beta = m.bias.detach() if m.affine else 0.0
            pending = [pending[0] * s[:, None], (pending[1] - m.running_mean) * s + beta]
        elif isinstance(m, nn.ReLU):
            if pending is None:
                return None
            out += [t.contiguous().clone() for t in pending]
            pending = None
        elif isinstance(m, nn.Dropout):
            continue
        else:
            return None
    return out if pending is None else None


# ---------------------------------------------------------------------------- one version
class _Version:
    """One loaded checkpoint: immutable after ``__init__`` (shared by every request thread)."""

    def __init__(self, path, quantize: str | None, serial: int, mlp: str | None = None):
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        if mlp not in MLP:
            raise ValueError(f"mlp must be one of {MLP}, got {mlp!r}")
        model, schema, config = load_model(path)
        self.path = str(resolve(path))
        self.serial = serial
        self.quantize = quantize
        self.schema = schema
        self.config = dict(config)
        self.name = config["name"]
        for p in model.parameters():
            p.requires_grad_(False)
        # fields: raw column -> Field; bag order; dense order
        self.by_source = {f.source: f for f in schema.fields}
        self.bags = [name for name, _ in schema.sparse_fields()]
        self.bag_pos = {schema.field(n).source: i for i, n in enumerate(self.bags)}
        tofs = schema.table_offsets()
        self.bag_base = np.array([int(tofs[t]) for _, t in schema.sparse_fields()], dtype=np.int64)
        self.bag_card = np.array([schema.cardinality(n) for n in self.bags], dtype=np.int64)
        self.dense = [schema.field(n) for n in schema.dense_fields()]
        self.dense_pos = {f.source: i for i, f in enumerate(self.dense)}
        self.simple = all(f.type == "dense" or (f.type == "categorical") for f in schema.fields)
        self.vocab = {}
        for f in schema.fields:
            o = schema.owner(f.name)
            if f.type == "categorical" and o.vocab == "build":
                self.vocab[f.source] = {v: i + 1 for i, v in enumerate(o.vocabulary)}
        self.native = None
        if self.simple:
            self.native = self._native_params(model, quantize)
        self.mlp = mlp
        # DLRM on the native path: packed per field split (pack_dlrm), one call of its numpy
        # handle (handle_for) per request when every dense field is user-side
        self.packable = self.native is not None and self.native["kind"] == _KIND["dlrm"]
        if mlp == "bf16" and self.native is None:
            raise ValueError(f"mlp='bf16' needs a model on the native path (DLRM, DCN-v2); "
                             f"{self.name!r} runs its MLPs in float32 (use mlp=None)")
        if mlp == "bf16" and not self.packable:
            # DCN-v2: the cross and deep weights in bfloat16 (biases, head and every elementwise
            # step stay float32); serving_forward runs those products in bf16
            lay = self.native["layers"]
            self.native["layers"] = [t.bfloat16().contiguous() if i % 2 == 0 else t
                                     for i, t in enumerate(lay)]
        if self.native is None and quantize is not None:
            model = copy.deepcopy(model)
            for ebc in model.embedding_collections():
                st, sb = quantize_rows(ebc.weight, quantize)
                with torch.no_grad():
                    ebc.weight.copy_(dequantize_rows(st, sb))
        # the native path needs none of the model's tensors: drop it (and its tables)
        self.model = None if self.native is not None else model
        self.plans: dict = {}  # frozenset of candidate slots -> cand_slots tensor (benign race)
        self.packed: dict = {}  # (candidate slots) -> (meta, blob) of pack_dlrm (benign race)
        self.handles: dict = {}  # (candidate slots) -> its serving_dlrm_handle (benign race)

    def packed_for(self, cand_slots) -> tuple[torch.Tensor, torch.Tensor]:
        """(meta, blob) of this version packed for the split ``cand_slots`` (cached)."""
        key = tuple(int(c) for c in cand_slots)
        got = self.packed.get(key)
        if got is None:
            got = self.packed.setdefault(key, pack_dlrm(self.native, self.bag_base, self.bag_card,
                                                        key, self.mlp))
        return got

    def handle_for(self, cand_slots):
        """The numpy entry point (``ops.scorer.serving_dlrm_handle``) of ``packed_for``."""
        key = tuple(int(c) for c in cand_slots)
        got = self.handles.get(key)
        if got is None:
            meta, blob = self.packed_for(key)
            nat = self.native
            got = self.handles.setdefault(key, _op.serving_dlrm_handle(
                meta, blob, nat["weights"], nat["scale_bias"]))
        return got

    def _native_params(self, model, quantize):
        name = self.name
        if name == "dlrm":
            kind, n_cross = _KIND["dlrm"], 0
            if model.bottom is not None:
                bottom = _linear_relu_pairs(model.bottom)
                if bottom is None:
                    return None
            else:
                bottom = []
            layers = _linear_relu_pairs(model.top)
            self_inter = bool(model.self_interaction)
        elif name == "dcnv2":
            if model.linear is not None:
                return None
            kind, bottom, self_inter = _KIND[model.structure], [], False
            deep = _linear_relu_pairs(model.deep)
            if deep is None:
                return None
            cross = []
            for w, b in zip(model.cross.weights, model.cross.biases):
                cross += [w.detach().float().contiguous().clone(),
                          b.detach().float().contiguous().clone()]
            n_cross = len(model.cross.weights)
            layers = cross + deep
        else:
            return None
        if layers is None or model.head.in_features == 0 or model.n_vector:
            return None
        weights, sb = quantize_rows(model.lookup.ebc.weight, quantize)
        if quantize is None:
            weights = weights.clone()  # our own copy: the model's buffer is not aliased
        head = model.head.head
        return {"weights": weights, "scale_bias": sb, "bottom": bottom, "layers": layers,
                "head_w": head.weight.detach().float().contiguous().clone(),
                "head_b": head.bias.detach().float().reshape(()).clone(),
                "kind": kind, "n_cross": n_cross, "self_interaction": self_inter}

    # -- the forward on encoded ids -----------------------------------------------------
    def forward_ids(self, user_ids: np.ndarray, cand_slots: list[int], cand_ids: np.ndarray,
                    dense: np.ndarray) -> np.ndarray:
        """user_ids [T] int64 (ignored at candidate slots), cand_ids [N, Tc] int64 of the slots
        ``cand_slots``, dense [Nd, K_d] float32 (Nd = 1: shared) -> probabilities [N]."""
        N = cand_ids.shape[0]
        nat = self.native
        if self.packable and dense.shape[0] == 1:
            user = np.delete(user_ids, cand_slots) if cand_slots else user_ids
            return self.handle_for(cand_slots)(user, cand_ids, dense[0])
        with torch.inference_mode():
            if self.mlp == "bf16" and self.packable:
                raise ValueError("mlp='bf16' needs every dense field on the user side (the "
                                 "bottom MLP runs once per request); pass them in `user`")
            if nat is not None:
                key = tuple(cand_slots)
                plan = self.plans.get(key)
                if plan is None:  # (slots [Tc], their row bases [Tc]) for this split
                    plan = self.plans.setdefault(key, (torch.tensor(cand_slots, dtype=torch.long),
                                                       self.bag_base[cand_slots]))
                slots, cand_base = plan
                user_rows = torch.from_numpy(user_ids + self.bag_base)  # [T]
                cand_rows = torch.from_numpy(cand_ids + cand_base)  # [N, Tc]
                out = _op.serving_forward(
                    nat["weights"], nat["scale_bias"], user_rows, cand_rows, slots,
                    torch.from_numpy(dense), nat["bottom"], nat["layers"], nat["head_w"],
                    nat["head_b"], nat["kind"], nat["n_cross"], nat["self_interaction"])
                return out.numpy()
            T = len(self.bags)
            idx = np.empty((T, N), dtype=np.int64)  # table-major bags, one id each
            idx[:] = user_ids[:, None]
            if cand_slots:
                idx[cand_slots] = cand_ids.T
            d = np.broadcast_to(dense, (N, dense.shape[1])).astype(np.float32)
            batch = Batch(indices=torch.from_numpy(idx.reshape(-1)),
                          offsets=torch.arange(T * N + 1, dtype=torch.long),
                          dense=torch.from_numpy(d), labels=torch.full((N,), float("nan")),
                          vectors=torch.zeros(N, 0), num_bags=T)
            return torch.sigmoid(self.model(batch)).numpy()

    def forward_batch(self, batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(self.model(batch)).numpy()


# ---------------------------------------------------------------------------- encoding
def _cat_token(v, name: str):
    """One raw categorical value -> its token (None = missing), as ``columns.tokens`` makes it."""
    if v is None:
        return None
    if isinstance(v, str):
        return v or None
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v.is_integer() and abs(v) < 2**53:
            return str(int(v))
        return C.tokens([v])[0][0].as_py()  # pyarrow's text for it, as in training
    raise TypeError(f"field {name!r}: expected str, int, float, bool or None, "
                    f"got {type(v).__name__} ({v!r})")


def _check_dense_scalar(v, name: str) -> None:
    if v is None or isinstance(v, str):
        return
    if isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)):
        if isinstance(v, (float, np.floating)) and math.isnan(v):
            raise ValueError(f"field {name!r}: NaN dense value (pass None for a missing value)")
        return
    raise TypeError(f"field {name!r}: expected a number or None, got {type(v).__name__} ({v!r})")


def _column(values, name: str) -> list | np.ndarray:
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"field {name!r}: a candidate column must be 1-D, got {values.shape}")
        return values
    if isinstance(values, (list, tuple)):
        return list(values)
    raise TypeError(f"field {name!r}: a candidate column must be a list or 1-D array, "
                    f"got {type(values).__name__}")


class Scorer:
    """Scores one user against N candidate ads with a trained checkpoint (see module doc)."""

    def __init__(self, version: _Version, quantize: str | None, mlp: str | None = None):
        self._version = version
        self._quantize = quantize
        self._mlp = mlp
        self._swap_lock = threading.Lock()

    @classmethod
    def load(cls, checkpoint_dir, quantize: str | None = None, threads: int | None = None,
             mlp: str | None = None) -> Scorer:
        """Load a checkpoint directory (or a run directory: its best/, else last/).
        ``mlp="bf16"`` (opt-in): DLRM's MLP weights and activations in bfloat16 with float32
        accumulation (AVX512_BF16 where the CPU has it); DCN-v2's cross and deep weights in
        bfloat16 (biases, head and the elementwise steps in float32; bf16 products from 32
        candidates on). The default keeps everything in float32."""
        if threads is not None:
            if int(threads) < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(int(threads))
        return cls(_Version(checkpoint_dir, quantize, 0, mlp), quantize, mlp)

    # -- versions -----------------------------------------------------------------------
    @property
    def version(self) -> tuple[int, str]:
        """(serial, checkpoint path) of the version new requests use."""
        v = self._version
        return v.serial, v.path

    @property
    def native(self) -> bool:
        """True when requests run as one ``adrec::serving_forward`` call."""
        return self._version.native is not None

    @property
    def schema(self):
        return self._version.schema

    def swap(self, checkpoint_dir) -> tuple[int, str]:
        """Load ``checkpoint_dir`` (same quantization) and make it the version of every request
        that starts afterwards; requests in flight finish on the version they started with.
        On a load error the current version stays. Returns the new ``version``."""
        with self._swap_lock:
            new = _Version(checkpoint_dir, self._quantize, self._version.serial + 1, self._mlp)
            self._version = new  # one reference store: atomic for readers
        return new.serial, new.path

    # -- raw requests -------------------------------------------------------------------
    def score(self, user: dict, candidates) -> np.ndarray:
        """user: {column: value} (user and context fields, once); candidates: {column: [N]
        values} or a list of N {column: value} dicts -> probabilities [N] float32."""
        v = self._version  # this request's version, for its whole duration
        return self._score(v, user, candidates)

    def top_k(self, user: dict, candidates, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best candidates: (indices [k'] int64, probabilities [k']) best first,
        k' = min(k, N); ties keep candidate order."""
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return _top_k(self.score(user, candidates), int(k))

    def _score(self, v: _Version, user, candidates) -> np.ndarray:
        if not isinstance(user, dict):
            raise TypeError(f"user must be a dict of field -> value, got {type(user).__name__}")
        cols, n = self._candidate_columns(candidates)
        for name in list(user) + list(cols):
            if name not in v.by_source:
                raise ValueError(f"unknown field {name!r}; the schema's fields are "
                                 f"{sorted(v.by_source)}")
        both = set(user) & set(cols)
        if both:
            raise ValueError(f"fields given both for the user and per candidate: {sorted(both)}")
        for name, col in cols.items():
            cols[name] = _column(col, name)
            if len(cols[name]) != n:
                raise ValueError(f"candidate column {name!r} has {len(cols[name])} values, "
                                 f"expected {n}")
        if not v.simple:
            return self._score_general(v, user, cols, n)
        T = len(v.bags)
        user_ids = np.zeros(T, dtype=np.int64)
        cand_slots, cand_cols = [], []
        for name, val in user.items():
            f = v.by_source[name]
            if f.type == "categorical":
                user_ids[v.bag_pos[name]] = self._encode_one(v, f, val)
            else:
                _check_dense_scalar(val, name)
        for name, col in cols.items():
            f = v.by_source[name]
            if f.type == "categorical":
                cand_slots.append(v.bag_pos[name])
                cand_cols.append(self._encode_col(v, f, col))
        cand_ids = (np.stack(cand_cols, axis=1) if cand_cols
                    else np.zeros((n, 0), dtype=np.int64))  # [N, Tc]
        dense = self._dense(v, user, cols, n)
        return v.forward_ids(user_ids, cand_slots, cand_ids, dense)

    @staticmethod
    def _candidate_columns(candidates) -> tuple[dict, int]:
        if isinstance(candidates, dict):
            if not candidates:
                raise ValueError("empty candidates: no candidate columns")
            n = None
            for name, col in candidates.items():
                m = len(_column(col, name))
                n = m if n is None else n
                if m != n:
                    raise ValueError(f"candidate column {name!r} has {m} values, expected {n}")
            if not n:
                raise ValueError("empty candidate list")
            return dict(candidates), n
        if isinstance(candidates, (list, tuple)):
            if not candidates:
                raise ValueError("empty candidate list")
            keys: dict = {}
            for i, c in enumerate(candidates):
                if not isinstance(c, dict):
                    raise TypeError(f"candidate {i} must be a dict, got {type(c).__name__}")
                for k in c:
                    keys.setdefault(k, None)
            return {k: [c.get(k) for c in candidates] for k in keys}, len(candidates)
        raise TypeError("candidates must be a dict of columns or a list of dicts, "
                        f"got {type(candidates).__name__}")

    @staticmethod
    def _encode_one(v: _Version, f, val) -> int:
        tok = _cat_token(val, f.name)
        if tok is None:
            return 0
        voc = v.vocab.get(f.source)
        if voc is not None:
            return voc.get(tok, 0)
        import pyarrow as pa

        return int(v.schema.lookup(f.name, pa.array([tok], pa.string()))[0])

    @staticmethod
    def _encode_col(v: _Version, f, col) -> np.ndarray:
        import pyarrow as pa

        if isinstance(col, list):
            for x in col:  # the types the training encoder accepts, nothing else
                if x is not None and not isinstance(x, (str, bool, int, float, np.generic)):
                    raise TypeError(f"field {f.name!r}: expected str, int, float, bool or None, "
                                    f"got {type(x).__name__} ({x!r})")
        try:
            toks, _ = C.tokens(col)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise TypeError(f"field {f.name!r}: values cannot be read as categorical ({e})") from e
        return v.schema.lookup(f.name, toks).astype(np.int64, copy=False)

    @staticmethod
    def _dense(v: _Version, user: dict, cols: dict, n: int) -> np.ndarray:
        """[Nd, K_d] float32 transformed dense values; Nd = 1 unless a dense field is per
        candidate."""
        per_cand = any(name in v.dense_pos for name in cols)
        rows = n if per_cand else 1
        out = np.empty((rows, len(v.dense)), dtype=np.float32)
        for j, f in enumerate(v.dense):
            if f.source in cols:
                col = cols[f.source]
                if isinstance(col, np.ndarray):
                    if col.dtype.kind == "f" and np.isnan(col).any():
                        raise ValueError(f"field {f.name!r}: NaN dense value "
                                         "(pass None for a missing value)")
                    if col.dtype.kind not in "biuf":
                        raise TypeError(f"field {f.name!r}: dense column of dtype {col.dtype}")
                else:
                    for x in col:
                        _check_dense_scalar(x, f.name)
                x = _dense_values(v, f, col)
            else:
                x = _dense_values(v, f, [user.get(f.source)])
            out[:, j] = x
        return out

    def _score_general(self, v: _Version, user: dict, cols: dict, n: int) -> np.ndarray:
        """Any schema: repeat the user values N times, encode with the schema, model forward."""
        full = dict(cols)
        for name, val in user.items():
            f = v.by_source[name]
            if f.type == "dense":
                _check_dense_scalar(val, name)
            elif f.type == "categorical":
                _cat_token(val, name)
            full[name] = [val] * n
        for name, col in cols.items():
            if v.by_source[name].type == "dense":
                for x in col:
                    _check_dense_scalar(x, name)
        try:
            batch = v.schema.encode_columns(full)
        except Exception as e:  # a DataError or an arrow error: the value was of a wrong type
            raise TypeError(f"request could not be encoded: {e}") from e
        return v.forward_batch(batch)

    # -- the leanest path: id arrays ---------------------------------------------------
    def ids_path(self, cand_fields) -> IdsPath:
        """A callable for requests of one field split, ids already encoded (DLRM on the native
        path): ``fn(user_ids, cand_ids, dense) -> probabilities [N]``. See :class:`IdsPath`."""
        return IdsPath(self, cand_fields)

    # -- the fast path: encoded ids ----------------------------------------------------
    def score_ids(self, user_ids: dict, cand_ids: dict, dense=None) -> np.ndarray:
        """Fast path, no schema work. ``user_ids``: {field: id}, ``cand_ids``: {field: int
        array [N]}, ids within the field's table as the schema encodes them (a sparse field in
        neither gets id 0); ``dense``: transformed dense values in ``schema.dense_fields()``
        order, [K_d] (shared) or [N, K_d]; required when the schema has dense fields.
        Plain categorical + dense schemas only. Raises IndexError for an id out of range."""
        v = self._version
        if not v.simple:
            raise NotImplementedError("score_ids needs a schema of categorical and dense fields "
                                      "only; use score()")
        T = len(v.bags)
        uid = np.zeros(T, dtype=np.int64)
        for name, i in user_ids.items():
            pos = v.bag_pos.get(name)
            if pos is None:
                raise ValueError(f"unknown sparse field {name!r}; sparse fields: {v.bags}")
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"field {name!r}: id must be an int, got {type(i).__name__}")
            uid[pos] = i
        slots, arrs, n = [], [], None
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
            slots.append(pos)
            arrs.append(a.astype(np.int64, copy=False))
        if not n:
            raise ValueError("empty candidate list")
        cand = np.stack(arrs, axis=1)  # [N, Tc]
        card = v.bag_card
        bad = (uid < 0) | (uid >= card)
        bad[slots] = False
        if bad.any():
            t = int(np.flatnonzero(bad)[0])
            raise IndexError(f"field {v.bags[t]!r}: id {int(uid[t])} out of range "
                             f"[0, {int(card[t])})")
        cb = (cand < 0) | (cand >= card[slots])
        if cb.any():
            r, c = (int(x[0]) for x in np.nonzero(cb))
            raise IndexError(f"field {v.bags[slots[c]]!r}: candidate {r} id {int(cand[r, c])} "
                             f"out of range [0, {int(card[slots[c]])})")
        K = len(v.dense)
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
        return v.forward_ids(uid, slots, cand, d)


class IdsPath:
    """The leanest request path: one field split, ids already encoded, numpy in and out.

    ``cand_fields``: the candidate-side sparse fields (raw column names); every other sparse
    field is user-side, in schema order: ``user_fields``. A call takes
    ``user_ids`` int64 [len(user_fields)], ``cand_ids`` int64 [N, len(cand_fields)] (ids within
    each field's table, as the schema encodes them) and ``dense`` float32 [K_d] (transformed
    values in ``schema.dense_fields()`` order, shared by every candidate; omit it when the schema
    has no dense field), and returns probabilities [N] float32. Per request a DLRM makes one call
    of the packed-DLRM kernel through its numpy entry point (``ops.scorer.serving_dlrm_handle``:
    no torch.ops dispatch, no tensors, GIL released) on the model packed once for this split (no
    per-request dict or schema work); a DCN-v2 makes one ``adrec::serving_forward`` call, without
    the dict handling of ``score_ids``. Bad requests: a wrong dtype or shape -> TypeError /
    ValueError naming the argument, an id out of range -> IndexError naming the field, no
    candidates or a NaN dense value -> ValueError. Hot swaps apply: every call uses the version
    current at its start."""

    def __init__(self, scorer: Scorer, cand_fields):
        v = scorer._version
        if v.native is None:
            raise NotImplementedError(f"ids_path needs a model on the native path (DLRM, "
                                      f"DCN-v2), not {v.name!r}; use score_ids()")
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
        self._scorer = scorer
        self._bound = None

    def _bind(self, v: _Version):
        if v.native is None:
            raise NotImplementedError(f"the current version ({v.name!r}) is not on the native "
                                      "path (DLRM, DCN-v2)")
        slots = [v.bag_pos[f] for f in self.cand_fields]
        if v.packable:
            fn = v.handle_for(slots)
        else:
            fn = self._native_call(v, slots)
        b = (v, fn)
        self._bound = b  # one reference store; a racing thread binds the same values
        return b

    @staticmethod
    def _native_call(v: _Version, cand_slots: list[int]):
        """A request function for the models that run as one ``adrec::serving_forward`` call
        (DCN-v2): the same arguments and checks as the packed DLRM's handle, in numpy."""
        T = len(v.bags)
        user_slots = np.array([t for t in range(T) if t not in cand_slots], dtype=np.int64)
        Tu, Tc, Kd = len(user_slots), len(cand_slots), len(v.dense)
        ucard, ccard = v.bag_card[user_slots], v.bag_card[np.array(cand_slots, dtype=np.int64)]
        no_dense = np.zeros((1, 0), dtype=np.float32)

        def arr(x, name, dtype, shape):
            if not isinstance(x, np.ndarray) or x.dtype != dtype:
                got = (f"{x.dtype} array {list(x.shape)}" if isinstance(x, np.ndarray)
                       else type(x).__name__)
                raise TypeError(f"ids_path: {name} must be a numpy {np.dtype(dtype)} array "
                                f"{shape}, got {got}")
            return x

        def run(user_ids, cand_ids, dense):
            u = arr(user_ids, "user_ids", np.int64, f"[{Tu}]")
            c = arr(cand_ids, "cand_ids", np.int64, f"[N, {Tc}]")
            if u.shape != (Tu,):
                raise ValueError(f"ids_path: user_ids must be [{Tu}], got {list(u.shape)}")
            if c.ndim != 2 or c.shape[1] != Tc:
                raise ValueError(f"ids_path: cand_ids must be [N, {Tc}], got {list(c.shape)}")
            if c.shape[0] == 0:
                raise ValueError("ids_path: empty candidate list (cand_ids has no rows)")
            if Kd:
                if dense is None:
                    raise ValueError(f"ids_path: dense values needed for "
                                     f"{[f.name for f in v.dense]} (dense float32 [{Kd}])")
                d = arr(dense, "dense", np.float32, f"[{Kd}]")
                if d.shape != (Kd,):
                    raise ValueError(f"ids_path: dense must be [{Kd}], got {list(d.shape)}")
                if np.isnan(d).any():
                    raise ValueError(f"ids_path: dense[{int(np.flatnonzero(np.isnan(d))[0])}] is NaN")
                d = np.ascontiguousarray(d)[None]
            else:
                if dense is not None and np.size(dense):
                    raise ValueError("ids_path: the schema has no dense field; pass dense=None")
                d = no_dense
            if ((u < 0) | (u >= ucard)).any() or ((c < 0) | (c >= ccard)).any():
                raise IndexError("ids_path: id out of range")  # named by _index_error
            uid = np.zeros(T, dtype=np.int64)
            uid[user_slots] = u
            return v.forward_ids(uid, cand_slots, np.ascontiguousarray(c), d)

        return run

    def __call__(self, user_ids: np.ndarray, cand_ids: np.ndarray, dense=None) -> np.ndarray:
        b = self._bound
        v = self._scorer._version  # this request's version
        if b is None or b[0] is not v:
            b = self._bind(v)
        try:
            return b[1](user_ids, cand_ids, dense)
        except IndexError:
            raise self._index_error(v, user_ids, cand_ids) from None

    def _index_error(self, v: _Version, user_ids, cand_ids) -> IndexError:
        for name, i in zip(self.user_fields, user_ids.tolist()):
            card = int(v.bag_card[v.bag_pos[name]])
            if not 0 <= i < card:
                return IndexError(f"field {name!r}: id {i} out of range [0, {card})")
        for c, name in enumerate(self.cand_fields):
            card = int(v.bag_card[v.bag_pos[name]])
            bad = np.flatnonzero((cand_ids[:, c] < 0) | (cand_ids[:, c] >= card))
            if bad.size:
                r = int(bad[0])
                return IndexError(f"field {name!r}: candidate {r} id {int(cand_ids[r, c])} out "
                                  f"of range [0, {card})")
        return IndexError("ids_path: id out of range")


def _dense_values(v: _Version, f, col) -> np.ndarray:
    """Raw dense values -> float32 exactly as ``Schema.encode`` transforms them."""
    try:
        return v.schema.dense_values(f.name, col)
    except DataError as e:  # non-numeric text
        raise TypeError(f"field {f.name!r}: {e}") from e


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(-scores, kind="stable")[:k].astype(np.int64)  # score desc, then index
    return idx, scores[idx]


def load(checkpoint_dir, quantize: str | None = None, threads: int | None = None,
         mlp: str | None = None) -> Scorer:
    """Same as :meth:`Scorer.load`."""
    return Scorer.load(checkpoint_dir, quantize, threads, mlp)


__all__ = ["MLP", "QUANTIZE", "IdsPath", "Scorer", "dequantize_rows", "load", "pack_dlrm",
           "quantize_rows"]
