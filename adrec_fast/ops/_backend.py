# SPDX-License-Identifier: Apache-2.0
"""One table: the default backend per (op, device type), and the ADREC_BACKEND override.

``ADREC_BACKEND=cpp|cuda|triton|reference`` forces a backend for every op where it exists for
that device; ``ADREC_BACKEND=fm_interaction:triton,embedding_bag:reference`` forces per op.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("cpp", "cuda", "triton", "reference")
OPS = (
    "embedding_bag",
    "fm_interaction",
    "dot_interaction",
    "cross_layer",
    "attention_pooling",
    "sigmoid_bce",
    "score",
    "dropout",
)

# Ops with a CUDA C++ kernel in csrc/cuda (registered under the plain adrec::<op> name).
CUDA_KERNEL_OPS = ("embedding_bag", "sigmoid_bce", "score")


def _cuda_built() -> bool:
    from .. import _C

    return bool(_C.build_info().get("cuda", False))


CUDA_BUILT = _cuda_built()

#: Whether the op modules register their Triton kernels (the ``*_triton`` ops): where they can
#: run, on a CUDA device or under Triton's CPU interpreter (TRITON_INTERPRET=1). Elsewhere
#: registering them would only cost time: it imports triton and torch's compiler stack, about
#: 1.5 s of every ``import adrec_fast`` on a CPU-only machine with the triton extra installed.
#: ADREC_TRITON_OPS=1 registers them anyway: the test suite does, so that opcheck covers their
#: schemas, fake kernels and autograd on CPU (through their reference CPU kernels).
TRITON_OPS = (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
              or os.environ.get("ADREC_TRITON_OPS") == "1")

# (op, device type) -> backend used when nothing is forced. "cpp" on CPU is the C++ kernel;
# on CUDA "cuda" is csrc/cuda (when _C was built with it), else "triton" (kernels/, once the op
# module registers it), else the reference.
_DEFAULT: dict[tuple[str, str], str] = {}
for _op in OPS:
    _DEFAULT[(_op, "cpu")] = "cpp"
    _DEFAULT[(_op, "cuda")] = "cuda" if CUDA_BUILT and _op in CUDA_KERNEL_OPS else "reference"

# Backends that exist per device type (filled in by the op modules as they register).
AVAILABLE: dict[tuple[str, str], set[str]] = {
    (op, dev): {"reference"} for op in OPS for dev in ("cpu", "cuda", "meta")
}
for _op in OPS:
    AVAILABLE[(_op, "cpu")].add("cpp")
    AVAILABLE[(_op, "meta")].add("cpp")
    if CUDA_BUILT and _op in CUDA_KERNEL_OPS:
        AVAILABLE[(_op, "cuda")].add("cuda")


def default_on_cuda(op: str, backend: str) -> bool:
    """Whether ``backend`` should become the CUDA default for ``op`` when it registers: Triton
    is the default unless a csrc/cuda kernel was built for the op."""
    if backend == "triton":
        return not (CUDA_BUILT and op in CUDA_KERNEL_OPS)
    return backend == "cuda"


def register(op: str, device: str, backend: str, default: bool = False) -> None:
    AVAILABLE.setdefault((op, device), {"reference"}).add(backend)
    if default:
        _DEFAULT[(op, device)] = backend
    _CHOICE.clear()


# (op, device type, ADREC_BACKEND) -> backend_for's answer. The functional layer asks on every
# call, and for the small ops (sigmoid_bce at B = 4096 is a few microseconds) parsing the
# variable each time showed in the step time.
_CHOICE: dict[tuple[str, str, str], str] = {}


def _forced(op: str) -> str | None:
    env = os.environ.get("ADREC_BACKEND", "").strip()
    if not env:
        return None
    forced = None
    for part in env.split(","):
        part = part.strip()
        if ":" in part:
            name, be = (s.strip() for s in part.split(":", 1))
            if name == op:
                forced = be
        elif part:
            forced = part
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"ADREC_BACKEND: unknown backend {forced!r}; choose from {BACKENDS}")
    return forced


# ADREC_BACKEND read straight from os.environ's own dict (the raw bytes, updated by every
# os.environ assignment): os.environ.get encodes the key and decodes the value, 0.6 us of the
# ~1.2 us backend_for cost per op call, a tenth of sigmoid_bce's whole forward at B = 4096.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("ADREC_BACKEND") if hasattr(os.environ, "encodekey") else None


def _env_backend():
    if _ENV_DATA is not None and _ENV_KEY is not None:
        return _ENV_DATA.get(_ENV_KEY)  # bytes or None: only a cache key
    return os.environ.get("ADREC_BACKEND")


def backend_for(op: str, device: torch.device | str) -> str:
    """The backend that runs ``op`` on ``device``: ADREC_BACKEND if it exists there, else the
    table's default."""
    dev = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (op, dev, _env_backend())
    choice = _CHOICE.get(key)
    if choice is None:
        choice = _CHOICE[key] = _choose(op, dev)
    return choice


def _choose(op: str, dev: str) -> str:
    forced = _forced(op)
    available = AVAILABLE.get((op, dev), ())
    if forced is not None and forced in available:
        return forced
    default = _DEFAULT.get((op, dev), "cpp")
    if dev == "cuda" and default not in available:
        return "reference"
    return default


def backends_for(op: str, device: torch.device | str = "cpu") -> list[str]:
    dev = torch.device(device).type
    return sorted(AVAILABLE.get((op, dev), {"reference"}))
