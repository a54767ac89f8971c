"""An independent NumPy float64 oracle: forward, loss and backward without torch's math, any model of its ops.

A bug in a PyTorch op's backward (cat's, say) would hit every PyTorch backend alike, the fp64 one
included; this oracle shares no code with PyTorch. ``numpy_forward_backward`` runs any DenseNet /
DenseNet-BC of :mod:`densenet_debug.models` from its state dict; ``compare_with_torch`` compares
PyTorch float64 with it unit by unit.
"""

from __future__ import annotations

from densenet_debug.numpy_oracle.compare import OracleReport, OracleRow, compare_ops, compare_with_torch
from densenet_debug.numpy_oracle.interpreter import UnsupportedOp
from densenet_debug.numpy_oracle.model import NumpyTrace, NumpyUnit, build_specs, numpy_forward_backward

__all__ = ["NumpyTrace", "NumpyUnit", "OracleReport", "OracleRow", "UnsupportedOp", "build_specs", "compare_ops",
           "compare_with_torch", "numpy_forward_backward"]
