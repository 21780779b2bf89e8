# SPDX-License-Identifier: Apache-2.0
import pytest

from adrec_fast.data.synthetic import SyntheticCTR


@pytest.fixture(scope="module")
def small():
    """(schema, train 5000 rows, valid 1000 rows) of a small synthetic set."""
    gen = SyntheticCTR(n_rows=6000, seed=1, n_sparse=6, n_dense=3, max_len=8,
                       max_cardinality=200, n_users=100, n_items=150)
    schema = gen.schema()
    data = schema.encode(gen.generate(6000))
    return schema, data.slice(0, 5000), data.slice(5000, 6000)


class Interrupted(Exception):
    """Stops a fit where a crash would (see ``interrupt_after``)."""


@pytest.fixture
def interrupt_after():
    """``interrupt_after(epoch)`` -> a fit callback that raises ``Interrupted`` once ``epoch``
    is done (its checkpoint written); ``interrupt_after.error`` is that exception class."""
    def make(epoch: int):
        def callback(trainer, metrics):
            if metrics["epoch"] == epoch:
                raise Interrupted

        return callback

    make.error = Interrupted
    return make
