"""Training the seed's way: the loop, data sets, checkpoints, CSV progress, plots and gradient audits."""

from __future__ import annotations

from densenet_debug._lazy import lazy_exports

_EXPORTS = {"train": "densenet_debug.training.loop", "TrainConfig": "densenet_debug.training.loop"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
