"""The op engine's rows as rows of the one diff report: one verdict, one ``first_divergence`` naming the op.

:func:`add_ops` teacher-forces every aten op of both sides' steps on one shared fp64 oracle capture per step
(:func:`~densenet_debug.verdict.ops.judge_ops`) and hands both :class:`OpReport` s to :func:`merge_ops`, which

* merges them into rows of mode ``op`` (one per op call and quantity, both sides' figures, the worse side's
  status; the two sides' rows of one oracle op share its label, see
  :func:`~densenet_debug.verdict.report.merge_sides`);
* rolls them up: every unit's row (local, function, propagated, between, math) whose unit holds a failing op
  row of the same step and pass (for a between row: the module around its unit,
  :func:`~densenet_debug.verdict.report.region`) names the first such op in its note;
* combines the verdicts: a failing op row (``mismatch``, ``nonfinite``) is a finding of the report, an op row
  whose difference only rounding across a branch boundary explains is a ``kink`` (a finding with
  ``--fail-on kink``);
* gives ``first_divergence`` its ``op`` (:func:`~densenet_debug.verdict.report.with_op`) and extends the summary.

What is no row stays in ``settings["ops"]``, per side: how many ops were matched, the ops that ran on one side
only (never dropped silently), the elements where the side's own run took another branch, one summary line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug.backends import Backend, parse_backend
from densenet_debug.models.copies import dropout_off_for, fp64_copy, judging_mode
from densenet_debug.verdict.ops.judge import EMPTY, LossFn, OpReport, judge_ops, oracle_capture
from densenet_debug.verdict.ops.render import to_settings
from densenet_debug.verdict.report import (
    OP,
    ROOT,
    DiffReport,
    Row,
    SideResult,
    Status,
    failing_ops,
    fmt,
    inside,
    merge_sides,
    region,
    unit_of,
    with_op,
)


def add_ops(report: DiffReport, model: nn.Module, x: Tensor, y: Tensor, a: str | Backend | None = None,
            b: str | Backend | None = None, *, device: str | torch.device | None = None,
            eval_mode: bool | None = None, loss_fn: LossFn = F.cross_entropy,
            units: Sequence[str] | None = None, steps: int | None = None) -> DiffReport:
    """Judge every op of sides ``a`` and ``b`` (default: the report's) on one fp64 oracle capture of ``x, y``
    per step and merge the rows into ``report`` (:func:`merge_ops`); ``eval_mode`` and ``steps`` default to
    the report's settings. Between steps the weights move along the oracle's path, as the unit judge's do
    (:func:`_oracle_step`): step k's ops run from the float64 model after k of its SGD steps, buffers included.
    ``units`` (module names, as ``diff``'s): only the ops that ran inside one of them are kept, so an op outside
    what was asked for is neither a row nor a finding. ``model`` is not changed."""
    specs = (a if a is not None else report.a, b if b is not None else report.b)
    backends = [spec if isinstance(spec, Backend) else parse_backend(spec, device) for spec in specs]
    mode = bool(report.settings.get("eval", False)) if eval_mode is None else eval_mode
    steps = int(report.settings.get("steps", 1)) if steps is None else steps
    per_side: list[list[OpReport]] = [[] for _ in backends]
    sides = [be.prepare_model(model) for be in backends] if steps > 1 else [None] * len(backends)
    current = model
    for step in range(steps):
        oracle = oracle_capture(current, x, y, loss_fn=loss_fn, eval_mode=mode)
        for reports, be, side_model in zip(per_side, backends, sides):
            side = judge_ops(current, x, y, be, oracle_capture=oracle, loss_fn=loss_fn, eval_mode=mode,
                             side_model=side_model)
            reports.append(_at_step(_within(side, units) if units else side, step))
        if step + 1 < steps:
            current = _oracle_step(current, x, y, loss_fn, mode, sides)
    return merge_ops(report, [_joined(reports) for reports in per_side])


@dropout_off_for
def _oracle_step(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, eval_mode: bool,
                 sides: list[nn.Module | None]) -> nn.Module:
    """The float64 model one step on, as the unit judge moves it (``verdict.engine``): a plain step (its BN
    buffers move as the oracle's do), then every model, the oracle's and each side's, takes the SGD update with
    the oracle's gradients (``LEARNING_RATE``). A side keeps its own state otherwise (its buffers, a weight cache
    its kernels hold), so a fault that shows only from the second step shows in its ops too."""
    from densenet_debug.verdict.engine import LEARNING_RATE

    ref = judging_mode(fp64_copy(model, "cpu"), eval_mode)
    target = y.detach().to("cpu", torch.float64) if y.is_floating_point() else y.detach().cpu()
    ref.zero_grad(set_to_none=True)
    loss_fn(ref(x.detach().to("cpu", torch.float64)), target).backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for m in [ref, *(s for s in sides if s is not None)]:
            for n, p in m.named_parameters():
                if n in grads:
                    p.sub_(LEARNING_RATE * grads[n].to(p.device, p.dtype))
    ref.zero_grad(set_to_none=True)
    return ref


def _at_step(side: OpReport, step: int) -> OpReport:
    return side if step == 0 else replace(side, rows=[replace(r, step=step) for r in side.rows])


def _joined(reports: list[OpReport]) -> OpReport:
    """One side's op reports of every step as one (rows carry their step; counts add up)."""
    if len(reports) == 1:
        return reports[0]
    skipped: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for r in reports:
        for why, n in r.skipped.items():
            skipped[why] = skipped.get(why, 0) + n
        for what, t in r.seconds.items():
            seconds[what] = seconds.get(what, 0.0) + t
    return OpReport(backend=reports[0].backend, rows=[row for r in reports for row in r.rows],
                    unmatched=[u for r in reports for u in r.unmatched], kinks=[k for r in reports for k in r.kinks],
                    matched=sum(r.matched for r in reports),
                    second_pass_matched=sum(r.second_pass_matched for r in reports), skipped=skipped,
                    seconds=seconds)


def _within(side: OpReport, units: Sequence[str]) -> OpReport:
    """``side`` less the op rows, one-side ops and kinks that ran outside every one of ``units``."""
    def kept(module: str) -> bool:
        return any(inside(module, u) for u in units)

    return replace(side, rows=[r for r in side.rows if kept(unit_of(r.layer))],
                   unmatched=[u for u in side.unmatched if kept(u.unit)],
                   kinks=[k for k in side.kinks if kept(k.unit)])


def merge_ops(report: DiffReport, sides: Sequence[OpReport]) -> DiffReport:
    """``report`` with the op rows of ``sides`` (side a's, then side b's) as rows of its own; see the module
    docstring. Changes ``report`` in place and returns it; a report takes op rows once."""
    if len(sides) != 2:
        raise ValueError(f"merge_ops takes the op reports of sides a and b, got {len(sides)}")
    if any(r.mode == OP for r in report.rows):
        raise ValueError("this report has op rows already")
    a, b = sides
    rows = merge_sides(SideResult(a.backend, a.rows, [], {}, []), SideResult(b.backend, b.rows, [], {}, []))
    rows.sort(key=lambda r: (r.step, r.order))
    kinks_fail = report.settings.get("fail_on") == "kink"
    failing = failing_ops(rows, kinks_fail)
    roll_up(report.rows, failing)
    report.rows += rows
    report.settings["ops"] = [to_settings(side) for side in sides]
    before = report.verdict
    report.first_divergence = with_op(report.first_divergence, report.rows, kinks_fail)
    if failing:
        report.verdict = "mismatch"
    report.summary = _summary(report, before, rows, failing)
    return report


def roll_up(rows: list[Row], failing: list[Row]) -> None:
    """Each unit row whose unit holds failing op rows of its step and pass names the first of them in its note."""
    if not failing:
        return
    for r in rows:
        if r.mode == OP:
            continue
        unit = region(r.layer, r.mode)
        held = [o for o in failing if o.step == r.step and o.pass_ == r.pass_ and inside(unit_of(o.layer), unit)]
        if not held:
            continue
        more = f" (+{len(held) - 1} more failing op output(s))" if len(held) > 1 else ""
        text = f"failing op inside: {held[0].layer} · {held[0].quantity} ({held[0].status}){more}"
        r.note = "; ".join(filter(None, [r.note, text]))


def _who(report: DiffReport, side: str | None) -> str:
    return {"a": report.a, "b": report.b, "both": f"{report.a} and {report.b}"}.get(side or "", "?")


def _not_judged(report: DiffReport) -> str:
    """The op calls each side left unjudged, by reason (``settings["ops"][i]["skipped"]``), or "": allocations
    (uninitialised outputs) hold nothing to judge and are not counted."""
    parts = []
    for side in report.settings.get("ops", []):
        why = {reason: n for reason, n in (side.get("skipped") or {}).items() if reason != EMPTY}
        if why:
            parts.append(f"{side['backend']} " + ", ".join(f"{n} {reason}" for reason, n in sorted(why.items())))
    return "; ".join(parts)


def _summary(report: DiffReport, before: str, rows: list[Row], failing: list[Row]) -> str:
    """The report's line: as the unit-level check wrote it, with the op that fails inside its first divergence,
    or led by the first failing op when only op rows fail."""
    judged = {r.layer for r in rows if r.origin != "not replayed"}
    tail = (f"; per-op check: {len(judged)} op call(s) compared on the oracle's inputs, "
            f"{len({r.layer for r in failing})} failing")
    skipped = _not_judged(report)
    if skipped:  # an op call no row judges is said, never dropped silently (random ops, replays that raised)
        tail += f"; not judged: {skipped}"
    kinks = sum(r.status == Status.KINK for r in rows)
    if kinks and not failing:
        tail += f", {kinks} op output(s) within tolerance once rounding across a branch boundary is left out (kink)"
    first = report.first_divergence
    if before == "mismatch":
        op = first.get("op") if first is not None else None
        inner = f" (inside {first['layer'] or ROOT}, op {op} fails first)" if op else ""
        return report.summary + tail + inner
    if not failing:
        return report.summary + tail
    r = failing[0]
    if r.status == Status.KINK:  # --fail-on kink: within tolerance once the elements across a boundary are out
        return (f"mismatch: {_who(report, r.side)} took the other branch of a piecewise op at op {r.layer} "
                f"({r.pass_} {r.quantity}, teacher-forced op, step {r.step}): {r.note or 'kink'}{tail}; unit level: "
                f"{report.summary}")
    what = "non-finite (NaN/Inf where the fp64 oracle is finite)" if r.status == Status.NONFINITE else "wrong"
    error = r.error_a if r.side in ("a", "both") else r.error_b
    return (f"mismatch: {_who(report, r.side)} {what} at op {r.layer} ({r.pass_} {r.quantity}, teacher-forced "
            f"op, step {r.step}): error {fmt(error)} > tolerance {fmt(r.tolerance)}{tail}; unit level: "
            f"{report.summary}")


__all__ = ["add_ops", "merge_ops", "roll_up"]
