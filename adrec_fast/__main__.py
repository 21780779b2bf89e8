# SPDX-License-Identifier: Apache-2.0
"""``python -m adrec_fast`` / ``adrec-fast``: see :mod:`adrec_fast.cli`."""
from __future__ import annotations

import os
import sys
import traceback


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _is_rank() -> bool:
    """Whether this process is a rank of a distributed run (torchrun's environment)."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    try:
        rc = cli_main(argv)
    except BaseException:
        if not _in_process_group():
            raise
        traceback.print_exc()
        rc = 1
    if _in_process_group() or _is_rank():
        # A rank's native threads (the process group's, even after it was destroyed) can abort
        # the C++ teardown at interpreter exit (SIGABRT, "terminate called without an active
        # exception") and replace the exit status; tearing down a group that is still up could
        # wait on a peer's collective until the timeout. The run's output is written and its
        # error printed: leave at once with its status.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
