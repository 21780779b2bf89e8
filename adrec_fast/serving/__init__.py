# SPDX-License-Identifier: Apache-2.0
"""Serving: low-latency scoring of one user against N candidates from a trained checkpoint."""
from .scorer import QUANTIZE, Scorer, dequantize_rows, load, quantize_rows

__all__ = ["QUANTIZE", "Scorer", "dequantize_rows", "load", "quantize_rows"]
