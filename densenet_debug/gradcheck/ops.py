"""Per-op units for gradcheck: every op a composite runs in its own ``forward``, checked alone.

A leaf module is a unit with its own rows; a composite's own code (``F.relu(self.bn1(x))``,
``torch.cat((x, out), 1)`` in a user's ``forward``, an in-place ``F.relu(features, inplace=True)`` before the
pool, a ``torch.library.custom_op`` with a hand-registered backward) is checked only as part of the
composite's row, which says *that* the composite is wrong, not *which op*. So the composite's forward is
captured once at op level (:func:`densenet_debug.capture.capture`, float64, values kept), and each op that
ran directly under a selected composite (not inside a unit of its own) and carries a gradient becomes a unit:
the op overload as a function of its floating tensor arguments, its backward replayed on them in the exact
layouts they had (size, stride, storage offset), everything else as recorded. It is checked like any unit
(:func:`densenet_debug.gradcheck.engine.gradcheck_unit`: same directions, error model and op-level kink
handling, so a ReLU input near 0 is a kink, not a failure), with Gaussian grad_outputs: the question is
whether the op's backward is the derivative of its forward at the inputs it really had; which gradient
it was handed in the step is the composite's row's question.

An in-place op writes one of its arguments: its unit writes into a copy, so every evaluation starts from
the recorded value. Ops whose outputs carry no gradient (``detach``, comparisons, sizes), ops without a
floating input, and ops whose call cannot be rebuilt from the record are not units. A row is named
``module · op`` (``dense1.3 · aten.cat.default``), with ``#k`` for the k-th call of the same op there; a
failing op explains the composite around it (:func:`~densenet_debug.gradcheck.report.mark_culprits`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from densenet_debug.capture import OpRecord, capture
from densenet_debug.models.copies import fp64_copy
from densenet_debug.trace import Layout
from densenet_debug.verdict.ops.replay import Unreplayable, rebuild_call

__all__ = ["OpCase", "OpUnit", "composite_ops"]


class OpUnit(nn.Module):
    """One recorded op as a module of its floating tensor arguments (the others fixed as recorded)."""

    def __init__(self, record: OpRecord, values: Sequence[Tensor | None]) -> None:
        super().__init__()
        self.record = record
        self.fixed = list(values)
        self.slots = [i for i, v in enumerate(values) if isinstance(v, Tensor) and v.is_floating_point()]

    def forward(self, *tensors: Tensor) -> object:
        args = list(self.fixed)
        for i, t in zip(self.slots, tensors):
            args[i] = t.clone() if i in self.record.written else t  # an in-place op writes into a copy
        return rebuild_call(self.record, args).run()

    def extra_repr(self) -> str:
        return self.record.label


OpCase = tuple[str, OpUnit, list[Tensor], list[Layout]]  # row name, unit, inputs, their layouts


def composite_ops(model: nn.Module, x: Tensor, composites: Sequence[str], *, eval_mode: bool) -> list[OpCase]:
    """``(row name, unit, inputs, their layouts)`` for every op run directly under one of ``composites`` in a
    float64 forward of a copy of ``model`` (its state untouched), in the order the ops ran."""
    wanted = set(composites)
    if not wanted:
        return []
    copy = fp64_copy(model, str(x.device))
    copy.train(not eval_mode)
    x64 = x.detach().to(torch.float64)
    with torch.enable_grad(), capture(copy, values=True) as cap:
        copy(x64)
    out: list[OpCase] = []
    seen: dict[tuple[str, str], int] = {}
    for rec in cap.phase("forward"):
        if rec.module not in wanted or rec.input_values is None:
            continue
        made = _unit(rec)
        if made is None:
            continue
        k = seen.get((rec.module, rec.op), 0)
        seen[(rec.module, rec.op)] = k + 1
        label = rec.op if k == 0 else f"{rec.op}#{k + 1}"
        name = f"{rec.module} · {label}" if rec.module else label
        out.append((name, *made))
    return out


def _unit(rec: OpRecord) -> tuple[OpUnit, list[Tensor], list[Layout]] | None:
    """The op of ``rec`` as a unit with its recorded inputs and their layouts, or None when it is none."""
    values = list(rec.input_values or [])
    if len(values) != len(rec.input_layouts):
        return None
    unit = OpUnit(rec, values)
    if not unit.slots:
        return None
    inputs = [values[i].detach().requires_grad_(True) for i in unit.slots]
    try:
        with torch.enable_grad():
            outs = unit(*inputs)
    except (Unreplayable, RuntimeError, TypeError):
        return None
    flat = outs if isinstance(outs, (list, tuple)) else [outs]
    if not any(isinstance(o, Tensor) and o.requires_grad for o in flat):
        return None  # no gradient flows through it (detach, a comparison, a size)
    layouts = [Layout(rec.input_layouts[i].size, rec.input_layouts[i].stride, rec.input_layouts[i].storage_offset)
               for i in unit.slots]
    return unit, [values[i].detach() for i in unit.slots], layouts
