# SPDX-License-Identifier: Apache-2.0
"""Small DCN-v2 / DLRM configurations and a synthetic batch shared by the dense-path tests
(test_dense.py, test_padding.py)."""
from __future__ import annotations

from adrec_fast.data.synthetic import SyntheticCTR

TOWER_CASES = {
    "dcnv2": ("dcnv2", {"hidden": (24, 8)}),
    "dcnv2_stacked": ("dcnv2", {"hidden": (24, 8), "structure": "stacked"}),
    "dcnv2_bn": ("dcnv2", {"hidden": (24,), "batch_norm": True}),
    "dlrm": ("dlrm", {"bottom": (16,), "top": (24, 8)}),
}

TOWER_BATCH = 64


def tower_batch():
    """(schema, batch of 64). 5 bags x D=8 + 3 dense = 43 columns for DCN-v2; DLRM top input
    8 + 15 = 23: neither a multiple of 16, so both models pad."""
    gen = SyntheticCTR(n_rows=1000, seed=5, n_sparse=5, n_dense=3, max_len=4,
                       max_cardinality=50, n_users=30, n_items=40)
    return gen.schema(), next(gen.batches(TOWER_BATCH, n=TOWER_BATCH))
