# SPDX-License-Identifier: Apache-2.0
"""``python -m adrec_fast`` / ``adrec-fast``: see :mod:`adrec_fast.cli`."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
