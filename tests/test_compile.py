# SPDX-License-Identifier: Apache-2.0
"""torch.compile(fullgraph=True) smoke test: a small CTR model built from the ops compiles
without graph breaks, and its loss and gradients match eager."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adrec_fast.nn import (
    CrossNet,
    DotInteraction,
    EmbeddingBagCollection,
    FMInteraction,
    SigmoidBCEHead,
)
from adrec_fast.optim import FusedSGD

from .conftest import assert_close_verbose

ROWS = [11, 7, 20, 5]  # T = 4 tables
D = 8
B = 6


class TinyCTR(nn.Module):
    """Embedding bags -> (cross net, dot interaction, FM) -> linear head -> mean BCE."""

    def __init__(self, optimizer=None):
        super().__init__()
        T = len(ROWS)
        self.ebc = EmbeddingBagCollection(ROWS, D, init_std=0.5, optimizer=optimizer)
        self.cross = CrossNet(T * D, num_layers=2)
        self.dot = DotInteraction()
        self.fm = FMInteraction()
        self.head = SigmoidBCEHead(T * D + T * (T - 1) // 2 + 1)

    def forward(self, indices, offsets, labels):
        pooled = self.ebc(indices, offsets)  # [B, T*D]
        emb = pooled.view(pooled.size(0), len(ROWS), D)  # [B, T, D]
        x = torch.cat([self.cross(pooled), self.dot(emb), self.fm(emb)], dim=1)  # [B, T*D+P+1]
        return self.head.loss(self.head(x), labels)


def _batch():
    T = len(ROWS)
    lengths = torch.randint(0, 4, (T * B,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    idx = [torch.randint(0, ROWS[t], (int(lengths[t * B : (t + 1) * B].sum()),)) for t in range(T)]
    return torch.cat(idx), offsets, torch.randint(0, 2, (B,)).float()


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = g.to_dense() if g is not None and g.is_sparse else g
    return out


# Deprecation warnings raised inside torch itself while compiling (inductor touches
# torch.jit.script_method; dynamo instantiates autograd.Function when tracing one).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
def test_compiled_model_matches_eager():
    """Fused SGD on the tables (the training path): the dense gradients and the updated table
    rows must match eager."""
    torch._dynamo.reset()
    model = TinyCTR(optimizer=FusedSGD(lr=0.5))
    twin = copy.deepcopy(model)
    batch = _batch()

    loss_eager = model(*batch)
    loss_eager.backward()

    compiled = torch.compile(twin, fullgraph=True)
    loss_compiled = compiled(*batch)
    loss_compiled.backward()

    assert_close_verbose(loss_compiled, loss_eager)
    eager_grads, compiled_grads = _grads(model), _grads(twin)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, g in eager_grads.items():
        assert g is not None, name
        assert_close_verbose(compiled_grads[name], g)
    assert not torch.equal(model.ebc.weight, TinyCTR(optimizer=FusedSGD(0.5)).ebc.weight)
    assert_close_verbose(twin.ebc.weight, model.ebc.weight)
