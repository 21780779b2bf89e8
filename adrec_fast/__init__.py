# SPDX-License-Identifier: Apache-2.0
"""adrec_fast: fused kernels and models for ad click-through-rate prediction.

Importing the package loads the native core ``adrec_fast._C`` (which registers the
``torch.ops.adrec`` ops), checks that it was built against the torch that is running, then
loads the op layer (fake kernels, autograd, backend choice).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

__version__ = "0.1.0"

_FIX = (
    "Rebuild it against the installed torch: "
    "`pip install --no-build-isolation --force-reinstall --no-deps -e .` "
    "from the adrec_fast source tree (see README)."
)

try:
    from . import _C  # noqa: F401  (static registrars run on load)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f"adrec_fast: the native extension adrec_fast._C could not be loaded ({e}). "
        f"It is usually built against another torch than the running {torch.__version__}. "
        + _FIX
    ) from e

_built = _C.build_info()["torch"]
if _built.split("+")[0] != torch.__version__.split("+")[0]:
    raise ImportError(
        f"adrec_fast: adrec_fast._C was built against torch {_built}, but torch "
        f"{torch.__version__} is running. " + _FIX
    )


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


_alias_kernels()

from . import ops  # noqa: E402,F401  (fake kernels + autograd registration)
from . import functional, nn, optim  # noqa: E402,F401

__all__ = ["functional", "nn", "optim", "ops", "__version__"]
