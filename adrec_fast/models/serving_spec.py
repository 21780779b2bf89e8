# SPDX-License-Identifier: Apache-2.0
"""How a model describes itself to the serving executor (``adrec_fast.serving``).

Every zoo model computes, for one row with bag embeddings e_t (t < T, ``Schema.sparse_fields()``
order, one id per bag), optional pooled history fields p_s (target attention over a behaviour
sequence) and dense inputs x_d:

    logit = bias + first_order + dense_w . x_d + fm(fields) + cross_head . x_L + head . tower(x)

with each term present or not:

* ``first_order``: sum over bags of a width-1 table ``lin`` (the models' ``linear`` lookup);
* ``fm``: the FM pairwise term over every field (bags, then pooled histories);
* ``interaction="concat"``: the tower's input is x0 = [fields flattened, dense] (DeepFM, DIN,
  DCN-v2); ``"dot"``: DLRM's [bottom(dense), pairwise dots of the fields [bottom(dense), bags]];
* ``cross``: DCN-v2's cross layers on x0, x_{l+1} = x0 * (W_l x_l + b_l) + x_l; ``"parallel"``
  puts x_L beside the deep tower (its head columns are ``cross_head``), ``"stacked"`` feeds
  x_L to the deep tower;
* ``deep``: the MLP (batch norm folded into its layers), then ``head`` [H] (the head's bias is
  ``bias``).

A model returns its spec from ``serving_spec()``; one it cannot describe (a LayerNorm MLP, a
custom model) returns None and is served by its own forward. The spec holds references to the
model's tensors (detached, float32); the serving packer copies what it keeps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

INTERACTIONS = ("concat", "dot")
STRUCTURES = ("parallel", "stacked")


@dataclass
class Layer:
    """``act(x @ weight.T + bias)``: weight [O, K], bias [O] float32; act "relu" | "none"."""

    weight: Tensor
    bias: Tensor
    act: str = "relu"


@dataclass
class ServingSpec:
    """A model as the serving executor runs it (see the module doc)."""

    table: Tensor  # [R, D] float32: the embedding rows of every table (schema.table_offsets())
    interaction: str = "concat"
    lin: Tensor | None = None  # [R] float32 first-order weights, same rows as ``table``
    fm: bool = False
    #: (sequence field, target bag): the history is pooled by attention with the target's
    #: embedding as the query, softmax(K q / sqrt(D)) K, and joins the fields after the bags
    sequences: list[tuple[str, int]] = field(default_factory=list)
    dense_w: Tensor | None = None  # [K_d]
    bottom: list[Layer] = field(default_factory=list)  # "dot": dense -> D
    self_interaction: bool = False  # "dot": pairs (i, i) too
    cross: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # [K, K], [K]
    structure: str = "parallel"
    deep: list[Layer] = field(default_factory=list)
    head: Tensor | None = None  # [H] over the deep tower's output (or x0 / x_L without one)
    cross_head: Tensor | None = None  # [K] "parallel" cross: head columns of x_L
    bias: float = 0.0

    def __post_init__(self):
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {self.interaction!r}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        if self.table.dim() != 2:
            raise ValueError(f"table must be [R, D], got {list(self.table.shape)}")
        if self.lin is not None and self.lin.shape != (self.table.shape[0],):
            raise ValueError(f"lin must be [{self.table.shape[0]}], got {list(self.lin.shape)}")
        if self.interaction == "dot" and (self.cross or self.sequences or self.fm):
            raise ValueError("interaction 'dot' takes no cross layers, sequences or fm")

    @property
    def interactions(self) -> tuple[str, ...]:
        """The interaction terms, in words: a subset of (dot, cross, attention, fm)."""
        out = ["dot"] if self.interaction == "dot" else []
        out += ["cross"] * bool(self.cross) + ["attention"] * bool(self.sequences)
        return tuple(out + ["fm"] * self.fm)


def _f32(t: Tensor) -> Tensor:
    return t.detach().float().contiguous()


def mlp_layers(seq: nn.Module | None) -> list[Layer] | None:
    """An eval-mode ``Linear -> [BatchNorm1d] -> ReLU -> [Dropout]`` stack (``models.mlp``) ->
    its layers with batch norm folded in; None when it has another shape (LayerNorm, ...)."""
    out: list[Layer] = []
    pending = None  # [w, b] of a Linear not yet followed by its ReLU
    for m in seq if seq is not None else ():
        if isinstance(m, nn.Linear):
            if pending is not None:
                return None
            b = m.bias if m.bias is not None else torch.zeros(m.out_features)
            pending = [_f32(m.weight), _f32(b)]
        elif isinstance(m, nn.BatchNorm1d):
            if pending is None or not m.track_running_stats or m.running_mean is None:
                return None
            s = (_f32(m.weight) if m.affine else 1.0) / torch.sqrt(m.running_var.float() + m.eps)
            beta = _f32(m.bias) if m.affine else 0.0
            pending = [pending[0] * s[:, None], (pending[1] - m.running_mean.float()) * s + beta]
        elif isinstance(m, nn.ReLU):
            if pending is None:
                return None
            out.append(Layer(pending[0].contiguous(), pending[1].contiguous(), "relu"))
            pending = None
        elif not isinstance(m, nn.Dropout):
            return None
    return out if pending is None else None


def head_terms(head) -> tuple[Tensor | None, float]:
    """A ``models.base.Head`` -> (weight [K] or None, bias)."""
    if head.in_features > 0:
        return _f32(head.head.weight), float(head.head.bias.detach())
    return None, float(head.bias.detach())


__all__ = ["INTERACTIONS", "Layer", "STRUCTURES", "ServingSpec", "head_terms", "mlp_layers"]
