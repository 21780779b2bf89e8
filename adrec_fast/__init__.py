# SPDX-License-Identifier: Apache-2.0
"""adrec_fast: fused kernels and models for ad click-through-rate prediction.

Importing the package loads the native core ``adrec_fast._C`` (which registers the
``torch.ops.adrec`` ops), checks that it was built against the torch that is running, then
loads the op layer (fake kernels, autograd, backend choice). In a process started as the
``adrec-fast`` command that waits for ``_load_native()``, which the command line calls once its
arguments are checked: ``--help`` or a wrong option answers without importing torch.
"""
from __future__ import annotations

import importlib.util
import os
import sys

__version__ = "0.1.0"

_FIX = (
    "Rebuild it against the installed torch: "
    "`pip install --no-build-isolation --force-reinstall --no-deps -e .` "
    "from the adrec_fast source tree (see README)."
)


def _load_native() -> None:
    """Load torch, the native core and the op layer (idempotent)."""
    import torch

    try:
        from . import _C  # static registrars run on load
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            f"adrec_fast: the native extension adrec_fast._C could not be loaded ({e}). "
            f"It is usually built against another torch than the running {torch.__version__}. "
            + _FIX
        ) from e

    built = _C.build_info()["torch"]
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(
            f"adrec_fast: adrec_fast._C was built against torch {built}, but torch "
            f"{torch.__version__} is running. " + _FIX
        )
    _alias_kernels()
    from . import functional, nn, ops, optim  # noqa: F401  (ops: fake kernels + autograd)


def _started_as_cli() -> bool:
    """True in a process started as ``adrec-fast`` or ``python -m adrec_fast``."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == "adrec-fast":
        return True
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b == "adrec_fast" for a, b in zip(argv, argv[1:]))


def _alias_kernels() -> None:
    """Make ``adrec_fast.kernels`` resolve in a source checkout (editable install).

    Wheels ship the top-level ``kernels/`` folder as ``adrec_fast/kernels``; in a source tree it
    sits beside the package, so it is loaded under the same name here.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")) or "adrec_fast.kernels" in sys.modules:
        return
    src = os.path.join(os.path.dirname(here), "kernels")
    init = os.path.join(src, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(
        "adrec_fast.kernels", init, submodule_search_locations=[src]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["adrec_fast.kernels"] = module
    spec.loader.exec_module(module)


if not _started_as_cli():
    _load_native()

__all__ = ["functional", "nn", "optim", "ops", "__version__"]
