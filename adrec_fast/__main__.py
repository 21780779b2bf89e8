# SPDX-License-Identifier: Apache-2.0
"""``python -m adrec_fast`` / ``adrec-fast``: see :mod:`adrec_fast.cli`."""
from __future__ import annotations

import os
import sys
import traceback


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    try:
        rc = cli_main(argv)
    except BaseException:
        if not _in_process_group():
            raise
        traceback.print_exc()
        rc = 1
    if _in_process_group():
        # A rank that stops on an error still holds the process group's native threads; C++
        # static destruction at interpreter exit can then abort (SIGABRT, "terminate called
        # without an active exception") and replace the exit status that names the error, and
        # tearing the group down could wait on a peer's collective until the timeout. The
        # error is printed: leave at once with its status.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
