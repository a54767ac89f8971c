"""Rows, per-side results and the diff report, with the JSON contract ``densenet-debug/diff/3``.

diff/3 (from diff/2): row mode ``op`` (``diff --ops``, :func:`densenet_debug.verdict.ops.add_ops`): one aten op
call of the first step teacher-forced on the fp64 oracle's inputs to it, ``layer`` ``module · aten.op`` (`` #k``
for the k-th call of that op in that module), with ``module`` and ``op`` (the overload, ``.default`` left out)
as keys of their own; ``first_divergence`` gains ``op`` (the first failing op inside the unit it names, in the
op stream's order, or null); a unit's row that holds a failing op names it in its ``note``; ``settings["ops"]``
keeps per side what is no row (ops matched, ops run on one side only, kinks of the side's own run, one line).

diff/2 (from diff/1): rows gain ``ratio``, ``ratio_a``/``ratio_b`` and ``scale`` (errors and tolerances read on the
scale of the terms); new row modes ``between`` (the code between units) and ``math`` (custom autograd Functions
against finite differences); new statuses ``nonfinite``, ``math`` (findings) and ``downstream`` (explained by a
failing check upstream); ``settings`` may hold ``math_check``. Every diff/1 key is kept. Row mode
``function``: a custom autograd Function's call replayed whole, teacher-forced like a unit (``layer`` is
``module · Class``, :mod:`densenet_debug.verdict.functions`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum

from densenet_debug.capture.records import OUTSIDE

SCHEMA = "densenet-debug/diff/3"


class Status(str, Enum):
    """A row's status; a ``str`` (JSON, comparisons and formatting see the plain value)."""

    OK = "ok"
    KINK = "kink"  # a divergence explained by a ReLU branch flip within rounding of its boundary
    MISMATCH = "mismatch"  # outside the derived tolerance: a finding
    NONFINITE = "nonfinite"  # NaN/Inf where the oracle is finite: a finding, never "within tolerance"
    MATH = "math"  # a custom autograd Function's backward is not its forward's derivative (verdict.mathcheck)
    DOWNSTREAM = "downstream"  # a propagated divergence explained by a failing check upstream of it: not ok,
    # not a finding of its own (the verdict rests on the upstream row)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


STATUS_ORDER = {Status.OK: 0, Status.KINK: 1, Status.DOWNSTREAM: 2, Status.MISMATCH: 3, Status.NONFINITE: 4,
                Status.MATH: 5}
FAILING = (Status.MISMATCH, Status.NONFINITE, Status.MATH)
OP = "op"  # row mode of one aten op call replayed on the oracle's inputs (verdict.ops)
TEACHER_FORCED = ("local", "function", OP)  # row modes that localise: a unit (module, custom Function, op) replayed
ROOT = "(model)"  # the unit of the model's own forward: every op is inside it


@dataclass
class Row:
    """One quantity of one unit in one step, local (teacher-forced) or propagated (end to end).

    ``error_*`` is ``max |side - oracle| / scale``, ``scale`` the quantity's max sum |terms| from its error
    model (at least max |oracle|; :mod:`densenet_debug.verdict.compare`: never a truth that cancels to ~0);
    ``tolerance`` the scalar that the derived elementwise bound implies at the worst element, on the same
    scale (so ``error > tolerance`` exactly when some element exceeds its bound); ``ratio_*`` is that worst
    element's error over its bound. Propagated rows compare against an accumulated tolerance instead (see
    ``origin``).
    """

    layer: str
    pass_: str  # "forward" | "backward"
    quantity: str
    error_a: float | None
    error_b: float | None
    tolerance: float
    status: Status
    origin: str
    step: int = 0
    mode: str = "local"  # "local" | "propagated"
    side: str | None = None  # the side(s) that fail: "a", "b", "both"
    tolerance_a: float | None = None
    tolerance_b: float | None = None
    ratio_a: float | None = None
    ratio_b: float | None = None
    worst_a: tuple[int, ...] | None = None
    worst_b: tuple[int, ...] | None = None
    order: int = 0  # forward index for forward quantities, backward index for backward ones
    note: str = ""
    explained_by: str | None = None  # a failing descendant unit that is the culprit instead (not in the JSON)
    scale: float | None = None  # what error and tolerance are relative to (the scale of the terms)
    op: str | None = None  # an op row's aten op overload ("aten.convolution_backward", "aten.div.Tensor")

    def to_json(self) -> dict:
        out = {"layer": self.layer, "pass": self.pass_, "quantity": self.quantity, "error_a": _num(self.error_a),
               "error_b": _num(self.error_b), "tolerance": _num(self.tolerance), "status": str(self.status),
               "origin": self.origin, "step": self.step, "mode": self.mode, "side": self.side,
               "tolerance_a": _num(self.tolerance_a), "tolerance_b": _num(self.tolerance_b),
               "ratio_a": _num(self.ratio_a), "ratio_b": _num(self.ratio_b),
               "worst_a": list(self.worst_a) if self.worst_a else None,
               "worst_b": list(self.worst_b) if self.worst_b else None, "ratio": _num(self.worst_ratio),
               "scale": _num(self.scale)}
        if self.op is not None:
            out["module"], out["op"] = unit_of(self.layer), self.op
        if self.note:
            out["note"] = self.note
        return out

    @property
    def key(self) -> tuple:
        return (self.step, self.mode, self.layer, self.quantity)

    @property
    def worst_ratio(self) -> float:
        return max((r for r in (self.ratio_a, self.ratio_b) if r is not None), default=0.0)


@dataclass
class UnitKink:
    """Kinks of one side at one unit: how many elements took the other branch, and the closest call."""

    layer: str
    count: int
    min_margin: float
    relative_margin: float
    side: str
    step: int = 0
    mode: str = "propagated"

    def to_json(self) -> dict:
        return {"layer": self.layer, "count": self.count, "min_margin": self.min_margin,
                "relative_margin": self.relative_margin, "side": self.side, "step": self.step, "mode": self.mode}


@dataclass
class SideResult:
    """What :func:`densenet_debug.verdict.engine.judge` finds for one backend: rows (error in ``error_a``) and kinks."""

    backend: str
    rows: list[Row]
    kinks: list[UnitKink]
    flags: dict
    units: list[str]
    checked_elements: int = 0
    counterfactual_steps: list[int] = field(default_factory=list)
    nonfinite: list[dict] = field(default_factory=list)  # per step with a NaN/Inf: where it was first produced

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status in FAILING]


@dataclass
class DiffReport:
    verdict: str  # "agree" | "mismatch"
    first_divergence: FirstDivergence | None
    rows: list[Row]
    kinks: list[UnitKink]
    environment: dict
    a: str = ""
    b: str = ""
    settings: dict = field(default_factory=dict)
    summary: str = ""

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "verdict": self.verdict, "first_divergence": to_json_or_none(self.first_divergence),
                "rows": [r.to_json() for r in self.rows], "kinks": [k.to_json() for k in self.kinks],
                "environment": self.environment, "a": self.a, "b": self.b, "settings": self.settings,
                "summary": self.summary}

    def worst_rows(self, n: int = 15) -> list[Row]:
        """Failing rows first, then the rows closest to their tolerance."""
        return sorted(self.rows, key=lambda r: (-STATUS_ORDER[r.status], -sortable(r.worst_ratio)))[:n]


def merge_sides(a: SideResult, b: SideResult) -> list[Row]:
    """One row per (step, mode, unit, quantity) with both sides' errors; status = the worse side's."""
    by_key: dict[tuple, Row] = {}
    for r in a.rows:
        by_key[r.key] = Row(layer=r.layer, pass_=r.pass_, quantity=r.quantity, error_a=r.error_a, error_b=None,
                            tolerance=r.tolerance, status=r.status, origin=r.origin, step=r.step, mode=r.mode,
                            side="a" if r.status != Status.OK else None, tolerance_a=r.tolerance, ratio_a=r.ratio_a,
                            worst_a=r.worst_a, order=r.order, note=r.note,
                            explained_by=r.explained_by, scale=r.scale, op=r.op)
    for r in b.rows:
        row = by_key.get(r.key)
        if row is None:
            by_key[r.key] = Row(layer=r.layer, pass_=r.pass_, quantity=r.quantity, error_a=None, error_b=r.error_a,
                                tolerance=r.tolerance, status=r.status, origin=r.origin, step=r.step, mode=r.mode,
                                side="b" if r.status != Status.OK else None, tolerance_b=r.tolerance,
                                ratio_b=r.ratio_a, worst_b=r.worst_a, order=r.order, note=r.note,
                                explained_by=r.explained_by, scale=r.scale, op=r.op)
            continue
        row.scale = row.scale if row.scale is not None else r.scale
        row.error_b, row.tolerance_b, row.ratio_b, row.worst_b = r.error_a, r.tolerance, r.ratio_a, r.worst_a
        a_rank, b_rank = STATUS_ORDER[row.status], STATUS_ORDER[r.status]
        if b_rank > a_rank or (b_rank == a_rank and sortable(r.ratio_a or 0) > sortable(row.ratio_a or 0)):
            row.tolerance, row.origin = r.tolerance, r.origin
        if b_rank > a_rank:
            row.explained_by = r.explained_by if r.note else row.explained_by  # follows the note kept
            row.status, row.side, row.note = r.status, "b", r.note or row.note
        elif b_rank == a_rank and b_rank > 0:
            row.side = "both"
            row.explained_by = row.explained_by if row.note else r.explained_by  # the note that leads
            if r.note and r.note not in row.note:
                row.note = "; ".join(filter(None, [row.note, r.note]))
    return list(by_key.values())


@dataclass
class FirstDivergence:
    """Where a report first fails; ``error``/``tolerance`` as written to JSON (``"inf"``/``"nan"`` as strings).

    ``op``: the first failing aten op inside that unit (:func:`with_op`); when only op rows fail, ``layer`` is
    that op's module and ``mode`` is ``op``. Read by key too (``report.first_divergence["layer"]``,
    ``.get("side")``): the keys of :meth:`to_json`.
    """

    layer: str
    pass_: str
    quantity: str
    error: float | str | None
    tolerance: float | str | None
    side: str | None
    step: int
    mode: str
    status: str
    op: str | None = None

    def to_json(self) -> dict:
        return {"layer": self.layer, "pass": self.pass_, "quantity": self.quantity, "error": self.error,
                "tolerance": self.tolerance, "side": self.side, "step": self.step, "mode": self.mode,
                "status": self.status, "op": self.op}

    def __getitem__(self, key: str) -> object:
        return self.to_json()[key]

    def get(self, key: str, default: object = None) -> object:
        return self.to_json().get(key, default)


def first_divergence(rows: list[Row], kinks_fail: bool = False) -> FirstDivergence | None:
    """The earliest failing unit: local failures first (they localise), forward before backward; a failing
    composite whose failing descendant explains it (``explained_by``) is passed over while a culprit remains.
    Op rows name the op inside it (:func:`with_op`), or are the first divergence when no unit's row fails."""
    def rank(r: Row) -> tuple:
        return (r.mode not in TEACHER_FORCED, r.step, r.pass_ != "forward", r.order)

    failing = [r for r in rows if r.mode != OP and _fails(r, kinks_fail)]
    if not failing:
        return with_op(None, rows, kinks_fail)
    culprits = [r for r in failing if r.explained_by is None]
    return with_op(_first_of(min(culprits or failing, key=rank)), rows, kinks_fail)


def with_op(first: FirstDivergence | dict | None, rows: list[Row],
            kinks_fail: bool = False) -> FirstDivergence | dict | None:
    """``first`` with ``op``: the first failing op row (in the op stream's order, forward before backward) whose
    module is ``first``'s unit or below it; None when none is. No ``first`` (no unit's row fails): the first
    failing op row itself, its module as ``layer``; None when no op row fails either."""
    ops = failing_ops(rows, kinks_fail)
    if first is None:
        return _first_of(ops[0]) if ops else None
    unit = region(str(first["layer"]), str(first["mode"]))
    op = next((r.op for r in ops if inside(unit_of(r.layer), unit)), None)
    if isinstance(first, dict):  # an engine's hand-built first (a kink with --fail-on kink)
        return {**first, "op": op}
    return dataclasses.replace(first, op=op)


def failing_ops(rows: list[Row], kinks_fail: bool = False) -> list[Row]:
    """The failing op rows, in the order their ops ran (step, then the oracle's op stream)."""
    return sorted((r for r in rows if r.mode == OP and _fails(r, kinks_fail)), key=lambda r: (r.step, r.order))


def unit_of(layer: str) -> str:
    """The module path a row's ``layer`` names (``"dense.1 · CatFn"``, ``"dense.1 · aten.cat #2"`` -> ``dense.1``)."""
    return layer.split(" · ")[0]


def region(layer: str, mode: str) -> str:
    """The module whose ops a row's check covers: its unit; for a ``between`` row (the code between the unit
    and what consumes it, which runs in the forward of the module around the unit) the unit's parent."""
    unit = unit_of(layer)
    if mode != "between":
        return unit
    return unit.rsplit(".", 1)[0] if "." in unit else ROOT


def inside(module: str, unit: str) -> bool:
    """``module`` is ``unit`` or a submodule of it; every module is inside the model's own forward, the ops that
    ran outside the model (the loss, backward's seed: ``OUTSIDE``) are inside no unit."""
    if module == OUTSIDE:
        return unit == OUTSIDE
    return unit in (ROOT, "") or module == unit or module.startswith(unit + ".")


def _fails(r: Row, kinks_fail: bool) -> bool:
    return r.status in FAILING or (kinks_fail and r.status == Status.KINK)


def _first_of(r: Row) -> FirstDivergence:
    side = r.side if r.side in ("a", "b") else ("a" if (r.ratio_a or 0) >= (r.ratio_b or 0) else "b")
    error = r.error_a if side == "a" else r.error_b
    return FirstDivergence(layer=unit_of(r.layer) if r.mode == OP else r.layer, pass_=r.pass_, quantity=r.quantity,
                           error=_num(error), tolerance=_num(r.tolerance), side=r.side, step=r.step, mode=r.mode,
                           status=str(r.status), op=r.op if r.mode == OP else None)


def to_json_or_none(first: FirstDivergence | dict | None) -> dict | None:
    """``first_divergence`` as JSON: None stays None; a plain dict (an older caller's) passes through."""
    return first.to_json() if isinstance(first, FirstDivergence) else first


def sortable(v: float | None) -> float:
    """A ratio as a sort key: None and NaN rank as 0, inf above every finite value."""
    if v is None or math.isnan(v):
        return 0.0
    return 1e300 if math.isinf(v) else v


def fmt(v: object) -> str:
    """A JSON number for a summary line: floats to 3 significant digits, anything else (``"inf"``) as is."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _num(v: float | None) -> float | str | None:
    """JSON has no inf/nan: write them as strings."""
    if v is None:
        return None
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(v)
