# SPDX-License-Identifier: Apache-2.0
"""Allocation of large embedding tables on transparent huge pages.

A pooled lookup reads random rows of tables that span hundreds of MB. With 4 KiB pages nearly
every row read misses the TLB and walks the page table; with 2 MiB pages the whole table of the
benchmark shapes (5.57M x 16 floats, 356 MB) needs 170 TLB entries. On Linux with THP in
``madvise`` mode (the common default) memory is only backed by huge pages when asked for, before
its first write. ``ADREC_HUGE_PAGES=0`` turns this off.
"""
from __future__ import annotations

import os

import torch

from . import _C

# Below this size a table fits the TLB's reach with 4 KiB pages anyway.
_MIN_BYTES = 8 << 20


def huge_pages_enabled() -> bool:
    return os.environ.get("ADREC_HUGE_PAGES", "1") not in ("0", "false", "False", "")


def empty_table(*shape: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``torch.empty(shape)``; on the CPU, for a large tensor, advised to use huge pages before
    anything is written to it. The caller initialises the contents."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and t.numel() * t.element_size() >= _MIN_BYTES and huge_pages_enabled():
        _C.advise_huge_pages(t.data_ptr(), t.numel() * t.element_size())
    return t
