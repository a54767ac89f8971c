"""The verdict engine: is a backend's gradient wrong, where, and is it a bug or precision noise?

* The **oracle** is the same model, weights, inputs, labels and BN state in float64 on the CPU
  (:func:`oracle_traces`, one :class:`~densenet_debug.trace.Trace` per step).
* **Local (teacher-forced)** rows: every unit of the side's prepared model is re-run on the oracle's inputs
  and grad_outputs, in the dtype and memory layout the side saw (:mod:`densenet_debug.replay`), and each
  output, input grad, parameter grad and BN buffer is checked elementwise against a bound *derived* from the
  unit roundoffs and an error model of the op (:mod:`densenet_debug.tolerance`). A side is wrong at a unit
  only when a local row fails.
* **Propagated** rows: the side's end-to-end trace against the oracle. Errors accumulate, so these are
  judged against the first-order sum of the local tolerances upstream. Kinks (:mod:`densenet_debug.kinks`)
  cannot move forward values by more than their margin, but they do move gradients: a backward divergence
  is explained (status ``kink``) when the side agrees with the *counterfactual* oracle that takes the side's
  branch at exactly its kink elements. A divergence that neither a local failure nor the kinks explain is
  a ``mismatch`` too: a state, wiring or fusion fault no single unit shows.
* Several steps: between steps every copy takes the same in-place SGD step made from the *oracle's*
  gradients (so weights change as in training, caches keyed on weights are exercised, and all sides keep
  the same weights); BN running buffers carry over and are compared every step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug import counterfactual
from densenet_debug import kinks as kinkmod
from densenet_debug.backends import Backend, default_pair, environment, parse_backend, unit_roundoff
from densenet_debug.counterfactual import traced_step_with_gates
from densenet_debug.errors import UsageError
from densenet_debug.replay import exact_expectation, oracle_values, replay_unit, side_values
from densenet_debug.report import DiffReport, Kink, Row, SideResult, first_divergence, merge_sides
from densenet_debug.tolerance import (
    Precision,
    UnitBounds,
    abs_difference,
    compare,
    confidence,
    oracle_scale,
    underflow,
    unit_bounds,
)
from densenet_debug.trace import Trace, discover_units, trace_step

LEARNING_RATE = 0.1  # the shared SGD step between steps; any value that changes the weights will do
LossFn = Callable[[Tensor, Tensor], Tensor]
FAIL_ON = ("mismatch", "kink")

__all__ = ["DiffReport", "Kink", "Row", "SideResult", "diff", "judge", "local_check", "oracle_traces", "release"]


# -- preparing copies -------------------------------------------------------------------------------------
def _set_mode(model: nn.Module, eval_mode: bool) -> nn.Module:
    model.train(not eval_mode)
    for m in model.modules():  # dropout draws differ between dtypes; its randomness is no backend property
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model


def _fp64(model: nn.Module, eval_mode: bool) -> nn.Module:
    ref = copy.deepcopy(model).to("cpu", torch.float64)
    return _set_mode(ref, eval_mode)


def _unit_names(model: nn.Module, x: Tensor, units: object) -> list[str] | object:
    """The units to judge: every unit :func:`discover_units` finds (the model's state is kept), or the names
    given plus every computing unit inside them (a composite's tolerance is built from its descendants')."""
    if callable(units):
        return units
    param = next(model.parameters(), None)
    like = x.detach().to(param.device, param.dtype) if param is not None and param.is_floating_point() else x
    found = discover_units(model, like)
    if units is None:
        return found
    chosen = list(dict.fromkeys(units))
    inside = [n for n in found if n not in chosen and any(n.startswith(c + ".") for c in chosen if c)]
    return chosen + inside


def _sgd_step(model: nn.Module, trace: Trace) -> None:
    """In place, every traced parameter moves by -lr * (the oracle's gradient)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for rec in trace:
            module = modules.get(rec.name)
            if module is None:
                continue
            for pname, g in rec.param_grads.items():
                p = getattr(module, pname)
                p.sub_(LEARNING_RATE * g.to(p.device, p.dtype))


def _params64(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().to("cpu", torch.float64) for n, p in module.named_parameters(recurse=False)}


def _input(x: Tensor, device: torch.device, dtype: torch.dtype, backend: Backend | None = None) -> Tensor:
    """A copy of the inputs for one side; inputs that require grad keep requiring it (their grad is checked)."""
    out = backend.prepare_input(x.detach()) if backend is not None else x.detach().to(device, dtype)
    return out.requires_grad_(x.requires_grad)


def _target(y: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Labels keep their dtype; a floating target (a custom loss's) takes the side's dtype."""
    return y.detach().to(device, dtype) if y.is_floating_point() else y.detach().to(device)


def _check_inputs(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise UsageError("inputs must be a floating-point tensor")
    if not isinstance(y, Tensor) or y.shape[:1] != x.shape[:1]:
        raise UsageError(f"labels must be a tensor with one entry per sample ({x.shape[0]})")


# -- the oracle --------------------------------------------------------------------------------------------
def oracle_traces(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 1, eval_mode: bool = False,
                  units: object = None, loss_fn: LossFn = F.cross_entropy, keep_graph: bool = True) -> list[Trace]:
    """The fp64 CPU truth: ``steps`` traced steps of a float64 copy of ``model`` (``model`` is untouched).

    ``keep_graph`` keeps each step's autograd graph (``trace.retained``) so that kinks can be explained by one
    more fp64 backward instead of a whole step; :func:`release` frees it.
    """
    _check_inputs(x, y)
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    ref = _fp64(model, eval_mode)
    names = _unit_names(model, x, units)
    x64, y64 = _input(x, torch.device("cpu"), torch.float64), _target(y, torch.device("cpu"), torch.float64)
    traces = []
    for step in range(steps):
        trace = traced_step_with_gates(ref, x64, y64, names, loss_fn) if keep_graph else trace_step(
            ref, x64, y64, units=names, loss_fn=loss_fn)
        traces.append(trace)
        if step + 1 < steps:
            if keep_graph:  # the kept graph saved these weights: the next step updates a copy, not them
                ref = _detached_copy(ref)
            _sgd_step(ref, trace)
    return traces


def _detached_copy(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        return copy.deepcopy(model)


def release(oracle: list[Trace]) -> None:
    """Free the autograd graphs :func:`oracle_traces` kept for counterfactuals (the traces stay valid)."""
    for trace in oracle:
        if getattr(trace, "retained", None) is not None:
            trace.retained = None


# -- one side ---------------------------------------------------------------------------------------------
QUANTITY_PASS = {"output": "forward", "buffer": "forward"}


def _base(key: str) -> tuple[str, str, int | None]:
    """``grad_input.3`` -> (``grad_input``, ``backward``, 3); ``buffer.running_mean`` -> (``running_mean``...)."""
    head, _, tail = key.partition(".")
    if head == "buffer":
        return tail, "forward", None
    index = int(tail) if tail.isdigit() else None
    return head, QUANTITY_PASS.get(head, "backward"), index


def _precision(backend: Backend, unit: str, bounds: UnitBounds, side_tensor: Tensor | None,
               operands: Iterable[Tensor | None], lam: float) -> Precision:
    """The roundoffs of one quantity: operand dtypes, TF32/autocast operand rounding, result dtype."""
    dtypes = [t.dtype for t in operands if isinstance(t, Tensor) and t.is_floating_point()]
    u_op = max((unit_roundoff(d) for d in dtypes), default=backend.unit_roundoff)
    out_dtype = side_tensor.dtype if isinstance(side_tensor, Tensor) else backend.dtype
    u_out = unit_roundoff(out_dtype)
    if bounds.matmul:
        u_op = max(u_op, backend.matmul_operand_roundoff(unit))
        if backend.autocast is not None:  # computed in the autocast dtype, then cast back (a grad to fp32 params)
            u_out = max(u_out, unit_roundoff(backend.autocast))
    u_acc = backend.accumulate_roundoff if out_dtype != torch.float64 else unit_roundoff(torch.float64)
    u_cmp = max([u_acc] + [unit_roundoff(d) for d in dtypes])
    low = min(dtypes + [out_dtype], key=lambda d: torch.finfo(d).smallest_normal if d.is_floating_point else 0.0)
    eta = 2 * underflow(low)
    return Precision(u_op=u_op, u_acc=u_acc, u_out=u_out, lam=lam, eta=eta, u_cmp=u_cmp)


def _element_count(oracle: list[Trace]) -> int:
    total = 0
    for trace in oracle:
        for rec in trace:
            total += sum(t.numel() for t in rec.outputs if t is not None)
            total += sum(t.numel() for t in rec.grad_inputs if t is not None)
            total += sum(t.numel() for t in rec.param_grads.values())
            total += sum(t.numel() for t in rec.buffers_after.values())
    return 4 * total  # two sides, local and propagated


def _describe(p: Precision) -> str:
    def pw(u: float) -> str:
        return f"2^{round(math.log2(u))}" if u > 0 else "0"

    return (f"u_op={pw(p.u_op)} u_acc={pw(p.u_acc)} u_out={pw(p.u_out)} lam={p.lam:.1f} "
            "(Hoeffding, union bound: P(any false alarm) <= 1e-6)")


class _Aggregate:
    """Max over the tensors of one quantity (a cat's many grad_inputs make one row)."""

    def __init__(self) -> None:
        self.best = None
        self.index = None

    def add(self, comp: object, index: int | None) -> None:
        if self.best is None or comp.ratio > self.best.ratio or (comp.ratio == self.best.ratio
                                                                 and comp.error > self.best.error):
            keep_error = max(comp.error, self.best.error) if self.best is not None else comp.error
            self.best, self.index = comp, index
            self.best.error = keep_error
        elif comp.error > self.best.error:
            self.best.error = comp.error


def _local_rows(name: str, step: int, module: nn.Module, o_rec: object, s_rec: object, bounds: UnitBounds,
                backend: Backend, lam: float, kinks_out: list[Kink], cache: dict | None = None) -> list[Row]:
    replay = replay_unit(module, o_rec, s_rec, backend)
    operands = [t for t in replay.inputs if t is not None]
    truth = oracle_values(o_rec)
    expected = exact_expectation(module, replay) if bounds.exact else truth
    exclude = None
    if bounds.kinky and kinkmod.is_kinky(module) and o_rec.inputs and operands:
        site = kinkmod.find(name, step, module, o_rec.inputs[0], replay.inputs[0])
        if site is not None:  # the oracle input itself rounds across the boundary (underflow, a tie)
            exclude = site.mask
            kinks_out.append(Kink(name, site.count, site.min_margin, site.relative_margin, "", step, "local"))
    groups: dict[str, _Aggregate] = {}
    meta: dict[str, tuple[str, str]] = {}
    keys = set(truth) | {k for k in replay.values if not k.startswith("buffer.") or k in truth}
    for key in sorted(keys):
        quantity, pass_, index = _base(key)
        side_t, oracle_t = replay.values.get(key), expected.get(key, truth.get(key))
        if oracle_t is None and side_t is None:
            continue
        if bounds.exact:
            bound = _exact_bound(side_t, operands)
            meta[quantity] = (pass_, bounds.origin)
        elif key in bounds:
            prec = _precision(backend, name, bounds, side_t, operands, lam)
            bound = bounds.bound(key, prec)
            meta[quantity] = (pass_, f"{bounds.origin}; {_describe(prec)}")
        else:  # integer buffers (num_batches_tracked) and anything without a model must match exactly
            bound = None
            meta.setdefault(quantity, (pass_, f"{bounds.origin}; no rounding model: must be exact"))
        ex = exclude if (exclude is not None and quantity == "grad_input" and side_t is not None
                         and side_t.shape == exclude.shape) else None
        comp = compare(side_t, oracle_t, bound, ex, None if bounds.exact else cache)
        groups.setdefault(quantity, _Aggregate()).add(comp, index)
    rows = []
    for quantity, agg in groups.items():
        comp, index = agg.best, agg.index
        pass_, origin = meta[quantity]
        worst = ((index,) if index is not None and _multi(truth, quantity) else ()) + tuple(comp.worst)
        order = o_rec.forward_index if pass_ == "forward" else (o_rec.backward_index or 0)
        rows.append(Row(name, pass_, quantity, comp.error, None, comp.tolerance, "ok" if comp.ok else "mismatch",
                        origin, step, "local", None, comp.tolerance, None, comp.ratio, None, worst or None, None,
                        order, f"{comp.excluded} kink element(s) excluded" if comp.excluded else ""))
    return rows


def _exact_bound(side_t: Tensor | None, operands: list[Tensor]) -> Tensor | None:
    """Zero, unless the op stores its result in a narrower dtype than its operands (then one rounding)."""
    if side_t is None or not side_t.is_floating_point():
        return None
    u_out = unit_roundoff(side_t.dtype)
    if all(unit_roundoff(t.dtype) >= u_out for t in operands if t.is_floating_point()):
        return None
    return None if side_t is None else side_t.detach().to("cpu", torch.float64).abs() * u_out


def _multi(values: dict, quantity: str) -> bool:
    return sum(1 for k in values if k.startswith(quantity + ".")) > 1


def _relerr(side_t: Tensor | None, truth: Tensor | None, cache: dict | None = None) -> float:
    """max |side - truth| / max |truth|; a missing or misshapen tensor, or a NaN, is infinitely wrong."""
    if truth is None and side_t is None:
        return 0.0
    if truth is None or side_t is None or tuple(side_t.shape) != tuple(truth.shape):
        return math.inf
    if truth.numel() == 0:
        return 0.0
    err = float(abs_difference(side_t, truth).max())
    return math.inf if math.isnan(err) else err / oracle_scale(truth, cache)


def _accumulated(local: list[Row], oracle_trace: Trace) -> tuple[dict[int, float], dict[int, float], float]:
    """First-order accumulation of local tolerances: running sums along forward and backward order."""
    fwd_tol: dict[int, float] = {}
    bwd_tol: dict[int, float] = {}
    for r in local:
        target = fwd_tol if r.pass_ == "forward" else bwd_tol
        target[r.order] = max(target.get(r.order, 0.0), r.tolerance)
    fwd_cum, running = {}, 0.0
    for i in sorted(fwd_tol):
        running += fwd_tol[i]
        fwd_cum[i] = running
    total_forward = running
    bwd_cum, running = {}, total_forward
    for i in sorted(bwd_tol):
        running += bwd_tol[i]
        bwd_cum[i] = running
    return fwd_cum, bwd_cum, total_forward


def _floor(cum: dict[int, float], order: int) -> float:
    keys = [k for k in cum if k <= order]
    return cum[max(keys)] if keys else 0.0


PROPAGATED_ORIGIN = ("propagated: sum of the local tolerances of every unit upstream (first order, errors "
                     "passed on unamplified)")


def judge(model: nn.Module, x: Tensor, y: Tensor, backend: str | Backend, oracle: list[Trace], *,
          units: object = None, steps: int = 1, eval_mode: bool = False, loss_fn: LossFn = F.cross_entropy,
          propagated: bool = True, _shared: dict | None = None) -> SideResult:
    """Judge one backend against the oracle: propagated rows plus local teacher-forced rows, every step.

    ``oracle`` holds one :class:`Trace` per step (from :func:`oracle_traces` or rebuilt from stored arrays);
    only what a Trace holds is used, plus ``model`` for the weights at the start.
    """
    backend = parse_backend(backend)
    _check_inputs(x, y)
    steps = max(steps, len(oracle)) if oracle else steps
    if len(oracle) < steps:
        raise UsageError(f"the oracle has {len(oracle)} step(s), {steps} asked")
    shared = _shared if _shared is not None else {}
    names = list(units) if units is not None and not callable(units) else oracle[0].forward_order
    side = _set_mode(backend.prepare_model(model), eval_mode)
    ref = _Reference(model, eval_mode, oracle)
    side_modules = dict(side.named_modules())
    missing = [n for n in names if n not in side_modules]
    if missing:
        raise UsageError(f"unit(s) not in the model: {', '.join(missing[:5])}")
    lam = shared.setdefault("lam", confidence(_element_count(oracle[:steps])))
    scales = shared.setdefault("scales", {})  # max |oracle| per oracle tensor, for both sides
    xs, ys = _input(x, backend.device, backend.param_dtype, backend), _target(y, backend.device, backend.param_dtype)
    rows: list[Row] = []
    kinks: list[Kink] = []
    result = SideResult(backend.name, rows, kinks, {}, names)
    for step in range(steps):
        o_trace = oracle[step]
        with backend.active():
            s_trace = trace_step(side, xs, ys, units=names, loss_fn=loss_fn)
        result.flags = backend.flags_in_force()
        local: list[Row] = []
        step_kinks: list[Kink] = []
        for name in names:
            if name not in o_trace:
                continue
            o_rec = o_trace[name]
            bounds = shared.get((step, name))
            if bounds is None:
                unit = ref.at(step)[name]
                bounds = shared[(step, name)] = unit_bounds(unit, o_rec, _params64(unit))
            local += _local_rows(name, step, side_modules[name], o_rec, s_trace.units.get(name), bounds, backend,
                                 lam, step_kinks, scales)
        _compose_tolerances(local, names)
        _blame_children(local, names)
        sites = _kink_sites(names, step, o_trace, s_trace, side_modules)
        step_kinks += [Kink(s.layer, s.count, s.min_margin, s.relative_margin, "", step) for s in sites]
        prop_rows = _propagated_rows(names, step, o_trace, s_trace, local, scales) if propagated else []
        if sites and any(r.status == "mismatch" and r.pass_ == "backward" for r in prop_rows):
            cf = _counterfactual(ref, step, x, y, o_trace, sites, names, loss_fn)
            result.counterfactual_steps.append(step)
            counterfactual.explain(prop_rows, s_trace, o_trace, cf, sites)
        _explain_by_local(prop_rows, local)
        rows += local + prop_rows
        kinks += step_kinks
        _sgd_step(side, o_trace)
    return result


class _Reference:
    """The fp64 CPU copy of the model at a step (weights moved by the oracle's SGD steps), built on demand:
    with the error-model magnitudes already shared by another side, a judge needs none."""

    def __init__(self, model: nn.Module, eval_mode: bool, oracle: list[Trace]) -> None:
        self.model, self.eval_mode, self.oracle = model, eval_mode, oracle
        self.ref: nn.Module | None = None
        self.modules: dict[str, nn.Module] = {}
        self.step = 0

    def module(self, step: int) -> nn.Module:
        if self.ref is None or self.step > step:
            self.ref, self.step = _fp64(self.model, self.eval_mode), 0
            self.modules = dict(self.ref.named_modules())
        while self.step < step:
            _sgd_step(self.ref, self.oracle[self.step])
            self.step += 1
        return self.ref

    def at(self, step: int) -> dict[str, nn.Module]:
        self.module(step)
        return self.modules


def _compose_tolerances(local: list[Row], names: list[str]) -> None:
    """A composite unit's replay runs its descendants too: its tolerance adds theirs (first order, per pass)."""
    composites = {n for n in names if any(m.startswith(n + ".") for m in names if n)}
    if not composites:
        return
    per_unit: dict[tuple[int, str, str], float] = {}
    for r in local:
        key = (r.step, r.layer, r.pass_)
        per_unit[key] = max(per_unit.get(key, 0.0), r.tolerance)
    for r in local:
        if r.layer not in composites:
            continue
        extra = sum(t for (step, layer, pass_), t in per_unit.items()
                    if step == r.step and pass_ == r.pass_ and layer.startswith(r.layer + "."))
        if r.pass_ == "backward":  # the backward of the descendants runs on their own forward values
            extra += sum(t for (step, layer, pass_), t in per_unit.items()
                         if step == r.step and pass_ == "forward" and layer.startswith(r.layer + "."))
        if extra <= 0:
            continue
        r.tolerance = r.tolerance_a = r.tolerance + extra
        r.ratio_a = r.error_a / r.tolerance if r.tolerance > 0 else math.inf
        r.status = "ok" if r.error_a <= r.tolerance else "mismatch"
        r.origin += "; plus the sum of its descendant units' local tolerances (first order)"


def _blame_children(local: list[Row], names: list[str]) -> None:
    """A failing composite unit with a failing descendant is not the culprit; the descendant is."""
    failing = {(r.step, r.layer) for r in local if r.status == "mismatch"}
    for r in local:
        if r.status != "mismatch":
            continue
        kids = [n for (s, n) in failing if s == r.step and n != r.layer and n.startswith(r.layer + ".")]
        if kids and r.layer:
            r.note = f"explained by failing unit {sorted(kids)[0]}"


def _kink_sites(names: list[str], step: int, o_trace: Trace, s_trace: Trace,
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


def _propagated_rows(names: list[str], step: int, o_trace: Trace, s_trace: Trace, local: list[Row],
                     scales: dict | None = None) -> list[Row]:
    fwd_cum, bwd_cum, total_forward = _accumulated(local, o_trace)
    rows = []
    for name in names:
        if name not in o_trace:
            continue
        o_rec = o_trace[name]
        truth = oracle_values(o_rec)
        got = side_values(s_trace[name]) if name in s_trace else {}
        groups: dict[str, tuple[float, int | None]] = {}
        for key in truth:
            quantity, pass_, index = _base(key)
            err = _relerr(got.get(key), truth[key], scales)
            if quantity not in groups or err > groups[quantity][0]:
                groups[quantity] = (err, index)
        for quantity, (err, _index) in groups.items():
            pass_ = _base(next(k for k in truth if _base(k)[0] == quantity))[1]
            if pass_ == "forward":
                order = o_rec.forward_index
                tol = _floor(fwd_cum, order)
            else:
                order = o_rec.backward_index or 0
                tol = max(_floor(bwd_cum, order), total_forward)
            status = "ok" if err <= tol else "mismatch"
            rows.append(Row(name, pass_, quantity, err, None, tol, status, PROPAGATED_ORIGIN, step, "propagated",
                            None, tol, None, err / tol if tol > 0 else (0.0 if err == 0 else math.inf), None,
                            None, None, order))
    return rows


def _counterfactual(ref: _Reference, step: int, x: Tensor, y: Tensor, o_trace: Trace,
                    sites: list[kinkmod.KinkSite], names: list[str], loss_fn: LossFn) -> dict:
    """grad_outputs and parameter grads of the oracle taking the side's branch at the side's kink elements."""
    retained = getattr(o_trace, "retained", None)
    if retained is not None:
        try:
            return retained.gradients(sites)
        except RuntimeError:  # a graph that cannot be walked twice (e.g. freed by a checkpoint): re-run
            o_trace.retained = None
    cpu = torch.device("cpu")
    return counterfactual.rerun_gradients(ref.module(step), _input(x, cpu, torch.float64),
                                          _target(y, cpu, torch.float64), o_trace, sites, names, loss_fn)


def _explain_by_local(rows: list[Row], local: list[Row]) -> None:
    failing = sorted((r for r in local if r.status == "mismatch"), key=lambda r: (r.pass_ != "forward", r.order))
    if not failing:
        return
    first = failing[0]
    for r in rows:
        if r.status == "mismatch":
            r.note = r.note or f"downstream of the local failure at {first.layer} ({first.pass_})"


# -- two sides --------------------------------------------------------------------------------------------
def diff(model: nn.Module, x: Tensor, y: Tensor, a: str | Backend | None = None, b: str | Backend | None = None, *,
         steps: int = 1, eval_mode: bool = False, units: object = None, fail_on: str = "mismatch",
         device: str | torch.device | None = None, loss_fn: LossFn = F.cross_entropy) -> DiffReport:
    """Backend ``a`` against backend ``b``, both judged against the fp64 oracle, layer by layer."""
    if fail_on not in FAIL_ON:
        raise UsageError(f"fail_on must be one of {', '.join(FAIL_ON)}, got {fail_on!r}")
    if a is None or b is None:
        da, db = default_pair(torch.device(device) if device is not None else None)
        a, b = a or da, b or db
    ba, bb = parse_backend(a, device), parse_backend(b, device)
    for backend in (ba, bb):
        needs = backend.needs
        steps = max(steps, int(needs.get("steps", 1)))
        eval_mode = eval_mode or bool(needs.get("eval", False))
    names = _unit_names(model, x, units)
    oracle = oracle_traces(model, x, y, steps=steps, eval_mode=eval_mode, units=names, loss_fn=loss_fn)
    shared: dict = {}
    kw = dict(units=names, steps=steps, eval_mode=eval_mode, loss_fn=loss_fn, _shared=shared)
    try:
        side_a = judge(model, x, y, ba, oracle, **kw)
        side_b = judge(model, x, y, bb, oracle, **kw)
    finally:
        release(oracle)
    return _report(side_a, side_b, oracle, ba, bb, fail_on, steps, eval_mode, x)


def _report(side_a: SideResult, side_b: SideResult, oracle: list[Trace], ba: Backend, bb: Backend, fail_on: str,
            steps: int, eval_mode: bool, x: Tensor) -> DiffReport:
    rows = merge_sides(side_a, side_b)
    for k in side_a.kinks:
        k.side = "a"
    for k in side_b.kinks:
        k.side = "b"
    kinks = side_a.kinks + side_b.kinks
    kinks_fail = fail_on == "kink"
    failing = any(r.status == "mismatch" for r in rows) or (kinks_fail and (kinks or any(r.status == "kink"
                                                                                         for r in rows)))
    verdict = "mismatch" if failing else "agree"
    first = first_divergence(rows, kinks_fail)
    if first is None and kinks_fail and kinks:
        k = kinks[0]
        first = {"layer": k.layer, "pass": "forward", "quantity": "kink", "error": k.min_margin, "tolerance": 0.0,
                 "side": k.side, "step": k.step, "mode": k.mode, "status": "kink"}
    env = environment()
    env["flags_a"], env["flags_b"] = side_a.flags, side_b.flags
    env["device"] = str(ba.device)
    report = DiffReport(verdict, first, rows, kinks, env, ba.name, bb.name,
                        {"steps": steps, "eval": eval_mode, "batch": int(x.shape[0]), "fail_on": fail_on,
                         "units": len(side_a.units), "false_alarm_probability": 1e-6,
                         "counterfactual_steps_a": side_a.counterfactual_steps,
                         "counterfactual_steps_b": side_b.counterfactual_steps})
    report.summary = summarize(report)
    return report


def summarize(report: DiffReport) -> str:
    """The one-line verdict."""
    kink_rows = sum(1 for r in report.rows if r.status == "kink")
    sites = {s: [k for k in report.kinks if k.side == s and k.mode == "propagated"] for s in ("a", "b")}
    flips = {s: sum(k.count for k in ks) for s, ks in sites.items()}
    kink_text = (f"; kinks (the other branch of a ReLU within rounding of its boundary): {report.a} at {flips['a']} "
                 f"element(s) in {len(sites['a'])} unit(s), {report.b} at {flips['b']} in {len(sites['b'])}; they "
                 f"explain {kink_rows} propagated row(s)") if any(flips.values()) else ""
    if report.verdict == "agree":
        return f"agree: {report.a} and {report.b} match the fp64 oracle within derived tolerances{kink_text}"
    f = report.first_divergence or {}
    who = {"a": report.a, "b": report.b, "both": f"{report.a} and {report.b}"}.get(f.get("side"), "?")
    return (f"mismatch: {who} wrong at {f.get('layer')} ({f.get('pass')} {f.get('quantity')}, {f.get('mode')}, "
            f"step {f.get('step')}): error {_fmt(f.get('error'))} > tolerance {_fmt(f.get('tolerance'))}{kink_text}")


def _fmt(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def local_check(model: nn.Module, x: Tensor, y: Tensor, backend: str | Backend, *, units: object = None,
                loss_fn: LossFn = F.cross_entropy) -> list[Row]:
    """Teacher-forced rows only, one backend against fp64 (one step); for audits during training.

    ``model`` is not modified (copies are judged). A row with ``status == "mismatch"`` is a wrong unit.
    """
    backend = parse_backend(backend)
    names = _unit_names(model, x, units)
    oracle = oracle_traces(model, x, y, units=names, loss_fn=loss_fn, keep_graph=False)
    result = judge(model, x, y, backend, oracle, units=names, loss_fn=loss_fn, propagated=False)
    return result.rows
