"""densenet-debug: is a backend computing your gradients wrong, where, and why (or why not)?

One import line for a notebook::

    from densenet_debug import build_model, diff, gradcheck_model, record_reference, check_reference

Every public name is resolved lazily, so ``import densenet_debug`` (and the pytest plugin pytest loads at
start-up) does not import torch until a name that needs it is used.
"""

from __future__ import annotations

from densenet_debug._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "BUILDERS": "densenet_debug.models",
    "DenseNet": "densenet_debug.models",
    "build_model": "densenet_debug.models",
    "resolve_model": "densenet_debug.models",
    "UsageError": "densenet_debug.errors",
    "trace_step": "densenet_debug.trace",
    "diff": "densenet_debug.verdict.engine",
    "judge": "densenet_debug.verdict.engine",
    "local_check": "densenet_debug.verdict.engine",
    "oracle_traces": "densenet_debug.verdict.engine",
    "gradcheck_model": "densenet_debug.gradcheck.engine",
    "compare_with_torch": "densenet_debug.numpy_oracle",
    "record_reference": "densenet_debug.reference.record",
    "check_reference": "densenet_debug.reference.check",
    "load_reference": "densenet_debug.reference.check",
    "read_fixture": "densenet_debug.reference.format",
    "run_selftest": "densenet_debug.faults.selftest",
    "train": "densenet_debug.training.loop",
    "TrainConfig": "densenet_debug.training.loop",
}
__all__ = [*_EXPORTS, "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
