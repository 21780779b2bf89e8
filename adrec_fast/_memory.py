# SPDX-License-Identifier: Apache-2.0
"""Where large CPU blocks come from: embedding tables on transparent huge pages, and which
blocks glibc maps directly (``map_large_blocks``).

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


#: glibc maps blocks of this size and more directly (``map_large_blocks``). Above a training
#: step's blocks, which must come from the heap: a mapped block is faulted in page by page on
#: every step (the recipe's [4096, 400] float32 activations are 6.25 MiB; with a 4 MiB threshold
#: `train --model deepfm` ran at 27k samples/s, 51k with this one, 48k with glibc's default).
#: Below the 16k-row evaluation batches' blocks ([16384, 400] float32: 25 MiB), whose mixing
#: with the training blocks fragments the heap. A training step whose blocks are larger raises it
#: (``training_block_bytes``): DeepFM at batch 16384 ran at 30k samples/s under 16 MiB, 48k
#: under 32 MiB.
MMAP_THRESHOLD_BYTES = 16 << 20
#: glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks
#: above it are always mapped
MMAP_THRESHOLD_MAX = 32 << 20

_threshold_set = 0  # the threshold this process set, 0: none yet


def map_large_blocks(block_bytes: int = 0) -> int:
    """Make glibc map blocks of the threshold and more directly and unmap them when freed (a
    process-wide setting): ``MMAP_THRESHOLD_BYTES``, or above ``block_bytes`` (the largest block
    a training step allocates) up to ``MMAP_THRESHOLD_MAX``. Never lowers a threshold set
    before. By default glibc's threshold rises to the largest block freed (up to 32 MiB), and an
    evaluation pass with 16k-row batches then leaves its blocks fragmented in the heap: DeepFM
    on 900k Criteo rows grew +0.95 GB RSS in ``predict`` that way (+0.2 GB with a threshold), in
    memory and streamed alike. Returns the threshold in force (0: not glibc)."""
    global _threshold_set
    want = max(MMAP_THRESHOLD_BYTES, -(-(int(block_bytes) + 1) // (1 << 20)) << 20)
    want = min(want, MMAP_THRESHOLD_MAX)
    if want <= _threshold_set:
        return _threshold_set
    try:
        import ctypes

        if ctypes.CDLL("libc.so.6").mallopt(-3, want) != 1:  # M_MMAP_THRESHOLD
            return _threshold_set
    except (OSError, AttributeError):  # not glibc
        return 0
    _threshold_set = want
    return want


def training_block_bytes(model, batch_size: int) -> int:
    """Bytes of the largest [batch, columns] float32 block a training step of ``model``
    allocates: its widest dense layer side, or its fields' embeddings side by side with the
    dense inputs (the interaction's input)."""
    widths = [max(p.shape) for p in model.dense_parameters() if p.dim() == 2]
    fields = getattr(model, "num_fields", 0) * getattr(model, "embedding_dim", 0)
    widths.append(fields + getattr(model, "dense_in", 0))
    return int(batch_size) * max(widths) * 4
