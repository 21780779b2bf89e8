# SPDX-License-Identifier: Apache-2.0
"""Serving: low-latency scoring of one user against N candidates from a trained checkpoint."""
from .scorer import MLP, QUANTIZE, IdsPath, Scorer, dequantize_rows, load, pack, quantize_rows

__all__ = ["MLP", "QUANTIZE", "IdsPath", "Scorer", "dequantize_rows", "load", "pack",
           "quantize_rows"]
