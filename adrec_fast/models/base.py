# SPDX-License-Identifier: Apache-2.0
"""The shared machinery of every CTR model: the sparse lookup over one EmbeddingBagCollection,
MLPs, the registry, and the ``CTRModel`` base class (``Batch`` in, logits [B] out)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .. import functional as F
from ..data.allocator import map_large_blocks
from ..data.batch import Batch, bag_take
from ..nn import CrossNet, Dropout, EmbeddingBagCollection, SigmoidBCEHead
from ..nn.dynamic_table import DynamicEmbedding
from ..nn.embedding_bag import check_l2
from ..nn.text import TextFields
from ..nn.lora import LoRALinear
from ..optim import FusedRowwiseAdagrad, FusedSGD

EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "sgd", "none")
#: ``precision=`` values: the dtype of the dense tower's matrix products
PRECISIONS = ("fp32", "bf16")

#: name -> model class; filled by :func:`register_model`.
MODELS: dict[str, type[CTRModel]] = {}


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator: make a ``CTRModel`` subclass buildable as ``build_model(name, ...)``."""

    def deco(cls):
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        cls.model_name = name
        MODELS[name] = cls
        return cls

    return deco


def fused_optimizer(name: str | None, lr: float = 0.05):
    """``"rowwise_adagrad"`` | ``"sgd"`` | ``"none"``/None -> the fused optimizer object (or None:
    then the table is a Parameter with sparse gradients for a torch optimizer)."""
    if name in (None, "none"):
        return None
    if name == "rowwise_adagrad":
        return FusedRowwiseAdagrad(lr=lr)
    if name == "sgd":
        return FusedSGD(lr=lr)
    raise ValueError(f"embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS}, got {name!r}")


#: ``dynamic_tables=`` keys (``DynamicEmbedding``'s options) and the defaults of those not given
DYNAMIC_OPTIONS = ("capacity", "min_count", "admit_prob", "ttl", "eviction", "evict_fraction",
                   "sketch_width", "seed")
DYNAMIC_DEFAULTS = {"capacity": 1 << 16, "eviction": "grow"}


def dynamic_options(options: dict | None) -> dict:
    """``dynamic_tables=`` of a model -> the DynamicEmbedding options (defaults filled in);
    an unknown key is named."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(DYNAMIC_OPTIONS))
    if unknown:
        raise ValueError(f"dynamic_tables: unknown options {unknown}; expected some of "
                         f"{DYNAMIC_OPTIONS}")
    return {**DYNAMIC_DEFAULTS, **options}


#: ``dense_init=`` values: how Linear/cross weights start (biases at zero for "xavier")
DENSE_INITS = ("xavier", "torch")


def check_dropout(dropout: float, name: str = "dropout") -> float:
    dropout = float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {dropout}")
    return dropout


def mlp(in_features: int, hidden: Sequence[int], dropout: float = 0.0,
        batch_norm: bool = False, layer_norm: bool = False) -> tuple[nn.Sequential, int]:
    """Linear -> [BatchNorm | LayerNorm] -> ReLU -> [Dropout] per hidden width. Returns
    (module, out width). Dropout is active in train mode only (``model.eval()`` and the Scorer
    run without it); batch norm uses its running statistics in eval mode."""
    dropout = check_dropout(dropout)
    if batch_norm and layer_norm:
        raise ValueError("choose batch_norm or layer_norm, not both")
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        if int(h) < 1:
            raise ValueError(f"hidden widths must be >= 1, got {list(hidden)}")
        # Batch norm subtracts the batch mean, so a bias in front of it has no gradient in exact
        # arithmetic; Adam would scale its rounding noise into lr-sized random steps that the
        # running mean follows with a lag, moving eval-mode outputs with the summation order.
        layers.append(nn.Linear(width, int(h), bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(h)))
        elif layer_norm:
            layers.append(nn.LayerNorm(int(h)))
        layers.append(nn.ReLU(inplace=True))  # the Linear output is not saved: no copy needed
        if dropout > 0:
            layers.append(Dropout(dropout))
        width = int(h)
    return nn.Sequential(*layers), width


def run_mlp(seq: nn.Sequential, x: Tensor) -> Tensor:
    """``seq(x)`` for an ``mlp`` stack: each Linear, with the ReLU that follows it fused in, runs
    through ``functional.linear`` (which chooses how the product runs); other modules
    (BatchNorm, LayerNorm, Dropout) run as they are, except a dropout right after the ReLU
    that offers ``after_linear_relu`` (``adrec_fast.nn.Dropout``, ``GlobalBatchDropout``),
    which runs fused with the layer. ``x`` may be wider than the first layer by zero columns
    (``functional.gemm_width``): that layer's weight is then zero-padded to match, which leaves
    its output unchanged."""
    mods = list(seq)
    h, i = x, 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Linear):
            relu = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)
            # a LoRA layer passes its adapted weight W + s*B@A: the same op, gradients to A, B
            w = m.merged_weight() if isinstance(m, LoRALinear) else m.weight  # [H, K]
            if h.size(1) > w.size(1):  # zero columns appended to x: zero weights to match
                w = TF.pad(w, (0, h.size(1) - w.size(1)))
            drop = mods[i + 2] if relu and i + 2 < len(mods) else None
            if drop is not None and hasattr(drop, "after_linear_relu"):
                h = drop.after_linear_relu(h, w, m.bias)  # [B, H]
                i += 3
                continue
            h = F.linear(h, w, m.bias, "relu" if relu else "none")  # [B, H]
            i += 2 if relu else 1
        else:
            h = m(h)
            i += 1
    return h


class SparseLookup(nn.Module):
    """All sparse fields of a schema through ONE ``EmbeddingBagCollection`` (one table per
    vocabulary, shared tables once).

    ``forward(batch) -> (emb [B, T, D], keys)``: ``emb`` holds the pooled vector of each of the
    T bags of ``batch`` (``Schema.sparse_fields()`` order); ``keys`` maps each requested sequence
    field to its element embeddings [L_total, D] (``batch.seq_indices[name]`` looked up one by
    one in the field's table).

    Two paths, chosen once at construction:
      * native: bag t reads table t and no sequence is needed -> one multi-table call with the
        batch's own TBE layout, output [B, T*D] viewed as [B, T, D] (no copy);
      * global: shared tables or sequences -> every id is made a global row id of the one weight
        buffer and looked up in a single call over a one-table view (bags first, then one bag of
        length 1 per sequence element). One call means one fused update, so a row that is both a
        target and a history element gets its summed gradient once, as in the native path.

    Dynamic tables (``vocab: dynamic`` fields: the batch holds 64-bit keys) all live in ONE
    ``DynamicEmbedding`` (``self.dyn``, options ``dynamic``; keys are salted per table, so the
    tables never share a key, and a shared table's fields share its keys), with the same fused
    optimizer object as ``self.ebc`` (the static tables; None when every table is dynamic).
    When every bag and history is dynamic, the keys go through one call as in the global path;
    otherwise each kind makes one call and the rows are put back in bag order. A training
    forward inserts new keys (admission, eviction: see DynamicEmbedding) at the stream time
    ``self.now`` (None: counted in training calls); eval mode and no-grad only read, and a key
    outside the table reads row 0, the unadmitted row.
    """

    def __init__(self, schema, embedding_dim: int, optimizer=None, pooling: str = "mean",
                 init_std: float | None = None, sequences: Sequence[str] = (),
                 l2: float = 0.0, l2_mode: str = "lazy", dynamic: dict | None = None):
        super().__init__()
        tables = schema.tables()
        if not tables:
            raise ValueError("the schema has no categorical field: nothing to embed")
        is_dyn = [schema.is_dynamic(name) for name, _ in tables]
        static = [t for t in range(len(tables)) if not is_dyn[t]]
        if any(is_dyn):
            if optimizer is None:
                raise ValueError("dynamic tables need a fused embedding optimizer: "
                                 "embedding_optimizer 'rowwise_adagrad' or 'sgd', not 'none'")
            if l2 > 0:
                raise ValueError(f"embedding_l2 is for static tables; the schema has dynamic "
                                 f"tables: set embedding_l2=0 (got {l2})")
        self.ebc = (EmbeddingBagCollection([tables[t][1] for t in static], embedding_dim,
                                           pooling=pooling, optimizer=optimizer,
                                           init_std=init_std, l2=l2, l2_mode=l2_mode)
                    if static else None)
        self.dyn = (DynamicEmbedding(int(embedding_dim), pooling=pooling, optimizer=optimizer,
                                     init_std=init_std, **dynamic_options(dynamic))
                    if any(is_dyn) else None)
        self.now: int | None = None  # stream time of the next training forward (dynamic)
        self.dim = int(embedding_dim)
        bag_tables = [t for _, t in schema.sparse_fields()]
        self.num_bags = len(bag_tables)
        self.sequences = list(sequences)
        seq_table = dict(schema.sequence_fields())
        for s in self.sequences:
            if s not in seq_table:
                raise ValueError(f"{s!r} is not a sequence field of the schema")
        self.native = (not any(is_dyn) and bag_tables == list(range(len(tables)))
                       and not self.sequences)
        # [n_static + 1] first row of each static table in the ebc's buffer
        tofs = self.ebc.table_offsets if self.ebc is not None else torch.zeros(1, dtype=torch.long)
        at = {t: k for k, t in enumerate(static)}
        self.register_buffer("bag_base", torch.tensor(
            [int(tofs[at[t]]) if t in at else 0 for t in bag_tables], dtype=torch.long),
            persistent=False)
        self.seq_base = [int(tofs[at[seq_table[s]]]) if seq_table[s] in at else 0
                         for s in self.sequences]
        self.register_buffer("one_table", torch.tensor([0, int(tofs[-1])], dtype=torch.long),
                             persistent=False)
        self.bag_dynamic = [is_dyn[t] for t in bag_tables]
        self.seq_dynamic = [is_dyn[seq_table[s]] for s in self.sequences]
        kinds = set(self.bag_dynamic + self.seq_dynamic)
        self.mixed = self.dyn is not None and len(kinds) == 2  # static and dynamic reads

    def follow(self, leader: SparseLookup) -> None:
        """This lookup's dynamic table shares the map of ``leader``'s (the embedding lookup
        that a model's forward calls first on the same batch, with this lookup's bags and
        maybe more), so a training call takes its rows from the leader's call instead of
        probing the map again; answers are unchanged (``DynamicEmbedding.follow`` says when
        it applies)."""
        if self.dyn is not None and leader.dyn is not None:
            self.dyn.follow(leader.dyn)

    def _global(self, indices: Tensor, offsets: Tensor) -> Tensor:
        """One call on the whole buffer seen as a single table: indices are global row ids."""
        return self.ebc.lookup(self.one_table, indices, offsets)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        B = batch.batch_size
        T, D = self.num_bags, self.dim
        if self.native:
            return self.ebc(batch.indices, batch.offsets).view(B, T, D), {}
        indices, offsets = batch.indices, batch.offsets  # [nnz], [T*B+1]
        nnz = indices.numel()
        if one_id_per_bag(indices, offsets) and (self.dyn is None or not self.mixed):
            # one id per bag: the bags' ids in row-major order make the pooled rows [B, T, D]
            # contiguous, as the native path does, so nothing downstream copies a transposed
            # view (forward and backward); the history elements follow, one per bag
            ids = indices.view(T, B)
            if self.dyn is None:  # global row ids of the one weight buffer
                ids = ids + self.bag_base[:, None]
                seqs = [batch.seq_indices[s] + base
                        for s, base in zip(self.sequences, self.seq_base)]  # [L_s] each
            else:
                seqs = [batch.seq_indices[s] for s in self.sequences]  # [L_s] each
            ids = ids.t().reshape(-1)  # [B*T]
            ids = torch.cat([ids, *seqs]) if seqs else ids
            out = (self._global(ids, _iota(ids.numel() + 1)) if self.dyn is None
                   else self.dyn.forward(ids, None, now=self.now))  # [B*T + L, D]
            return out[: B * T].view(B, T, D), self._seq_rows(out, B * T, seqs)
        if self.dyn is not None:
            out, sizes = self._with_dynamic(batch)  # [T*B + L, D]
        else:
            # B ids per table (e.g. one id per bag): no ragged bookkeeping. A total of T*B ids
            # alone is not enough: ragged bags can sum to it with other table boundaries.
            if nnz == T * B and torch.equal(offsets[::B], torch.arange(0, nnz + 1, B,
                                                                       device=offsets.device)):
                gidx = (indices.view(T, B) + self.bag_base[:, None]).view(-1)
            else:
                lengths = offsets[1:] - offsets[:-1]  # [T*B]
                gidx = indices + torch.repeat_interleave(self.bag_base.repeat_interleave(B),
                                                         lengths, output_size=nnz)
            parts, sizes = [gidx], []
            for s, base in zip(self.sequences, self.seq_base):
                seq = batch.seq_indices[s]  # [L_s]
                parts.append(seq + base)
                sizes.append(seq.numel())
            all_idx, all_ofs = _one_per_bag(gidx, offsets, parts[1:])
            out = self._global(all_idx, all_ofs)  # [T*B + L, D]
        emb = out[: T * B].view(T, B, D).transpose(0, 1)  # [B, T, D]
        return emb, self._seq_rows(out, T * B, sizes)

    def _seq_rows(self, out: Tensor, start: int, seqs) -> dict[str, Tensor]:
        """{sequence field: its elements' rows [L_s, D]}: the rows of ``out`` after ``start``,
        in sequence order (``seqs``: each field's ids or its length)."""
        keys = {}
        for s, q in zip(self.sequences, seqs):
            n = q if isinstance(q, int) else q.numel()
            keys[s] = out[start: start + n]  # [L_s, D]
            start += n
        return keys

    def _with_dynamic(self, batch: Batch) -> tuple[Tensor, list[int]]:
        """(rows [T*B + L, D]: the T*B pooled bags, then every history element in sequence
        order; [L_s]) when some table is dynamic."""
        B, T = batch.batch_size, self.num_bags
        indices, offsets = batch.indices, batch.offsets
        seqs = [batch.seq_indices[s] for s in self.sequences]  # [L_s] each
        sizes = [s.numel() for s in seqs]
        if not self.mixed:  # every read is dynamic: the keys as they are, one call
            keys, ofs = _one_per_bag(indices, offsets, seqs)
            return self.dyn.forward(keys, ofs, now=self.now), sizes  # no hooks: no __call__
        # both kinds: one call each (static tables: global row ids), then the rows in bag order
        bags = torch.arange(T * B, device=offsets.device).view(T, B)
        idx = {False: [], True: []}  # dynamic? -> positions of its bags among the T
        for p, d in enumerate(self.bag_dynamic):
            idx[d].append(p)
        calls = {}
        for d in (False, True):
            pos = torch.tensor(idx[d], dtype=torch.long)
            ids, ofs = bag_take(indices, offsets, bags[pos].reshape(-1))
            if not d and ids.numel():
                ids = ids + torch.repeat_interleave(self.bag_base[pos].repeat_interleave(B),
                                                    ofs.diff(), output_size=ids.numel())
            extra = [s if sd else s + base for s, sd, base
                     in zip(seqs, self.seq_dynamic, self.seq_base) if sd == d]
            ids, ofs = _one_per_bag(ids, ofs, extra)
            calls[d] = (self.dyn.forward(ids, ofs, now=self.now) if d
                        else self._global(ids, ofs))
        n_static = calls[False].shape[0]
        rank = {p: k for d in (False, True) for k, p in enumerate(idx[d])}
        order = [torch.arange(B) + (n_static if d else 0) + rank[p] * B
                 for p, d in enumerate(self.bag_dynamic)]
        at = {False: len(idx[False]) * B, True: n_static + len(idx[True]) * B}
        for n, d in zip(sizes, self.seq_dynamic):
            order.append(torch.arange(at[d], at[d] + n))
            at[d] += n
        return torch.cat([calls[False], calls[True]])[torch.cat(order)], sizes


_IOTA = [torch.arange(1)]  # a cached 0, 1, 2, ... (grown on demand, never written)


def _iota(n: int) -> Tensor:
    """arange(n) [n] int64: a prefix of a cached tensor."""
    if _IOTA[0].numel() < n:
        _IOTA[0] = torch.arange(max(n, 2 * _IOTA[0].numel()))
    return _IOTA[0][:n]


def one_id_per_bag(indices: Tensor, offsets: Tensor) -> bool:
    """Whether every bag of a CSR pair (``indices [nnz]``, ``offsets [bags + 1]``, on the CPU)
    holds exactly one id, i.e. offsets == arange: then ``SparseLookup`` lays the ids out row
    by row (a check of the table boundaries alone would miss ragged bags that sum to B ids
    per table). Whoever mirrors its layout asks this."""
    if indices.numel() + 1 != offsets.numel() or offsets.device.type != "cpu":
        return False
    memo = not offsets.is_inference()  # an inference tensor has no version counter
    last, version = _ONE_PER_BAG
    if memo and offsets is last and offsets._version == version:
        return True  # the stream's steps of one chunk share their offsets tensor
    if not (offsets.numpy() == _iota(offsets.numel()).numpy()).all():  # numpy: half torch's
        return False
    if memo:
        _ONE_PER_BAG[:] = [offsets, offsets._version]
    return True


_ONE_PER_BAG: list = [None, -1]  # the offsets tensor last found one id per bag, its version


def _one_per_bag(indices: Tensor, offsets: Tensor, extra: Sequence[Tensor]):
    """(indices, offsets) with every element of the ``extra`` id tensors appended as a bag of
    its own (history elements looked up one by one in the same call)."""
    L = sum(e.numel() for e in extra)
    if not L:
        return indices, offsets
    n = indices.numel()
    return (torch.cat([indices, *extra]),
            torch.cat([offsets, torch.arange(n + 1, n + L + 1, dtype=offsets.dtype,
                                             device=offsets.device)]))


class CTRModel(nn.Module):
    """Base class: ``forward(batch) -> logits [B]``; ``loss`` is the fused sigmoid-BCE;
    ``predict(batch) -> probabilities [B]`` (eval mode, no grad).

    Every model embeds all sparse fields through one ``SparseLookup`` (``self.lookup``, with its
    ``EmbeddingBagCollection`` at ``self.lookup.ebc``) with the fused optimizer by default, and
    first-order models add a width-1 ``self.linear`` lookup. ``config`` holds the JSON-able
    arguments that rebuild the model with :func:`adrec_fast.models.build_model`.
    """

    model_name = "base"
    #: models whose forward honours ``precision="bf16"`` (the others accept "fp32" only)
    supports_bf16 = False
    #: models that attend over behaviour sequences: a schema inferred for them reads history
    #: columns as sequences (``Schema.infer_from_table(histories=True)``)
    reads_histories = False

    def __init__(self, schema, embedding_dim: int = 16,
                 embedding_optimizer: str | None = "rowwise_adagrad", pooling: str = "mean",
                 init_std: float | None = None, precision: str = "fp32",
                 embedding_l2: float = 0.0, embedding_l2_mode: str = "lazy",
                 dense_init: str = "torch", dynamic_tables: dict | None = None, **config):
        super().__init__()
        embedding_l2 = check_l2(embedding_l2, embedding_l2_mode,
                                embedding_optimizer not in (None, "none"), "embedding_l2")
        if dense_init not in DENSE_INITS:
            raise ValueError(f"dense_init must be one of {DENSE_INITS}, got {dense_init!r}")
        if init_std is not None and not (float(init_std) >= 0 and math.isfinite(init_std)):
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std}")
        if not schema.fitted:
            raise ValueError("the schema is not fitted (vocabularies/statistics missing); "
                             "call schema.fit(data) first")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision != "fp32" and not self.supports_bf16:
            raise ValueError(f"model {self.model_name!r} supports precision='fp32' only "
                             "(bf16: dcnv2, dlrm)")
        self.precision = precision
        self.schema = schema
        # the largest batch whose training blocks glibc keeps in the heap (``step_block_bytes``)
        self._heap_batch = 0
        self.register_forward_pre_hook(_keep_step_blocks_in_heap)
        self.embedding_dim = int(embedding_dim)
        self.n_dense = schema.n_dense
        self.n_vector = schema.vector_dim
        self.dense_in = self.n_dense + self.n_vector
        self.num_bags = len(schema.sparse_fields())
        # text fields join the bags as fields of the interactions (``with_text``)
        self.num_text = len(schema.text_fields())
        self.num_fields = self.num_bags + self.num_text
        self.text: TextFields | None = None
        self._emb_opt = embedding_optimizer
        self._pooling = pooling
        self._init_std = init_std
        self._l2 = (embedding_l2, embedding_l2_mode)
        self.dense_init = dense_init
        self.config = {"name": self.model_name, "embedding_dim": self.embedding_dim,
                       "embedding_optimizer": embedding_optimizer, "pooling": pooling,
                       "init_std": init_std, **config}
        if embedding_l2 > 0:  # configs of unregularised models stay as before
            self.config.update(embedding_l2=embedding_l2, embedding_l2_mode=embedding_l2_mode)
        if dense_init != "torch":
            self.config["dense_init"] = dense_init
        if precision != "fp32":  # fp32 checkpoints keep their config as before
            self.config["precision"] = precision
        # the options of the dynamic tables (vocab "dynamic" fields), in the config so that a
        # checkpoint rebuilds the same tables; a model without such fields takes none
        if dynamic_tables is not None and not schema.has_dynamic:
            raise ValueError("dynamic_tables given, but the schema declares no vocab 'dynamic' "
                             "field")
        self._dynamic = dynamic_options(dynamic_tables) if schema.has_dynamic else None
        if self._dynamic is not None:
            self.config["dynamic_tables"] = dict(self._dynamic)

    # -- building blocks ------------------------------------------------------------------
    def _make_lookup(self, dim: int | None = None, sequences: Sequence[str] = (),
                     init_std: float | None = None) -> SparseLookup:
        return SparseLookup(self.schema, dim or self.embedding_dim,
                            fused_optimizer(self._emb_opt), self._pooling,
                            init_std if init_std is not None else self._init_std, sequences,
                            *self._l2, dynamic=self._dynamic)

    def _make_linear(self, follow: SparseLookup | None = None) -> SparseLookup:
        """Width-1 first-order weights of every sparse bag, initialised to zero (the same L2 as
        the embeddings). ``follow``: the embedding lookup that the forward calls first on the
        same batch; dynamic tables then take their rows from its call (one map probe per key;
        see ``SparseLookup.follow``)."""
        lin = SparseLookup(self.schema, 1, fused_optimizer(self._emb_opt), self._pooling, 0.0,
                           (), *self._l2, dynamic=self._dynamic)
        if follow is not None:
            lin.follow(follow)
        return lin

    def _make_text(self, first_order: bool, fields: bool = True) -> TextFields | None:
        """The text fields' projections (None without text fields): to the embedding width when
        ``fields`` (they join the bags), plus a first-order weight when ``first_order``."""
        if not self.num_text:
            return None
        return TextFields(self.schema, self.embedding_dim if fields else 0, first_order)

    def with_text(self, emb: Tensor, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """emb [B, T, D] -> ([B, T + X, D] with the X text fields after the bags, their
        first-order term [B] or None)."""
        if self.text is None:
            return emb, None
        t, lin = self.text(batch)  # [B, X, D] (None without projections), [B]
        return (emb if t is None else torch.cat([emb, t.to(emb.dtype)], dim=1)), lin

    def spec_rows(self, table: Tensor, lin: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The serving spec's (table [R, D], lin [R]) with each text field's rows appended, one
        more table per text field (``TextFields.serving_rows``); a model whose text has no
        projection (LR) serves the first-order rows as its table."""
        if self.text is None:
            return table, lin
        rows = self.text.serving_rows()
        if self.text.proj is None:
            parts = [t for *_, t in rows]  # [V + 1] each
            t = torch.cat([table.view(-1), *parts])
            return t.view(-1, 1), (None if lin is None else torch.cat([lin, *parts]))
        table = torch.cat([table, *[e for _, e, _ in rows]])
        return table, (None if lin is None else torch.cat([lin, *[t for *_, t in rows]]))

    def init_dense(self) -> None:
        """Re-draw the dense weights per ``dense_init``; every model calls it at the end of its
        constructor. "xavier": Xavier-normal Linear and cross-layer weights, zero biases;
        "torch": torch's default initialisation (kept as drawn)."""
        if self.dense_init != "xavier":
            return
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_normal_(m.weight)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, CrossNet):
                    for w in m.weights:
                        nn.init.xavier_normal_(w)
                    for b in m.biases:
                        b.zero_()
                elif isinstance(m, SigmoidBCEHead):
                    nn.init.xavier_normal_(m.weight.view(1, -1))
                    m.bias.zero_()

    def tower_precision(self, device: torch.device):
        """Context for the dense tower: ``precision="bf16"`` runs it under
        ``torch.autocast(device, bfloat16)`` (matrix products in bf16 with fp32 accumulation;
        the parameters, their gradients and the optimizer stay fp32, the embeddings and their
        fused update too); ``"fp32"`` is a no-op."""
        return torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def tower_dtype(self, x: Tensor) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else x.dtype

    def dense_input(self, batch: Batch) -> Tensor:
        """[B, n_dense + vector_dim]: dense features then precomputed vectors."""
        if self.n_vector:
            return torch.cat([batch.dense, batch.vectors], dim=1)
        return batch.dense

    def fused_lookups(self) -> list[SparseLookup]:
        return [m for m in self.modules() if isinstance(m, SparseLookup)]

    def embedding_collections(self) -> list[EmbeddingBagCollection | DynamicEmbedding]:
        """Every embedding table module of the model: the EmbeddingBagCollections, then the
        DynamicEmbeddings (each has ``optimizer`` and ``weight``; the trainer sets the lr)."""
        lookups = self.fused_lookups()
        return ([m.ebc for m in lookups if m.ebc is not None]
                + [m.dyn for m in lookups if m.dyn is not None])

    def dynamic_embeddings(self) -> list[DynamicEmbedding]:
        """The model's DynamicEmbeddings (one per lookup with dynamic tables)."""
        return [m.dyn for m in self.fused_lookups() if m.dyn is not None]

    def set_stream_time(self, now: int | None) -> None:
        """The stream time of the next training forwards, for the dynamic tables' TTL (None:
        they count training calls)."""
        for m in self.fused_lookups():
            m.now = None if now is None else int(now)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Embedding tables without a fused optimizer (sparse gradients; SparseAdam/Adagrad)."""
        # a collection with a fused optimizer has no such table (and a sharded one none here)
        return [c.weight for c in self.embedding_collections()
                if c.optimizer is None and isinstance(c.weight, nn.Parameter)]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Parameters for a dense torch optimizer: all but the embedding tables."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in sparse]

    def step_block_bytes(self, batch_size: int) -> int:
        """Bytes of the largest [batch, columns] float32 block a training step of
        ``batch_size`` rows allocates: its widest dense layer side, or its fields' embeddings
        side by side with the dense inputs (the interaction's input)."""
        widths = [max(p.shape) for p in self.dense_parameters() if p.dim() == 2]
        widths.append(self.num_fields * self.embedding_dim + self.dense_in)
        return int(batch_size) * max(widths) * 4

    # -- API ------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def loss(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        """Mean BCE with logits through the fused op (gradient from the same pass)."""
        return F.sigmoid_bce(logits, labels, weight)

    @torch.no_grad()
    def shift_logit(self, delta: float) -> None:
        """Add ``delta`` to every logit, folded into the head's bias (so a checkpoint and the
        Scorer carry it like any other weight)."""
        h = self.head
        (h.head.bias if h.in_features > 0 else h.bias).add_(float(delta))

    def serving_spec(self):
        """The model as the serving executor runs it (``models.serving_spec.ServingSpec``), or
        None: then the Scorer serves it by its own forward (and says so when it loads)."""
        return None

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        """[B] click probabilities; switches to eval mode (and back)."""
        was = self.training
        self.eval()
        try:
            return torch.sigmoid(self.forward(batch))
        finally:
            self.train(was)


def _keep_step_blocks_in_heap(model: CTRModel, args) -> None:
    """Before a training forward (train mode, grad on) of a batch larger than any before:
    glibc keeps the step's blocks in its heap (``data.allocator.map_large_blocks``), so they
    are not mapped and faulted in anew at every step, whoever runs the loop. With glibc's
    default thresholds a DCN-v2 step of 4096 rows faulted in ~2,900 pages (12 MB) per step,
    ~10% of its time (bench/RESULTS_models.md). Eval and serving calls leave the setting."""
    if model.training and torch.is_grad_enabled() and args and isinstance(args[0], Batch):
        rows = args[0].batch_size
        if rows > model._heap_batch:
            map_large_blocks(model.step_block_bytes(rows))
            model._heap_batch = rows


class Head(nn.Module):
    """Final linear layer ``x [B, K] -> [B]`` (the fused score/BCE head); K = 0 is a bias."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = int(in_features)
        if in_features > 0:
            self.head = SigmoidBCEHead(in_features)
        else:
            self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        if self.in_features > 0:
            return self.head(x)
        return self.bias.expand(x.shape[0])
