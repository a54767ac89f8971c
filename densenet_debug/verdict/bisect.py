"""Narrow a failing composed backend (``cudnn+channels_last+tf32``) to the component, or pair, that fails.

Every trial is judged against one shared fp64 oracle: each component alone first (a modifier alone runs
on the device's default kernels), then every pair; the smallest failing subsets are the culprits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug.backends import parse_backend
from densenet_debug.errors import UsageError
from densenet_debug.trace import UnitSelector
from densenet_debug.verdict.report import TEACHER_FORCED

if TYPE_CHECKING:
    from densenet_debug.verdict.engine import JudgeCache


@dataclass
class BisectResult:
    backend: str
    culprits: list[str]  # the smallest failing subsets, as backend specs
    trials: list[dict] = field(default_factory=list)  # {"backend", "verdict", "first": (layer, pass) | None}

    def to_json(self) -> dict:
        return {"backend": self.backend, "culprits": self.culprits, "trials": self.trials}

    @property
    def summary(self) -> str:
        if not self.culprits:
            return f"bisect {self.backend}: no component or pair fails alone; only the whole combination does"
        return f"bisect {self.backend}: culprit {' / '.join(self.culprits)}"


def bisect_backend(model: nn.Module, x: Tensor, y: Tensor, failing: str, *, steps: int = 1, eval_mode: bool = False,
                   units: UnitSelector = None, device: object = None, loss_fn=F.cross_entropy,  # noqa: ANN001
                   oracle: list | None = None) -> BisectResult:
    """Judge every component of ``failing`` alone, then every pair; report the smallest failing subsets."""
    from densenet_debug.verdict.engine import JudgeCache, oracle_traces, release, unit_names

    parts = [p.strip() for p in failing.split("+") if p.strip()]
    if len(parts) < 2:
        raise UsageError(f"--bisect needs a composed backend (A+B...), got {failing!r}")
    names = unit_names(model, x, units)
    if oracle is None:
        oracle = oracle_traces(model, x, y, steps=steps, eval_mode=eval_mode, units=names, loss_fn=loss_fn)
    result = BisectResult(failing, [])
    shared = JudgeCache()
    try:
        _trials(model, x, y, parts, result, oracle, names, shared, steps, eval_mode, device, loss_fn)
    finally:
        release(oracle)
    return result


def _trials(model: nn.Module, x: Tensor, y: Tensor, parts: list[str], result: BisectResult, oracle: list,
            names: list[str] | Callable[[str, nn.Module], bool], shared: JudgeCache, steps: int, eval_mode: bool,
            device: object, loss_fn) -> None:  # noqa: ANN001
    from densenet_debug.verdict.engine import judge

    for size in (1, 2):
        failed = []
        for subset in itertools.combinations(parts, size):
            spec = "+".join(subset)
            try:
                backend = parse_backend(spec, device)
            except UsageError as exc:  # e.g. a pair of conflicting components: not a configuration
                result.trials.append({"backend": spec, "verdict": "invalid", "first": str(exc)})
                continue
            side = judge(model, x, y, backend, oracle, units=names, steps=steps, eval_mode=eval_mode,
                         loss_fn=loss_fn, _shared=shared)
            bad = side.failures
            first = min(bad, key=lambda r: (r.mode not in TEACHER_FORCED, r.step, r.pass_ != "forward", r.order)
                        ) if bad else None
            result.trials.append({"backend": spec, "verdict": "mismatch" if bad else "agree",
                                  "first": None if first is None else [first.layer, first.pass_, first.quantity]})
            if bad:
                failed.append(spec)
        if failed:
            result.culprits = failed
            return
