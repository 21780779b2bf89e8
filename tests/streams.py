# SPDX-License-Identifier: Apache-2.0
"""A small drifting synthetic stream, fitted, for the tests of online training, delta export
and a Scorer following the deltas."""

from adrec_fast.data.synthetic import SyntheticCTR


def drifting(seed: int, period_rows: int, n: int):
    """(fitted schema, table of n rows) of ``SyntheticCTR(drift=True)`` at a small size: 5
    categorical fields, 2 dense, histories of up to 4, 200 users, 300 items."""
    gen = SyntheticCTR(seed=seed, drift=True, period_rows=period_rows, n_sparse=5, n_dense=2,
                       max_len=4, max_cardinality=300, n_users=200, n_items=300)
    schema = gen.schema()
    table = gen.generate(n)
    if not schema.fitted:
        schema.fit(table)
    return schema, table
