# SPDX-License-Identifier: Apache-2.0
"""Which large host blocks glibc maps directly (a process-wide setting, ``map_large_blocks``):
the data layer sets it when it loads training data, a model's training forward raises it above
the step's largest block."""
from __future__ import annotations

#: glibc maps blocks of this size and more directly (``map_large_blocks``). Above a training
#: step's blocks, which must come from the heap: a mapped block is faulted in page by page on
#: every step (the recipe's [4096, 400] float32 activations are 6.25 MiB; with a 4 MiB threshold
#: `train --model deepfm` ran at 27k samples/s, 51k with this one, 48k with glibc's default).
#: Below the 16k-row evaluation batches' blocks ([16384, 400] float32: 25 MiB), whose mixing
#: with the training blocks fragments the heap. A training step whose blocks are larger raises
#: it (``models.base.CTRModel.step_block_bytes``): DeepFM at batch 16384 ran at 30k samples/s under
#: 16 MiB, 48k under 32 MiB.
MMAP_THRESHOLD_BYTES = 16 << 20
#: glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks
#: above it are always mapped
MMAP_THRESHOLD_MAX = 32 << 20

#: Free memory at the top of the heap that glibc keeps rather than returns to the system.
#: Setting the mmap threshold turns off glibc's own rule (twice the mmap threshold) and leaves
#: 128 KiB, so a training step's blocks, freed at the end of each step, went back to the system
#: and were faulted in again page by page on the next one. Above the transient memory of a
#: default training step (a few hundred MB at most): `train --model deepfm`, 200k synthetic rows,
#: 41-46k samples/s with 128 KiB, 46-51k with this, peak RSS +60-130 MB (bench/RESULTS_models.md).
TRIM_THRESHOLD_BYTES = 512 << 20

_threshold_set = 0  # the threshold this process set, 0: none yet


def map_large_blocks(block_bytes: int = 0) -> int:
    """Make glibc map blocks of the threshold and more directly and unmap them when freed (a
    process-wide setting): ``MMAP_THRESHOLD_BYTES``, or above ``block_bytes`` (the largest block
    a training step allocates) up to ``MMAP_THRESHOLD_MAX``; the heap keeps up to
    ``TRIM_THRESHOLD_BYTES`` of freed memory. Never lowers a threshold set before. By default
    glibc's threshold rises to the largest block freed (up to 32 MiB), and an evaluation pass
    with 16k-row batches then leaves its blocks fragmented in the heap: DeepFM on 900k Criteo
    rows grew +0.95 GB RSS in ``predict`` that way (+0.2 GB with a threshold), in memory and
    streamed alike. Returns the threshold in force (0: not glibc)."""
    global _threshold_set
    want = max(MMAP_THRESHOLD_BYTES, -(-(int(block_bytes) + 1) // (1 << 20)) << 20)
    want = min(want, MMAP_THRESHOLD_MAX)
    if want <= _threshold_set:
        return _threshold_set
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(-3, want) != 1:  # M_MMAP_THRESHOLD
            return _threshold_set
        libc.mallopt(-1, TRIM_THRESHOLD_BYTES)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return 0
    _threshold_set = want
    return want
