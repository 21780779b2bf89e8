# SPDX-License-Identifier: Apache-2.0
"""Row storage of served embedding tables: float32, float16, or int8 with a scale and bias per
row. The Scorer lays its tables out with it at load, and the delta path (serving/deltas.py)
re-quantizes the rows a delta changes the same way; each version owns its copy (own_rows)."""
from __future__ import annotations

import torch

from .._memory import empty_table

QUANTIZE = (None, "fp16", "int8")


def quantize_rows(weight: torch.Tensor, mode: str | None):
    """weight [R, D] float32 -> (storage, scale_bias [R, 2] float32 or None).

    ``"fp16"``: storage [R, D] float16. ``"int8"``: storage [R, D] uint8 with
    ``x ~= q * scale + bias`` per row (scale = (max - min) / 255, bias = min; a constant row
    gets scale 1). ``None``: the float32 weight itself."""
    w = weight.detach().float().contiguous()
    if mode is None:
        return w, None
    if mode == "fp16":
        return w.half().contiguous(), None
    if mode == "int8":
        mn = w.amin(dim=1) if w.numel() else w.new_zeros(w.shape[0])  # [R]
        mx = w.amax(dim=1) if w.numel() else w.new_zeros(w.shape[0])  # [R]
        scale = (mx - mn) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # [R]
        q = ((w - mn[:, None]) / scale[:, None]).round_().clamp_(0, 255).to(torch.uint8)
        return q.contiguous(), torch.stack([scale, mn], dim=1).contiguous()  # [R, D], [R, 2]
    raise ValueError(f"quantize must be one of {QUANTIZE}, got {mode!r}")


def dequantize_rows(storage: torch.Tensor, scale_bias: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` -> [R, D] float32 (the values the kernel reads)."""
    if scale_bias is None:
        return storage.float()
    return storage.float() * scale_bias[:, :1] + scale_bias[:, 1:]


def own_rows(t: torch.Tensor) -> torch.Tensor:
    """A copy of the embedding rows ``t`` [R, D] for a version to own; a large one on huge pages
    (a request reads random rows: _memory.py)."""
    out = empty_table(*t.shape, dtype=t.dtype)
    out.copy_(t)
    return out
