"""Non-finite numbers never pass: where a NaN/Inf first appeared in a step, and what it means for a verdict.

A comparison with a NaN is not "within tolerance" (``nan <= tol`` is False, but ``inf <= inf`` is True, and a
NaN tolerance makes every test vacuous). So non-finite values are settled before any bound is applied:

* The **oracle** (the float64 truth: a diff's oracle, a fixture's stored or recomputed trace, gradcheck's float64
  step) must be finite. If it is not, there is nothing to judge against: :class:`NonFiniteOracle`, a
  :class:`~densenet_debug.errors.UsageError` (one line naming where, exit 2).
* A **side** that is non-finite where the oracle is finite is a finding of its own: rows get status
  ``nonfinite`` (a failure, exit 1), and :func:`first_nonfinite` names the unit that *produced* the first NaN/Inf
  (finite inputs, non-finite results), forward or backward.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from densenet_debug.errors import UsageError
from densenet_debug.trace import StoredUnits, Trace, UnitRecord


class NonFiniteOracle(UsageError):
    """The float64 truth itself holds a NaN or an infinity: nothing can be judged against it (exit 2)."""


def finite(t: object) -> bool:
    """True for a tensor without NaN/Inf (integer tensors and non-tensors are finite)."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() == 0:
        return True
    t = t.detach()
    if math.isfinite(float(t.sum(dtype=torch.float64))):  # NaN/Inf always reach a sum: one pass, no mask
        return True
    return bool(t.isfinite().all())  # the sum overflowed, or there is a NaN/Inf


def _all_finite(tensors: object) -> bool:
    return all(finite(t) for t in tensors)


def _bad_forward(rec: UnitRecord) -> str | None:
    for j, t in enumerate(rec.outputs):
        if not finite(t):
            return "output" if len(rec.outputs) == 1 else f"output.{j}"
    for k, t in rec.buffers_after.items():
        if not finite(t):
            return k
    return None


def _bad_backward(rec: UnitRecord) -> str | None:
    for i, t in enumerate(rec.grad_inputs):
        if not finite(t):
            return "grad_input" if len(rec.grad_inputs) == 1 else f"grad_input.{i}"
    for k, t in rec.param_grads.items():
        if not finite(t):
            return f"grad_{k}"
    return None


def _deepest(names: list[str]) -> str:
    """The first name, or a unit inside it that qualifies too (a composite's child is the more precise culprit)."""
    first = names[0]
    inner = [n for n in names if n != first and (first == "" or n.startswith(first + "."))]
    return inner[0] if inner else first


def first_nonfinite(trace: Trace, step: int = 0) -> dict | None:
    """Where the first NaN/Inf of a step appeared: ``{"layer", "pass", "quantity", "step"}``, or None.

    Forward first: the earliest unit (forward order) whose outputs or buffers are non-finite while its inputs
    are finite produced it; then the backward: the earliest unit (backward order) whose gradients are
    non-finite while its grad_outputs are finite. A NaN that no unit produced (the inputs, code between
    units, the loss) is named by the first unit showing it, or ``loss``.
    """
    names = trace.forward_order
    # each unit's tensors scanned once (a full pass over every record of the step): what is wrong where
    bad_forward = {n: _bad_forward(trace[n]) for n in names}
    produced = [n for n in names if bad_forward[n] and _all_finite(trace[n].inputs)
                and _all_finite(trace[n].buffers_before.values())]
    if produced:
        name = _deepest(produced)
        return {"layer": name, "pass": "forward", "quantity": bad_forward[name], "step": step}
    shown = [n for n in names if bad_forward[n]]
    if shown:
        return {"layer": shown[0], "pass": "forward", "quantity": bad_forward[shown[0]], "step": step}
    if not finite(trace.output) or not finite(trace.loss):
        return {"layer": "loss", "pass": "forward", "quantity": "loss", "step": step}
    order = trace.backward_order
    bad_backward = {n: _bad_backward(trace[n]) for n in dict.fromkeys(order + names)}
    produced = [n for n in order if bad_backward[n] and _all_finite(trace[n].grad_outputs)]
    if produced:
        name = _deepest(produced)
        return {"layer": name, "pass": "backward", "quantity": bad_backward[name], "step": step}
    shown = [n for n in order + names if bad_backward[n]]
    if shown:
        return {"layer": shown[0], "pass": "backward", "quantity": bad_backward[shown[0]], "step": step}
    return None


def where(found: dict) -> str:
    """``block2.layer01.conv2 (forward output, step 0)``; the root module of a user model reads ``<model>``."""
    return f"{found['layer'] or '<model>'} ({found['pass']} {found['quantity']}, step {found['step']})"


def _fingerprint(trace: Trace) -> tuple | None:
    """Every tensor of ``trace`` by identity and version: equal fingerprints, the same values (a tensor replaced
    or written in place changes it). None when a tensor keeps no version (made under inference mode)."""
    tensors: list[object] = [trace.output, trace.loss]
    # a spilled trace's records as stored: its spilled tensors are not read back (all at once, that was the
    # whole trace in memory: 6.1 GB at BC-100 batch 16), and being written once, they cannot change
    records = trace.units.records() if isinstance(trace.units, StoredUnits) else trace
    for rec in records:
        tensors += [*rec.inputs, *rec.outputs, *rec.grad_outputs, *rec.grad_inputs]
        tensors += [*rec.param_grads.values(), *rec.buffers_before.values(), *rec.buffers_after.values()]
    try:
        return tuple((id(t), t._version) for t in tensors if isinstance(t, Tensor))
    except RuntimeError:
        return None


# Traces found finite, by id: (a weak reference, so a new trace reusing the id is not taken for it; fingerprint).
_FINITE: dict[int, tuple[weakref.ref, tuple]] = {}


def _known_finite(trace: Trace) -> bool:
    entry = _FINITE.get(id(trace))
    return entry is not None and entry[0]() is trace and entry[1] is not None and entry[1] == _fingerprint(trace)


def _remember_finite(trace: Trace) -> None:
    key = id(trace)
    _FINITE[key] = (weakref.ref(trace, lambda _, key=key: _FINITE.pop(key, None)), _fingerprint(trace))


def check_oracle(oracle: list[Trace], what: str = "the float64 oracle") -> None:
    """Raise :class:`NonFiniteOracle` naming the first NaN/Inf of ``oracle`` (one trace per step).

    A trace is scanned once: one found finite and unchanged since (:func:`_fingerprint`) is not scanned again
    (the oracle is checked where it is made and again by every judge of it)."""
    for step, trace in enumerate(oracle):
        if _known_finite(trace):
            continue
        found = first_nonfinite(trace, step)
        if found is None:
            _remember_finite(trace)
        else:
            raise NonFiniteOracle(f"{what} is itself non-finite (NaN/Inf), first at {where(found)}: there is no "
                                  "finite truth to judge against (a model or input that overflows or takes log/sqrt "
                                  "of a negative number in float64)")
