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
)

# (op, device type) -> backend used when nothing is forced. "cpp" on CPU is the C++ kernel;
# on CUDA "cuda" is csrc/cuda, "triton" is kernels/.
_DEFAULT: dict[tuple[str, str], str] = {}
for _op in OPS:
    _DEFAULT[(_op, "cpu")] = "cpp"
    _DEFAULT[(_op, "cuda")] = "triton"

# Backends that exist per device type (filled in by the op modules as they register).
AVAILABLE: dict[tuple[str, str], set[str]] = {
    (op, dev): {"reference"} for op in OPS for dev in ("cpu", "cuda", "meta")
}
for _op in OPS:
    AVAILABLE[(_op, "cpu")].add("cpp")
    AVAILABLE[(_op, "meta")].add("cpp")


def register(op: str, device: str, backend: str, default: bool = False) -> None:
    AVAILABLE.setdefault((op, device), {"reference"}).add(backend)
    if default:
        _DEFAULT[(op, device)] = backend


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


def backend_for(op: str, device: torch.device | str) -> str:
    """The backend that runs ``op`` on ``device``: ADREC_BACKEND if it exists there, else the
    table's default."""
    dev = torch.device(device).type
    forced = _forced(op)
    if forced is not None and forced in AVAILABLE.get((op, dev), ()):
        return forced
    return _DEFAULT.get((op, dev), "cpp")


def backends_for(op: str, device: torch.device | str = "cpu") -> list[str]:
    dev = torch.device(device).type
    return sorted(AVAILABLE.get((op, dev), {"reference"}))
