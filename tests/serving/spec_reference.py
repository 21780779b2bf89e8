# SPDX-License-Identifier: Apache-2.0
"""Plain-PyTorch reference of the serving executor: a ``ServingSpec`` applied to one request,
in float64, every candidate row built in full (no shared user side). ``bf16=True`` rounds every
layer's weights and inputs to bfloat16, as ``Scorer.load(..., mlp="bf16")`` does (float32
accumulation aside); the scalar terms (first order, dense linear, FM, the cross columns of the
head) stay exact, as in the executor."""
from __future__ import annotations

import math

import numpy as np
import torch


def serve(spec, bag_base, seq_base, user_ids, cand_slots, cand_ids, dense, seqs=(),
          bf16: bool = False) -> np.ndarray:
    """user_ids [T] (read at the user slots), cand_ids [N, Tc] of ``cand_slots``, dense
    [Nd, K_d] transformed values (Nd in {1, N}), seqs: one id array per history ->
    probabilities [N] float64."""
    dt = torch.float64

    def rb(x):
        return x.float().bfloat16().to(dt) if bf16 else x.to(dt)

    def layer(x, w, b, act):
        y = rb(x) @ rb(w).T + b.to(dt)
        return y.relu() if act == "relu" else y

    N = cand_ids.shape[0]
    T = len(bag_base)
    ids = torch.as_tensor(np.asarray(user_ids, np.int64)).repeat(N, 1)  # [N, T]
    if len(cand_slots):
        ids[:, list(cand_slots)] = torch.as_tensor(cand_ids)
    rows = ids + torch.as_tensor(np.asarray(bag_base, np.int64))  # [N, T]
    table = spec.table.to(dt)
    D = table.shape[1]
    emb = table[rows]  # [N, T, D]
    d = torch.as_tensor(np.asarray(dense, np.float32)).to(dt).expand(N, -1)  # [N, K_d]
    pooled = []
    for (_, t), base, s in zip(spec.sequences, seq_base, seqs):
        K = table[torch.as_tensor(np.asarray(s, np.int64)) + base]  # [L, D]
        if K.shape[0] == 0:
            pooled.append(torch.zeros(N, D, dtype=dt))
            continue
        p = torch.softmax(emb[:, t] @ K.T / math.sqrt(D), dim=1)  # [N, L]
        pooled.append(p @ K)
    fields = torch.cat([emb, torch.stack(pooled, 1)], 1) if pooled else emb  # [N, F, D]
    logit = torch.full((N,), float(spec.bias), dtype=dt)
    if spec.lin is not None:
        logit += spec.lin.to(dt)[rows].sum(1)
    if spec.dense_w is not None:
        logit += d @ spec.dense_w.to(dt)
    if spec.fm:
        s = fields.sum(1)
        logit += 0.5 * ((s * s).sum(1) - (fields * fields).sum((1, 2)))
    if spec.interaction == "dot":
        parts, fl = [], emb
        if spec.bottom:
            h = d
            for ly in spec.bottom:
                h = layer(h, ly.weight, ly.bias, ly.act)
            h = h[:, :D]
            parts, fl = [h], torch.cat([h[:, None], emb], 1)
        F = fl.shape[1]
        i, j = torch.triu_indices(F, F, offset=0 if spec.self_interaction else 1)
        x = torch.cat(parts + [(fl[:, i] * fl[:, j]).sum(-1)], 1)
        deep_in = x
    else:
        x0 = torch.cat([fields.reshape(N, -1), d], 1)
        deep_in = x0
        if spec.cross:
            x = x0
            for w, b in spec.cross:
                x = x0 * layer(x, w, b, "none") + x
            if spec.cross_head is not None:
                logit += x @ spec.cross_head.to(dt)
            if spec.structure == "stacked":
                deep_in = x
    h = deep_in
    for ly in spec.deep:
        h = layer(h, ly.weight, ly.bias, ly.act)
    if spec.head is not None:
        logit += rb(h) @ rb(spec.head)
    return torch.sigmoid(logit).numpy()
