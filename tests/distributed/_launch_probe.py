# SPDX-License-Identifier: Apache-2.0
"""A rank started by ``adrec_fast.distributed.launch`` in the tests: writes what torchrun gave
it (its environment and arguments) to ``<dir>/rank<RANK>.json``; ``fail`` as the second
argument makes rank 1 exit with code 5."""
import json
import os
import sys
from pathlib import Path

out, *args = sys.argv[1:]
rank = int(os.environ["RANK"])
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
(Path(out) / f"rank{rank}.json").write_text(json.dumps(
    {"env": {k: os.environ.get(k) for k in keys}, "args": args}))
if args[:1] == ["fail"] and rank == 1:
    sys.exit(5)
