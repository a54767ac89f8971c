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

from densenet_debug.trace import Trace, UnitRecord
from densenet_debug.verdict import kinks as kinkmod
from densenet_debug.verdict.replay import Replay, replay_unit, side_values
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
            # Outputs are found again by address: a relu output lands where a freed one was (a checkpointed
            # bottleneck frees its forward's, an equal-shaped relu later takes the memory), so the newest relu
            # at an address is the only one its threshold_backward can read; an older entry there is stale.
            self.outputs.pop(out.data_ptr(), None)
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


def _error(side: dict[str, Tensor | None], cf: dict[str, Tensor | None], quantity: str, scale: float | None
           ) -> float:
    """max |side - cf| over the tensors of ``quantity``, on the row's scale."""
    keys = [k for k in side if k == quantity or k.startswith(quantity + ".")]
    if not keys:
        return math.inf
    err = 0.0
    for k in keys:
        s, c = side.get(k), cf.get(k)
        if s is None or c is None or s.shape != c.shape:
            return math.inf
        d = (s.detach().to("cpu", torch.float64) - c.detach().to("cpu", torch.float64)).abs()
        if d.numel():
            worst = float(d.max())
            if not math.isfinite(worst):  # NaN/Inf is never a kink
                return math.inf
            err = max(err, worst)
    err /= scale if scale and scale > 0 else 1.0
    return err if math.isfinite(err) else math.inf


def _unit(name: str, o_rec: UnitRecord, s_rec: UnitRecord | None, side_module: nn.Module, ref_module: nn.Module,
          backend: object) -> tuple[Replay, Replay, InnerKinks] | None:
    """The side's replay of a unit on ``o_rec``, the counterfactual fp64 replay and the flips; None: no flip."""
    try:
        rec = _Record()
        with rec:
            side = replay_unit(side_module, o_rec, s_rec, backend)
        ref = _Record()
        with ref:
            replay_unit(ref_module, o_rec, None, _Fp64())
        found = find(rec.inputs, ref.inputs)
        if found is None:
            return None
        with _Force(found.flips):
            cf = replay_unit(ref_module, o_rec, None, _Fp64())
    except RuntimeError:  # a unit that cannot be replayed again this way: nothing is excused
        return None
    return side, cf, found


def _judge(name: str, rows: list[Row], side: dict[str, Tensor | None], cf: Replay, found: InnerKinks,
           what: str) -> bool:
    explained = False
    for r in rows:
        err = _error(side, cf.values, r.quantity, r.scale)
        if err <= r.tolerance:
            r.status = Status.KINK
            r.note = (f"{found.count} relu element(s) inside {name or 'the model'} took the other branch "
                      f"({found.calls} call(s); margin {found.min_margin:.2e}, relative "
                      f"{found.relative_margin:.2e}); agrees with the counterfactual oracle ({what}, the side's "
                      f"branch there): error {err:.2e}")
            explained = True
    return explained


def _failing(rows: list[Row], mode: str, step: int, known: set[str], side_modules: dict[str, nn.Module]
             ) -> dict[str, list[Row]]:
    failing: dict[str, list[Row]] = {}
    for r in rows:
        if (r.status == Status.MISMATCH and r.mode == mode and r.step == step and r.layer in known
                and r.layer in side_modules and r.error_a is not None and math.isfinite(r.error_a)
                and not kinkmod.is_kinky(side_modules[r.layer])  # a kinky unit: the module-level rule
                and (r.quantity == "output" or r.quantity.startswith("grad_"))):
            failing.setdefault(r.layer, []).append(r)
    return failing


def explain(local: list[Row], step: int, o_trace: Trace, s_trace: Trace, side_modules: dict[str, nn.Module],
            ref_modules: dict[str, nn.Module], backend: object, kinks_out: list[UnitKink]) -> None:
    """Turn failing local rows that the inner relu kinks of their unit explain into ``kink`` rows."""
    known = {n for n in o_trace.units if n in ref_modules}
    for name, rows in _failing(local, "local", step, known, side_modules).items():
        got = _unit(name, o_trace[name], s_trace.units.get(name), side_modules[name], ref_modules[name], backend)
        if got is not None and _judge(name, rows, got[0].values, got[1], got[2], "on the oracle's inputs"):
            kinks_out.append(UnitKink(name, got[2].count, got[2].min_margin, got[2].relative_margin, "", step,
                                      "local"))


def explain_propagated(rows: list[Row], step: int, s_trace: Trace, side_modules: dict[str, nn.Module],
                       ref_modules: dict[str, nn.Module], backend: object, kinks_out: list[UnitKink]) -> None:
    """Propagated rows still failing: the same, at the side's own propagated inputs and grad_outputs.

    The counterfactual is the fp64 reference unit on the side's own inputs, taking the side's branch at the
    flips; the side's recorded values must agree with it within the row's tolerance.
    """
    from densenet_debug.verdict.propagated import _as_fp64

    known = {n for n in s_trace.units if n in ref_modules}
    for name, failing in _failing(rows, "propagated", step, known, side_modules).items():
        s_rec = s_trace.units[name]
        got = _unit(name, _as_fp64(s_rec), s_rec, side_modules[name], ref_modules[name], backend)
        if got is not None and _judge(name, failing, side_values(s_rec), got[1], got[2],
                                      "on the side's own inputs"):
            kinks_out.append(UnitKink(name, got[2].count, got[2].min_margin, got[2].relative_margin, "", step))
