"""Propagated rows: a side's end-to-end step against the oracle, and what may explain a divergence.

Errors accumulate, so a propagated row is first judged against the first-order sum of the local tolerances
upstream (:func:`accumulated`). A row above it is not yet a fault: it may come from kinks
(:mod:`densenet_debug.verdict.counterfactual`, status ``kink``) or from upstream precision error amplified by a
correct unit (a train-mode BN backward at a small batch turns a tiny relative error in its grad_output into a
large one in its grad_input). :func:`self_consistent` settles the second: the unit's exact math, in fp64, at
the side's *own* propagated inputs and grad_outputs, must reproduce what the side computed there within the
unit's local bound. Only a divergence that fails that too (a state, sequence or fusion fault that no
teacher-forced replay shows), or a missing gradient, stays a ``mismatch``.

The rule explains or flags. Self-consistency alone explains nothing about where a unit's inputs went wrong,
so amplification is accepted only where the code *between* the units was checked too
(:mod:`densenet_debug.verdict.between`): a divergence is explained, in this order, by

1. kinks: the counterfactual oracle reproduces it (status ``kink``);
2. an upstream failing local or between-units row (:func:`explain_by_local`): it stays failing, with a note
   and ``explained_by`` naming the culprit (the verdict rests on the culprit's row);
3. amplification: nothing upstream failed, the between-units checks upstream of the unit passed (so every
   unit and every piece of code between them reproduced its own math at the side's own values), and the
   unit reproduces its exact math at its own propagated inputs (:func:`self_consistent`): status ``ok``.

Anything else stays a ``mismatch``. A fault between units that every unit is self-consistent about is a
failing between-units row, and every propagated row it moves is downstream of it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from densenet_debug.backends import Backend
from densenet_debug.trace import Trace, UnitRecord
from densenet_debug.verdict import kinks as kinkmod
from densenet_debug.verdict.compare import Comparison, compare, oracle_scale, relative_error
from densenet_debug.verdict.local import NONFINITE_NOTE, Composed, base, exact_bound, precision, with_teacher
from densenet_debug.verdict.nonfinite import finite
from densenet_debug.verdict.replay import Replay, exact_expectation, oracle_values, side_values
from densenet_debug.verdict.report import FAILING, Row, Status

PROPAGATED_ORIGIN = ("propagated: sum of the local tolerances of every unit upstream (first order, errors "
                     "passed on unamplified)")


def accumulated(local: list[Row]) -> tuple[dict[int, float], dict[int, float], float]:
    """First-order accumulation of local tolerances: running sums along forward and backward order."""
    fwd_tol: dict[int, float] = {}
    bwd_tol: dict[int, float] = {}
    for r in local:
        target = fwd_tol if r.pass_ == "forward" else bwd_tol
        target[r.order] = max(target.get(r.order, 0.0), r.tolerance)
    return running_sums(fwd_tol, bwd_tol)


Cumulative = tuple[dict[int, float], dict[int, float], float]


def running_sums(fwd_tol: dict[int, float], bwd_tol: dict[int, float]) -> Cumulative:
    """Per-unit tolerances (keyed by forward/backward order) summed along each order; backward starts where
    forward ends, since every backward quantity depends on the whole forward pass."""
    fwd_cum, running = {}, 0.0
    for i in sorted(fwd_tol):
        running += fwd_tol[i]
        fwd_cum[i] = running
    total_forward = running
    bwd_cum = {}
    for i in sorted(bwd_tol):
        running += bwd_tol[i]
        bwd_cum[i] = running
    return fwd_cum, bwd_cum, total_forward


def floor(cum: dict[int, float], order: int) -> float:
    keys = [k for k in cum if k <= order]
    return cum[max(keys)] if keys else 0.0


def propagated_tolerance(cum: Cumulative, pass_: str, order: int) -> float:
    """The first-order floor for a propagated quantity at ``order`` in its pass."""
    fwd_cum, bwd_cum, total_forward = cum
    return floor(fwd_cum, order) if pass_ == "forward" else max(floor(bwd_cum, order), total_forward)


def kink_sites(names: list[str], step: int, o_trace: Trace, s_trace: Trace,
                modules: dict[str, nn.Module]) -> list[kinkmod.KinkSite]:
    sites = []
    for name in names:
        module = modules[name]
        if not kinkmod.is_kinky(module) or name not in o_trace or name not in s_trace:
            continue
        o_in, s_in = o_trace[name].inputs, s_trace[name].inputs
        if not o_in or not s_in or o_in[0] is None or s_in[0] is None:
            continue
        site = kinkmod.find(name, step, module, o_in[0], s_in[0])
        if site is not None:
            sites.append(site)
    return sites


def propagated_rows(names: list[str], step: int, o_trace: Trace, s_trace: Trace, local: list[Row],
                     scales: dict | None = None) -> list[Row]:
    fwd_cum, bwd_cum, total_forward = accumulated(local)
    rows = []
    for name in names:
        if name not in o_trace:
            continue
        o_rec = o_trace[name]
        truth = oracle_values(o_rec)
        got = side_values(s_trace[name]) if name in s_trace else {}
        groups: dict[str, tuple[float, int | None, float]] = {}
        bad: set[str] = set()
        for key in truth:
            quantity, pass_, index = base(key)
            # on the scale of the terms the local rows of this quantity used (compare.oracle_scale's memo)
            scale = oracle_scale(truth[key], scales)
            err = relative_error(got.get(key), truth[key], scales)
            if not math.isfinite(err) and not finite(got.get(key)) and finite(truth[key]):
                bad.add(quantity)
            if quantity not in groups or err > groups[quantity][0]:
                groups[quantity] = (err, index, scale)
        for quantity, (err, _index, scale) in groups.items():
            pass_ = base(next(k for k in truth if base(k)[0] == quantity))[1]
            order = o_rec.forward_index if pass_ == "forward" else (o_rec.backward_index or 0)
            tol = propagated_tolerance((fwd_cum, bwd_cum, total_forward), pass_, order)
            status = Status.NONFINITE if quantity in bad else (Status.OK if err <= tol else Status.MISMATCH)
            rows.append(Row(layer=name, pass_=pass_, quantity=quantity, error_a=err, error_b=None, tolerance=tol,
                            status=status, origin=PROPAGATED_ORIGIN, step=step, mode="propagated", tolerance_a=tol,
                            ratio_a=err / tol if tol > 0 else (0.0 if err == 0 else math.inf), order=order,
                            note=NONFINITE_NOTE if quantity in bad else "", scale=scale))
    return rows


def explain_by_local(rows: list[Row], checks: list[Row]) -> None:
    """Failing propagated rows downstream of a failing local or between-units row are explained by it.

    Upstream means the same step and, for a forward row, a failing forward check at or before its unit; for a
    backward row, any failing forward check or a failing backward check at or before it in backward order. The
    row is not ok: a mismatch becomes ``downstream`` (the verdict already rests on the culprit), with a note
    naming it and ``explained_by`` set, so :func:`~densenet_debug.verdict.report.first_divergence` names the
    culprit, not the row; a non-finite row stays ``nonfinite``.
    """
    failing = [r for r in checks if r.status in FAILING]
    if not failing:
        return
    for r in rows:
        if r.status not in FAILING:
            continue
        ups = [f for f in failing if f.step == r.step and _upstream(f, r)]
        if not ups:
            continue
        first = min(ups, key=lambda f: (f.pass_ != "forward", f.order))
        what = "between-units" if first.mode == "between" else "local"
        r.note = r.note or (f"downstream of the {what} failure at {first.layer or '(the model)'} "
                            f"({first.pass_} {first.quantity})")
        r.explained_by = first.layer
        if r.status == Status.MISMATCH:
            r.status = Status.DOWNSTREAM


def _upstream(check: Row, row: Row) -> bool:
    if row.pass_ == "forward":
        return check.pass_ == "forward" and check.order <= row.order
    return check.pass_ == "forward" or check.order <= row.order


def _as_fp64(rec: UnitRecord) -> UnitRecord:
    """A copy of a side's record with every tensor in fp64 on the CPU (the side's values, exactly)."""
    def f(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        t = t.detach().to("cpu")
        return t.double() if t.is_floating_point() else t

    return UnitRecord(rec.name, rec.kind, rec.forward_index, rec.training, [f(t) for t in rec.inputs],
                      [f(t) for t in rec.outputs], [f(t) for t in rec.grad_outputs], [f(t) for t in rec.grad_inputs],
                      {k: f(v) for k, v in rec.param_grads.items()}, {k: f(v) for k, v in rec.buffers_before.items()},
                      {k: f(v) for k, v in rec.buffers_after.items()}, rec.input_layouts, rec.grad_output_layouts,
                      rec.backward_index, rec.calls)


def self_consistent(rows: list[Row], s_trace: Trace, modules64: dict[str, nn.Module], backend: Backend,
                    lam: float, composed: Composed | None = None) -> None:
    """Rows still failing: does the unit reproduce its own exact math at the side's own inputs?

    The unit is replayed in fp64 (clean weights of the step, no planted faults) on the side's propagated
    inputs and grad_outputs, with BN buffers as the side had them; its bound is re-derived at that point. A
    row whose side values match that replay within the bound diverged only because its inputs did (status
    ``ok``, with a note); the others stay ``mismatch``.

    A composite unit is held to the rule its local row was judged by (:func:`~.local.compose_tolerances`,
    ``composed``: per (step, unit, pass), the first-order sum of its descendants' local tolerances). Its replay
    runs its descendants too, and their roundings (a TF32 conv inside it, a BN backward's cancellation at a
    small batch) are in no bound of the composite's own: its own model is the generic |.|-evaluation, which
    knows neither. So the allowance is its own bound at the worst element plus that sum on the quantity's
    scale ``S`` (the same sum the local row added, in the same units), and the error is ``max |side - replay|``.
    """
    from densenet_debug.backends import parse_backend
    from densenet_debug.verdict.replay import replay_unit
    from densenet_debug.verdict.tolerance import unit_bounds

    fp64 = parse_backend("fp64", "cpu")
    # A missing or misshapen tensor (infinite error) is no amplification: those rows stay as they are.
    failing = sorted({r.layer for r in rows if r.status == "mismatch" and r.mode == "propagated"
                      and r.explained_by is None and r.error_a is not None and math.isfinite(r.error_a)})
    for name in failing:
        mine = [r for r in rows if r.layer == name and r.mode == "propagated"]
        step = mine[0].step
        scale = {r.quantity: r.scale or 0.0 for r in mine}  # S, on which the local tolerances were summed
        s_rec = s_trace.units.get(name)
        if s_rec is None or name not in modules64:
            continue
        rec64 = _as_fp64(s_rec)
        module = modules64[name]
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False)}
        bounds = unit_bounds(module, rec64, params)
        replay = replay_unit(module, rec64, None, fp64)
        expected = exact_expectation(module, _at(rec64, s_rec)) if bounds.exact else replay.values
        worst: dict[str, float] = {}
        for key, side_t in side_values(s_rec).items():
            quantity, pass_, _ = base(key)
            want = expected.get(key)
            if side_t is None and want is None:
                continue
            operands = [t for t in s_rec.inputs if t is not None]
            if bounds.exact:
                bound = exact_bound(side_t, operands)
            elif key in bounds:  # the replay is a float64 evaluation too: its own bound adds
                bound = with_teacher(bounds, key, precision(backend, name, bounds, side_t, operands, lam))
            else:
                bound = None
            found = compare(side_t, want, bound)
            extra = (composed or {}).get((step, name, pass_), 0.0) * scale.get(quantity, 0.0)
            ratio = found.ratio if extra <= 0 else _composed_ratio(found, extra)
            worst[quantity] = max(worst.get(quantity, 0.0), ratio)
        for r in rows:
            if (r.layer == name and r.status == "mismatch" and r.mode == "propagated" and math.isfinite(r.error_a)
                    and r.explained_by is None and worst.get(r.quantity, math.inf) <= 1):
                plus = " plus its descendants' local tolerances" if (step, name, r.pass_) in (composed or {}) else ""
                r.status = Status.OK
                r.note = (f"amplified upstream error: {name} reproduces its exact math at its own propagated inputs "
                          f"(fp64 replay, worst element at {worst[r.quantity]:.2f} of its bound{plus})")


def _composed_ratio(found: Comparison, extra: float) -> float:
    """``max |side - replay|`` over a composite's allowance: its own bound at the worst element plus ``extra``
    (its descendants' summed local tolerances, absolute), as :func:`~.local.compose_tolerances` judges."""
    if found.nonfinite or not math.isfinite(found.ratio):
        return math.inf
    err, own = found.error * found.scale, found.tolerance * found.scale
    return err / (own + extra) if own + extra > 0 else (0.0 if err == 0 else math.inf)


def _at(rec64: UnitRecord, s_rec: UnitRecord) -> Replay:
    """The side's own operands, for an exact op's expectation (its dtype decides the rounding allowed)."""
    return Replay(inputs=[None if t is None else t.detach().to("cpu").requires_grad_(g is not None)
                          for t, g in zip(s_rec.inputs, s_rec.grad_inputs + [None] * len(s_rec.inputs))],
                  grad_outputs=[None if g is None else g.detach() for g in s_rec.grad_outputs])


CARRIED_ORIGIN = ("state carried between steps: a unit's buffers at the start of a step must equal, bit for bit, "
                  "what it left at the end of its forward in the previous step")


def carried_state(names: list[str], step: int, before: dict[str, dict[str, Tensor]], now: Trace,
                  oracle_before: dict[str, dict[str, Tensor]] | None = None, oracle_now: Trace | None = None,
                  previous_rows: list[Row] | None = None) -> list[Row]:
    """One row per unit with buffers: did anything touch them between two steps (a recompute, a hook)?

    ``before``: each unit's ``buffers_after`` from the previous step. ``oracle_before``/``oracle_now``: the same
    of the float64 oracle. Where the oracle's own state changed between the steps too, the model's own code
    changed it (a BatchNorm inside a ``torch.utils.checkpoint`` region updates its running statistics again
    when backward recomputes it, on every backend): the side's carried value is then compared with the oracle's,
    allowing twice the widest tolerance the previous step's rows gave that buffer (two updates of the same kind
    instead of one; an integer counter must match exactly); without such a row there is no bound, and the row
    says so without failing.
    """
    rows = []
    for name in names:
        if name not in before or name not in now:
            continue
        left, found = before[name], now[name].buffers_before
        for key, t in found.items():
            prev = left.get(key)
            if prev is None:
                continue
            same = prev.shape == t.shape and bool(torch.equal(prev.to(t.device), t))
            if not same and _changed(oracle_before, oracle_now, name, key):
                rows.append(_own_change(name, key, step, t, oracle_now[name].buffers_before[key], previous_rows,
                                        now[name].forward_index))
                continue
            err = 0.0 if same else relative_error(t, prev.detach().to("cpu", torch.float64))
            rows.append(Row(layer=name, pass_="forward", quantity=f"{key} (carried)",
                            error_a=err if same else max(err, 1e-300), error_b=None, tolerance=0.0,
                            status=Status.OK if same else Status.MISMATCH, origin=CARRIED_ORIGIN, step=step,
                            mode="propagated", tolerance_a=0.0, ratio_a=0.0 if same else math.inf,
                            order=now[name].forward_index))
    return rows


def _own_change(name: str, key: str, step: int, side: Tensor, oracle: Tensor, previous_rows: list[Row] | None,
                order: int) -> Row:
    """The carried row of a buffer the model's own code changed between the steps (see :func:`carried_state`)."""
    bounds = [r.tolerance for r in previous_rows or () if r.layer == name and r.quantity == key
              and r.step == step - 1 and math.isfinite(r.tolerance)]
    err = relative_error(side, oracle.detach().to("cpu", torch.float64))
    note = "changed between the steps in the float64 oracle too: the model's own code (e.g. a BatchNorm " \
           "recomputed by a checkpoint); compared with the oracle's"
    if not side.is_floating_point():  # a counter (num_batches_tracked): exact, as its local row is
        bounds = [0.0]
    elif not bounds:
        return Row(layer=name, pass_="forward", quantity=f"{key} (carried)", error_a=err, error_b=None,
                   tolerance=0.0, status=Status.OK, origin=CARRIED_ORIGIN, step=step, mode="propagated",
                   tolerance_a=0.0, ratio_a=0.0, order=order, note=note + " (no bound: not judged)")
    tol = 2 * max(bounds)
    ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
    return Row(layer=name, pass_="forward", quantity=f"{key} (carried)", error_a=err, error_b=None, tolerance=tol,
               status=Status.OK if ratio <= 1 else Status.MISMATCH, origin=CARRIED_ORIGIN, step=step,
               mode="propagated", tolerance_a=tol, ratio_a=ratio, order=order, note=note)


def _changed(before: dict[str, dict[str, Tensor]] | None, now: Trace | None, name: str, key: str) -> bool:
    """Did the oracle's buffer ``key`` of ``name`` change between the end of its last forward and this step?"""
    if before is None or now is None or name not in before or name not in now:
        return False
    prev, t = before[name].get(key), now[name].buffers_before.get(key)
    return prev is not None and t is not None and not (prev.shape == t.shape and bool(torch.equal(prev, t)))
