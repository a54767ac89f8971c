"""Kinks inside a composite unit: a ReLU written in a module's own forward (``F.relu(self.bn1(x))``), or any
ReLU of the children a composite's replay runs, whose input lies within rounding of 0.

A composite unit is replayed whole in the side's dtype on the oracle's inputs (:mod:`.replay`). When one of
its inner ReLUs sees an element within rounding of the boundary, the side takes the other branch there and
the composite's grad_input differs by a whole term: far beyond its tolerance, yet no fault. Module-level kink
detection (:mod:`.kinks`) only sees kinky *units*, never a functional op inside one.

When a local row of a unit fails, :func:`explain` replays the unit twice more under a dispatch mode that
records every ``aten.relu`` input: once as the side (its module, dtype, flags) and once as the fp64
reference module, on the same oracle inputs. Calls are matched by order; elements whose inputs lie on
different sides of 0 are the flips. The *counterfactual* is the fp64 replay again, taking the side's branch
at exactly those elements (forward: the relu output; backward: the ``threshold_backward`` that reads that
output). If the side's replay agrees with the counterfactual within the row's tolerance, the row is status
``kink`` (explained); otherwise it stays ``mismatch``. A row with no flipped element is never excused.

Covered: ``relu``/``relu_`` (``F.relu``, ``nn.ReLU``, in place or not) and its ``threshold_backward``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from densenet_debug.trace import Trace
from densenet_debug.verdict import kinks as kinkmod
from densenet_debug.verdict.replay import Replay, replay_unit
from densenet_debug.verdict.report import Row, Status, UnitKink

_RELU = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}
_THRESHOLD_BACKWARD = torch.ops.aten.threshold_backward.default


class _Record(TorchDispatchMode):
    """Keeps the input of every relu call, in call order, as float64 on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in _RELU and args and isinstance(args[0], Tensor):
            self.inputs.append(args[0].detach().to("cpu", torch.float64, copy=True))
        return func(*args, **(kwargs or {}))


class _Force(TorchDispatchMode):
    """The fp64 run taking the side's branch at the flipped elements of each relu call (by call order)."""

    def __init__(self, flips: dict[int, tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.flips = flips  # call index -> (flipped mask, side passes: bool)
        self.calls = 0
        self.outputs: dict[int, tuple[tuple, Tensor, Tensor]] = {}  # data_ptr -> (shape, mask, side passes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _RELU and args and isinstance(args[0], Tensor):
            k, self.calls = self.calls, self.calls + 1
            flip = self.flips.get(k)
            before = args[0].detach().clone() if flip is not None else None
            out = func(*args, **kwargs)
            if flip is not None:
                mask, passes = (t.to(out.device) for t in flip)
                with torch.no_grad():
                    out[mask] = torch.where(passes[mask], before[mask], torch.zeros_like(before[mask]))
                self.outputs[out.data_ptr()] = (tuple(out.shape), mask, passes)
            return out
        if func is _THRESHOLD_BACKWARD and len(args) >= 2 and isinstance(args[1], Tensor):
            out = func(*args, **kwargs)
            hit = self.outputs.get(args[1].data_ptr())
            if hit is not None and hit[0] == tuple(out.shape):
                _, mask, passes = hit
                grad = args[0]
                out = out.clone()
                out[mask] = torch.where(passes[mask], grad[mask], torch.zeros_like(grad[mask]))
            return out
        return func(*args, **kwargs)


class _Fp64:
    """The fp64 CPU backend the reference replay runs under (what :func:`replay_unit` reads of a Backend)."""

    device = torch.device("cpu")
    param_dtype = torch.float64

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        yield


@dataclass
class InnerKinks:
    """The flipped relu elements of one unit's side replay against the fp64 replay."""

    count: int
    calls: int  # relu calls with at least one flip
    min_margin: float  # smallest |fp64 input| at a flipped element
    relative_margin: float  # min_margin / max |fp64 input| of that call
    flips: dict[int, tuple[Tensor, Tensor]]


def find(side_inputs: list[Tensor], ref_inputs: list[Tensor]) -> InnerKinks | None:
    """Matched relu calls; None when the calls cannot be matched or nothing flipped."""
    if len(side_inputs) != len(ref_inputs) or not side_inputs:
        return None
    flips: dict[int, tuple[Tensor, Tensor]] = {}
    count, margin, relative = 0, math.inf, math.inf
    for k, (s, o) in enumerate(zip(side_inputs, ref_inputs)):
        if s.shape != o.shape:
            return None
        mask = (s > 0) != (o > 0)
        n = int(mask.sum())
        if not n:
            continue
        flips[k] = (mask, s > 0)
        count += n
        m = float(o[mask].abs().min())
        if m < margin:
            top = float(o.abs().max())
            margin, relative = m, (m / top if top > 0 else math.inf)
    if not flips:
        return None
    return InnerKinks(count, len(flips), margin, relative, flips)


def _error(side: Replay, cf: Replay, quantity: str, scale: float) -> float:
    keys = [k for k in side.values if k == quantity or k.startswith(quantity + ".")
            or (quantity.startswith("grad_") and k == quantity)]
    if not keys:
        return math.inf
    err = 0.0
    for k in keys:
        s, c = side.values.get(k), cf.values.get(k)
        if s is None or c is None or s.shape != c.shape:
            return math.inf
        d = (s.detach().to("cpu", torch.float64) - c.detach().to("cpu", torch.float64)).abs()
        if d.numel():
            err = max(err, float(d.max()))
    err /= scale if scale and scale > 0 else 1.0
    return err if math.isfinite(err) else math.inf


def explain(local: list[Row], step: int, o_trace: Trace, s_trace: Trace, side_modules: dict[str, nn.Module],
            ref_modules: dict[str, nn.Module], backend: object, kinks_out: list[UnitKink]) -> None:
    """Turn failing local rows that the inner relu kinks of their unit explain into ``kink`` rows."""
    failing: dict[str, list[Row]] = {}
    for r in local:
        if (r.status == Status.MISMATCH and r.mode == "local" and r.step == step and r.layer in o_trace
                and r.layer in side_modules and r.layer in ref_modules
                and not kinkmod.is_kinky(side_modules[r.layer])  # a kinky unit: the module-level rule
                and (r.quantity == "output" or r.quantity.startswith("grad_"))):
            failing.setdefault(r.layer, []).append(r)
    for name, rows in failing.items():
        o_rec, s_rec = o_trace[name], s_trace.units.get(name)
        try:
            rec = _Record()
            with rec:
                side = replay_unit(side_modules[name], o_rec, s_rec, backend)
            ref = _Record()
            with ref:
                replay_unit(ref_modules[name], o_rec, None, _Fp64())
            found = find(rec.inputs, ref.inputs)
            if found is None:
                continue
            with _Force(found.flips):
                cf = replay_unit(ref_modules[name], o_rec, None, _Fp64())
        except RuntimeError:  # a unit that cannot be replayed again this way: nothing is excused
            continue
        explained = 0
        for r in rows:
            err = _error(side, cf, r.quantity, r.scale)
            if err <= r.tolerance:
                r.status = Status.KINK
                r.note = (f"{found.count} relu element(s) inside {name or 'the model'} took the other branch "
                          f"({found.calls} call(s); margin {found.min_margin:.2e}, relative "
                          f"{found.relative_margin:.2e}); agrees with the counterfactual oracle taking the side's "
                          f"branch there: error {err:.2e}")
                explained += 1
        if explained:
            kinks_out.append(UnitKink(name, found.count, found.min_margin, found.relative_margin, "", step, "local"))
