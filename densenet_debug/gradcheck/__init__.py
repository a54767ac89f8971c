"""Numerical gradient checks: every unit's backward against float64 finite differences, teacher-forced.

``engine`` selects and drives the units; ``function`` turns a unit into a pure function of its checked
tensors; ``numerics`` holds the finite differences and their error model (fast mode), ``full`` the whole
Jacobian of one tensor (full mode), ``opkinks`` the piecewise ops inside a unit that a step may cross;
``batched`` evaluates many points of a common leaf in one call; ``report`` holds the rows and the JSON
contract.
"""

from __future__ import annotations

from densenet_debug._lazy import lazy_exports

_EXPORTS = {"gradcheck_model": "densenet_debug.gradcheck.engine", "gradcheck_unit": "densenet_debug.gradcheck.engine"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
