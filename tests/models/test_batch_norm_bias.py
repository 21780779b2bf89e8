# SPDX-License-Identifier: Apache-2.0
"""Tower Linears in front of batch norm carry no bias (it would be noise under Adam), and a
checkpoint that still holds such a bias loads to the same eval-mode scores."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import adrec_fast  # noqa: F401
from adrec_fast.data.synthetic import SyntheticCTR
from adrec_fast.models import base
from adrec_fast.models.checkpoint import MODEL_FILE, fold_bias_into_batch_norm, load_model, save_checkpoint
from adrec_fast.models.registry import build_model


@pytest.mark.parametrize("batch_norm,layer_norm", [(True, False), (False, True), (False, False)])
def test_mlp_bias_only_without_batch_norm(batch_norm, layer_norm):
    seq, width = base.mlp(7, (5, 3), batch_norm=batch_norm, layer_norm=layer_norm)
    lins = [m for m in seq if isinstance(m, torch.nn.Linear)]
    assert width == 3 and len(lins) == 2
    assert all((m.bias is None) == batch_norm for m in lins)


def test_bias_free_linear_before_batch_norm_has_the_same_train_output():
    """In train mode batch norm cancels a constant bias: the tower with a bias and the one
    without give the same output (float64), so dropping it loses nothing."""
    torch.manual_seed(0)
    seq, _ = base.mlp(6, (5, 4), batch_norm=True)
    seq = seq.double().train()
    with_bias = torch.nn.Sequential(*[
        torch.nn.Linear(m.in_features, m.out_features).double() if isinstance(m, torch.nn.Linear)
        else m for m in seq])
    with torch.no_grad():
        for a, b in zip(seq, with_bias):
            if isinstance(a, torch.nn.Linear):
                b.weight.copy_(a.weight)
                b.bias.uniform_(-3, 3)
    x = torch.randn(9, 6, dtype=torch.float64)
    torch.testing.assert_close(base.run_mlp(seq, x), with_bias(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["deepfm", "dcnv2", "din"])
def test_checkpoint_with_bias_before_batch_norm_loads_exactly(tmp_path, name):
    gen = SyntheticCTR(n_rows=256, seed=1, n_sparse=3, n_dense=2, max_len=4,
                       max_cardinality=30, n_users=20, n_items=25)
    schema = gen.schema()
    batch = schema.encode(gen.generate(64))
    torch.manual_seed(0)
    m = build_model(name, schema, embedding_dim=4, hidden=(8, 6), batch_norm=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # running statistics and affine terms away from their defaults
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_(0, 1, generator=g)
                mod.running_var.uniform_(0.5, 2, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0, 0.3, generator=g)
    m.eval()
    want = m.predict(batch)
    save_checkpoint(tmp_path / "ck", m, rng=False)

    # The same model as a file whose tower Linears carry a bias b and whose running means hold
    # m + b: the function is unchanged in eval mode.
    sd = load_file(str(tmp_path / "ck" / MODEL_FILE))
    n_folded = 0
    for path, seq in m.named_modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            if isinstance(seq[i], torch.nn.Linear) and isinstance(seq[i + 1], torch.nn.BatchNorm1d):
                b = torch.randn(seq[i].out_features, generator=g)
                sd[f"{path}.{i}.bias"] = b
                sd[f"{path}.{i + 1}.running_mean"] = sd[f"{path}.{i + 1}.running_mean"] + b
                n_folded += 1
    assert n_folded >= 2
    save_file(sd, str(tmp_path / "ck" / MODEL_FILE))
    folded = fold_bias_into_batch_norm(m, sd)
    assert not any(k.endswith(".bias") and k not in m.state_dict() for k in folded)
    m2, _, _ = load_model(tmp_path / "ck")
    torch.testing.assert_close(m2.predict(batch), want, rtol=1e-5, atol=1e-6)
