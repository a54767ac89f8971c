"""Reference fixtures: the float64 truth of a training step, recorded once and checked anywhere.

``format`` reads and writes ``reference_grads/<name>/`` (npz + meta.json, no pickle); ``record`` makes a
fixture; ``check`` judges the current PyTorch against one with the verdict engine's rules.
"""

from __future__ import annotations

from densenet_debug._lazy import lazy_exports

_EXPORTS = {
    "record_reference": "densenet_debug.reference.record",
    "check_reference": "densenet_debug.reference.check",
    "load_reference": "densenet_debug.reference.check",
    "read_fixture": "densenet_debug.reference.format",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
