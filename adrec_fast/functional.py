# SPDX-License-Identifier: Apache-2.0
"""Public functions. Thin: each forwards to the op layer, which picks the backend."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .ops import attention_pooling as _attn
from .ops import cross_layer as _cross
from .ops import dot_interaction as _dot
from .ops import dropout as _drop
from .ops import embedding_bag as _eb
from .ops import fm_interaction as _fm
from .ops import linear as _linear
from .ops import sigmoid_bce as _bce
from .optim import FusedRowwiseAdagrad, FusedSGD


def embedding_bag(
    weights: Tensor,
    table_offsets: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
    pooling: str = "sum",
    *,
    optimizer: FusedSGD | FusedRowwiseAdagrad | None = None,
    state: Tensor | None = None,
    lr: float | None = None,
) -> Tensor:
    """Pooled lookup in T tables that share one buffer (FBGEMM TBE layout).

    Args:
        weights: [N_total, D] float; table t owns rows ``table_offsets[t]:table_offsets[t+1]``.
        table_offsets: [T+1] int row starts, ``table_offsets[0] == 0``, last == N_total.
        indices: [nnz] int32/int64 row ids *within* their table.
        offsets: [T*B+1] int32/int64, table-major: bag (t, b) is
            ``indices[offsets[t*B+b]:offsets[t*B+b+1]]``; ``offsets[-1] == nnz``.
        per_sample_weights: [nnz] optional weight of every index.
        pooling: ``"sum"`` or ``"mean"``; an empty bag gives zeros.
        optimizer: ``FusedSGD`` or ``FusedRowwiseAdagrad`` to fuse the update into the
            backward: it updates the touched rows of ``weights`` (and ``state``) in place, and
            ``weights`` gets no ``.grad``. None: a plain lookup.
        state: [N_total] float32 row-wise Adagrad state, updated in place (zeros to start);
            SGD needs none.
        lr: this step's learning rate, when it is not ``optimizer.lr`` (a schedule, or the
            rescaled rate of a lazily decayed table).

    Returns:
        [B, T*D]: table t's pooled vector in columns ``t*D:(t+1)*D``.

    Without ``optimizer`` the backward returns a sparse gradient holding the touched rows
    only; with it, each touched row's summed gradient goes to the optimizer. Forward, backward
    and the fused update are deterministic on the CPU (duplicate ids are summed in order of
    occurrence).

    Raises:
        IndexError: an id outside its table (names table, position, value).
        ValueError: malformed offsets or table_offsets, a shape mismatch, or ``state``/``lr``
            without an optimizer.
        TypeError: a wrong dtype or optimizer.
    """
    if optimizer is None:
        if state is not None or lr is not None:
            raise ValueError("embedding_bag: state and lr belong to a fused optimizer; "
                             "pass optimizer=FusedSGD(...) or FusedRowwiseAdagrad(...)")
        return _eb.embedding_bag(
            weights, table_offsets, indices, offsets, per_sample_weights, pooling
        )
    if not isinstance(optimizer, (FusedSGD, FusedRowwiseAdagrad)):
        raise TypeError("embedding_bag: optimizer must be adrec_fast.optim.FusedSGD, "
                        f"FusedRowwiseAdagrad or None, got {type(optimizer).__name__}")
    if state is None:
        if isinstance(optimizer, FusedRowwiseAdagrad):
            raise ValueError("embedding_bag: FusedRowwiseAdagrad needs state, a [N_total] "
                             "float32 tensor (zeros to start)")
        state = torch.empty(0, dtype=torch.float32, device=weights.device)
    return _eb.embedding_bag_fused_update(
        weights, state, table_offsets, indices, offsets, per_sample_weights, pooling,
        optimizer.name, optimizer.lr if lr is None else lr, optimizer.eps,
    )


def embedding_rows(table_offsets: Tensor, indices: Tensor, offsets: Tensor) -> Tensor:
    """[nnz] int64: the row of the shared weight buffer that each index of an
    ``embedding_bag`` call reads (its table's first row + the id)."""
    return _eb.global_rows(table_offsets, indices, offsets)


def check_pooling(pooling: str) -> str:
    """``pooling`` if ``embedding_bag`` accepts it (``"sum"`` or ``"mean"``), else ValueError."""
    _eb.pooling_code(pooling)
    return pooling


def fm_interaction(emb: Tensor) -> Tensor:
    """FM second-order term. emb [B, F, D] -> [B, 1]: 0.5 * sum_d((sum_f e)^2 - sum_f e^2).
    Deterministic."""
    return _fm.fm_interaction(emb)


def dot_interaction(emb: Tensor, self_interaction: bool = False) -> Tensor:
    """DLRM dot interaction. emb [B, F, D] -> [B, P]: e_i . e_j for i < j (i <= j with
    ``self_interaction``), in row-major order of (i, j). Deterministic."""
    return _dot.dot_interaction(emb, self_interaction)


def cross_layer(x0: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """DCN-v2 cross layer. x0 [B, K], x [B, K], weight [K, K], bias [K] -> [B, K]:
    ``x0 * (x @ weight.T + bias) + x``, the elementwise part fused onto the product."""
    return _cross.cross_layer(x0, x, weight, bias)


def cross_net(x0: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """DCN-v2 cross network: ``x = cross_layer(x0, x, w_l, b_l)`` for each layer from x = x0.
    x0 [B, K], weights [K, K] each, biases [K] each -> [B, K]. The same values and gradients as
    the loop of ``cross_layer``; its backward runs as one pass over the net (the layers' x
    gradients formed in place, x0's summed as they come) instead of one per layer."""
    return _cross.cross_net(x0, list(weights), list(biases))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
           activation: str = "none") -> Tensor:
    """Dense layer. x [M, K], weight [N, K], bias [N] or None -> [M, N]:
    ``act(x @ weight.T + bias)`` with ``activation`` ``"none"`` or ``"relu"`` (fused into the
    product). Every dense product of the models and the cross layer follows this op's choice
    of engine (a small-batch kernel below 32 rows, a matrix-vector product for one output,
    oneDNN otherwise, ATen where oneDNN cannot; ``ADREC_DENSE=aten`` forces ATen); the
    Scorer's pre-blocked layers run the same file's blocked kernels. Under ``torch.autocast`` the operands are cast to the
    autocast dtype, as for ``torch.nn.functional.linear``. Deterministic for a fixed thread
    count."""
    return _linear.linear(x, weight, bias, activation)


def gemm_width(k: int, dtype: torch.dtype, rows: int) -> int:
    """The width at which a model stores activations of ``k`` columns that feed dense products
    of ``rows`` rows in ``dtype``: ``k`` rounded up to the width the float32 products run
    fastest at on the CPU (a multiple of 16: [4096, 432] x [432, 432] products take 10-15% less
    time than at 429), or ``k`` itself where padding does not pay (other dtypes, fewer rows than
    the small-batch kernel's limit). The extra columns hold zeros; layers given such input pad
    their weights with zeros to match (``CrossNet``, ``models.base.run_mlp``)."""
    return _linear.gemm_width(k, dtype, rows)


def attention_pooling(query: Tensor, keys: Tensor, offsets: Tensor) -> Tensor:
    """Target attention. query [B, D], keys [L_total, D], offsets [B+1] -> [B, D]:
    per sample, ``softmax(q_b . k / sqrt(D))`` over its keys ``keys[offsets[b]:offsets[b+1]]``,
    then the weighted sum of those keys. An empty sequence gives zeros."""
    return _attn.attention_pooling(query, keys, offsets)


def sigmoid_bce(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean binary cross-entropy with logits. logits [B], labels [B], weight [B]? -> scalar.
    The gradient ``(sigmoid(z) - y) * w / B`` is computed in the same pass."""
    return _bce.sigmoid_bce(logits, labels, weight)


def dropout(x: Tensor, p: float, training: bool = True, *, seed: int | None = None,
            offset: int = 0) -> Tensor:
    """Dropout: in training, each element of x is zeroed with probability p and the others are
    scaled by 1 / (1 - p); the identity otherwise (and for p = 0). The mask is a hash of
    (``seed``, ``offset`` + the element's row-major index), drawn from no generator state and
    stored nowhere: the backward recomputes it. ``seed`` None draws one from torch's default
    generator (one draw per call, so ``torch.manual_seed`` fixes the masks); ``offset`` places
    x inside a larger tensor's mask (a rank's rows of a global batch)."""
    _check_p(p)
    if not training or p == 0.0:
        return x
    if seed is None:
        seed = _draw_seed()
    return _drop.dropout(x, float(p), int(seed), int(offset))


def linear_relu_dropout(x: Tensor, weight: Tensor, bias: Tensor | None, p: float,
                        training: bool = True, *, seed: int | None = None,
                        offset: int = 0) -> Tensor:
    """``dropout(linear(x, weight, bias, "relu"), p, training, seed=seed, offset=offset)``, the
    same values and mask (one seed drawn the same way), with a cheaper backward: the ReLU's and
    the dropout's masks are read together from the output, and the dropout's scale is folded
    into the products, so no pass of the dropout's own runs over the gradient."""
    _check_p(p)
    if not training or p == 0.0:
        return linear(x, weight, bias, "relu")
    if p == 1.0:  # no scale to fold: everything is dropped
        return dropout(linear(x, weight, bias, "relu"), p, training, seed=seed, offset=offset)
    if seed is None:
        seed = _draw_seed()
    return _linear.linear_relu_dropout(x, weight, bias, float(p), int(seed), int(offset))


def _check_p(p: float) -> None:
    """The one validation of a dropout rate."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")


def _draw_seed() -> int:
    """A dropout call's seed: one draw from torch's default generator."""
    return int(torch.randint(0, 2**62, (1,)).item())


def score(x: Tensor, w: Tensor, b: Tensor | float) -> Tensor:
    """Inference head: x [B, K], w [K], b scalar -> [B] probabilities ``sigmoid(x @ w + b)``."""
    return _bce.score(x, w, b)


__all__ = [
    "attention_pooling",
    "check_pooling",
    "cross_layer",
    "cross_net",
    "dot_interaction",
    "dropout",
    "embedding_bag",
    "embedding_rows",
    "fm_interaction",
    "gemm_width",
    "linear",
    "linear_relu_dropout",
    "score",
    "sigmoid_bce",
]
