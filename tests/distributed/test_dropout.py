# SPDX-License-Identifier: Apache-2.0
"""``GlobalBatchDropout``: each rank's mask is its rows of the mask one process draws for the
whole global batch (same generator state before and after), so a run with dropout on N ranks
follows the one-process run."""
from __future__ import annotations

import pytest
import torch

from adrec_fast import functional as F
from adrec_fast.distributed import DistContext, GlobalBatchDropout, global_batch_dropout


def _ctx(rank: int, world: int) -> DistContext:
    return DistContext(rank=rank, world=world, local_rank=rank, backend="gloo",
                       device=torch.device("cpu"), timeout_s=1.0, group=None, emb_group=None)


@pytest.mark.parametrize("world, n, shape", [(2, 5, (7,)), (3, 1, (4, 3)), (2, 0, (3,))])
def test_each_rank_drops_its_rows_of_the_one_process_mask(world, n, shape):
    x = torch.randn(world * n, *shape)
    torch.manual_seed(11)
    want = F.dropout(x, 0.3, training=True)  # what the models' Dropout draws in one process
    after = torch.get_rng_state()
    for rank in range(world):
        torch.manual_seed(11)
        drop = GlobalBatchDropout(0.3, _ctx(rank, world)).train()
        got = drop(x[rank * n:(rank + 1) * n])
        assert torch.equal(got, want[rank * n:(rank + 1) * n])
        assert torch.equal(torch.get_rng_state(), after)  # the ranks stay in step
    drop.eval()
    assert drop(x) is x


def test_global_batch_dropout_replaces_every_dropout_of_a_model():
    from adrec_fast.data.synthetic import SyntheticCTR
    from adrec_fast.models.registry import build_model

    schema = SyntheticCTR(n_rows=200, seed=0).schema()
    model = build_model("deepfm", schema, embedding_dim=4, hidden=(8, 8), dropout=0.25)
    before = sum(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert before == 2
    assert global_batch_dropout(model, _ctx(1, 2)) == 2
    mods = [m for m in model.modules() if isinstance(m, GlobalBatchDropout)]
    assert len(mods) == 2 and all(m.p == 0.25 and m.rank == 1 for m in mods)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
