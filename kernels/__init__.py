# SPDX-License-Identifier: Apache-2.0
"""Triton kernels and their plain launchers (installed as ``adrec_fast.kernels``).

Modules here import only ``triton`` and ``torch``; torch.library registration lives in
``adrec_fast.ops``.
"""
