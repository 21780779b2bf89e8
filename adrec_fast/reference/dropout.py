# SPDX-License-Identifier: Apache-2.0
"""Reference dropout with the counter-based mask of ``adrec::dropout``.

Element i of ``x`` (row-major, at global index ``offset + i``) is kept when
``fmix32((lo(g) ^ lo(seed)) * 0x9E3779B1 + fmix32(hi(g) ^ hi(seed))) >= floor(p * 2^32)``,
g = offset + i, lo/hi the low and high 32 bits and fmix32 murmur3's finaliser; kept elements
are scaled by 1 / (1 - p). All arithmetic is on int64 tensors kept below 2^48, so it is exact
on every device.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without leaving int64: x's high half times c's low
    half (mod 2^16), shifted, plus x's low half times c."""
    hi, lo = x >> 16, x & 0xFFFF
    return ((((hi * (c & 0xFFFF)) & 0xFFFF) << 16) + lo * c) & _M32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_keep(n: int, p: float, seed: int, offset: int = 0,
                 device: torch.device | str = "cpu") -> Tensor:
    """bool [n]: which of the elements offset .. offset + n - 1 the mask keeps."""
    if p >= 1.0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    g = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    s = int(seed) & ((1 << 64) - 1)
    a = _fmix32((g >> 32) ^ (s >> 32))
    h = _fmix32((_mul32((g & _M32) ^ (s & _M32), 0x9E3779B1) + a) & _M32)
    return h >= min(math.floor(p * 2.0 ** 32), _M32)


def dropout(x: Tensor, p: float, seed: int, offset: int = 0) -> Tensor:
    """x [...] -> x * keep / (1 - p) (zeros for p = 1), keep from ``dropout_keep``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if p >= 1.0:
        return torch.zeros_like(x)
    keep = dropout_keep(x.numel(), p, seed, offset, x.device).view(x.shape)
    scale = 1.0 / (1.0 - p)
    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))
