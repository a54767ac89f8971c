"""The verdict engine: is a backend's gradient wrong, where, and is it a bug or precision noise?

* The **oracle** is the same model, weights, inputs, labels and BN state in float64 on the CPU
  (:func:`oracle_traces`, one :class:`~densenet_debug.trace.Trace` per step).
* **Local (teacher-forced)** rows: every unit of the side's prepared model is re-run on the oracle's inputs
  and grad_outputs, in the dtype and memory layout the side saw (:mod:`densenet_debug.verdict.replay`), and each
  output, input grad, parameter grad and BN buffer is checked elementwise against a bound *derived* from the
  unit roundoffs and an error model of the op (:mod:`densenet_debug.verdict.tolerance`). A side is wrong at a unit
  only when a local row fails. Every call of a user's custom ``autograd.Function`` is such a unit too (mode
  ``function``, :mod:`densenet_debug.verdict.functions`): the smaller unit, blamed before the module it ran in.
* **Propagated** rows (:mod:`densenet_debug.verdict.propagated`): the side's end-to-end trace against the oracle.
  Errors accumulate, so a row is first screened against the first-order sum of the local tolerances
  upstream. Kinks (:mod:`densenet_debug.verdict.kinks`) cannot move forward values by more than their margin, but
  they do move gradients: a backward divergence is explained (status ``kink``) when the side agrees with the
  *counterfactual* oracle that takes the side's branch at exactly its kink elements
  (:mod:`densenet_debug.verdict.counterfactual`). What is left is explained as amplified upstream error when the
  unit reproduces its own exact math at its own propagated inputs (an fp64 replay there); otherwise it is a
  ``mismatch``: a state, sequence or fusion fault that no teacher-forced replay shows, or a missing gradient.
* Several steps: between steps every copy takes the same in-place SGD step made from the *oracle's*
  gradients (so weights change as in training, caches keyed on weights are exercised, and all sides keep
  the same weights); BN running buffers carry over and are compared every step.
* Memory: every trace (the oracle's, each side's, a counterfactual re-run's) records through a
  :class:`~densenet_debug.trace.TensorStore`: each tensor once (a unit's output is the next one's input), and
  past the process's budget (``DENSENET_DEBUG_TRACE_BUDGET_MB``, 1 GiB) written to an anonymous temporary
  file as it is recorded. The judge then reads one unit at a time (a replay needs only the side's layouts
  and dtypes, never its values; kink sites are kept compactly), a spilled oracle keeps no autograd graph (a
  counterfactual re-runs the fp64 step with light gates), and oracle scales are memoised weakly. The peak
  is about one plain float64 step of the model plus the budget, whatever the batch; the report is the same.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug import progress
from densenet_debug.backends import Backend, default_pair, environment, parse_backend
from densenet_debug.errors import UsageError
from densenet_debug.models.copies import dropout_off_for, fp64_copy, judging_mode
from densenet_debug.trace import TensorStore, Trace, UnitRecord, UnitSelector, discover_units, trace_step
from densenet_debug.verdict import counterfactual, functions, inner_kinks
from densenet_debug.verdict import kinks as kinkmod
from densenet_debug.verdict.between import between_rows
from densenet_debug.verdict.counterfactual import traced_step_with_gates
from densenet_debug.verdict.local import blame_children, compose_tolerances, element_count, local_rows
from densenet_debug.verdict.nonfinite import check_oracle, finite, first_nonfinite, where
from densenet_debug.verdict.propagated import (
    carried_state,
    explain_by_local,
    kink_sites,
    propagated_rows,
    self_consistent,
)
from densenet_debug.verdict.report import (
    FAILING,
    DiffReport,
    Row,
    SideResult,
    Status,
    UnitKink,
    first_divergence,
    fmt,
    merge_sides,
)
from densenet_debug.verdict.tolerance import UnitBounds, confidence, unit_bounds

LEARNING_RATE = 0.1  # the shared SGD step between steps; any value that changes the weights will do
LossFn = Callable[[Tensor, Tensor], Tensor]
FAIL_ON = ("mismatch", "kink")

__all__ = ["DiffReport", "JudgeCache", "UnitKink", "Row", "SideResult", "diff", "judge", "judge_many", "local_check",
           "oracle_traces", "release"]


@dataclass
class JudgeCache:
    """What :func:`judge_many` derives from one oracle, kept across calls that judge it (bisect trials,
    several backends on one fixture), so each is computed once.

    ``bounds`` is only filled when the caller passes a cache (``_shared``): without one, each unit's error
    model is dropped after use so memory does not grow with the number of units.
    """

    finite_oracle: list[Trace] | None = None  # the oracle already checked to be finite
    lam: float | None = None  # the confidence multiplier for the oracle's element count
    scales: dict = field(default_factory=dict)  # scale of the terms per oracle tensor, for every side
    bounds: dict[tuple[int, str], UnitBounds] = field(default_factory=dict)  # (step, unit) -> its error model
    reproduction: dict[int, list[Row]] = field(default_factory=dict)  # id(oracle) -> reference reproduction rows

    @classmethod
    def of(cls, shared: JudgeCache | None) -> JudgeCache:
        """``shared`` itself, or a new cache for None."""
        return cls() if shared is None else shared


# -- preparing copies -------------------------------------------------------------------------------------
def _fp64(model: nn.Module, eval_mode: bool) -> nn.Module:
    return judging_mode(fp64_copy(model, "cpu"), eval_mode)


class UnitNames(list):
    """Unit names :func:`unit_names` resolved for a model: handed back to it for the same model (the oracle's
    and the judges' calls inside one verb), they are taken as they are, without probing the model again."""


def unit_names(model: nn.Module, x: Tensor, units: UnitSelector) -> list[str] | Callable[[str, nn.Module], bool]:
    """The units to judge: every unit :func:`discover_units` finds (the model's state is kept), or the names
    given plus every computing unit inside them (a composite's tolerance is built from its descendants').
    A :class:`UnitNames` (what this returned before) is taken as it is."""
    if callable(units) or isinstance(units, UnitNames):
        return units
    probe = copy.deepcopy(model)  # the probing forward must not touch the user's model (or its modules' state)
    param = next(probe.parameters(), None)
    like = x.detach().to(param.device, param.dtype) if param is not None and param.is_floating_point() else x
    nested: set[str] = set()
    try:
        found = discover_units(probe, like, nested=nested)
    except RuntimeError:  # parameters of mixed dtypes (a float64 scale beside float32 layers): every side and
        # the oracle run the model in one dtype, so probe it in one too, float64 (the oracle's)
        found = discover_units(probe.double(), x.detach().to(torch.float64), nested=nested)
    if units is None:
        return UnitNames(found)
    chosen = list(dict.fromkeys(units))
    bad = [c for c in chosen if c in nested]
    if bad:
        raise UsageError(f"unit {bad[0]!r} is called with tensors inside a list, tuple or dict (or as keywords): it "
                         "cannot be replayed as a unit; name the modules inside it instead")
    inside = [n for n in found if n not in chosen and any(n.startswith(c + ".") for c in chosen if c)]
    return UnitNames(chosen + inside)


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
    if not finite(x) or not finite(y):
        raise UsageError("inputs or labels hold NaN/Inf: nothing can be judged on them")
    if not isinstance(y, Tensor) or y.shape[:1] != x.shape[:1]:
        raise UsageError(f"labels must be a tensor with one entry per sample ({x.shape[0]})")


# -- the oracle --------------------------------------------------------------------------------------------
@progress.stage("oracle: float64 step traced")
@dropout_off_for
def oracle_traces(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 1, eval_mode: bool = False,
                  units: UnitSelector = None, loss_fn: LossFn = F.cross_entropy,
                  keep_graph: bool = True) -> list[Trace]:
    """The fp64 CPU truth: ``steps`` traced steps of a float64 copy of ``model`` (``model`` is untouched).

    ``keep_graph`` keeps each step's autograd graph (``trace.retained``) so that kinks can be explained by one
    more fp64 backward instead of a whole step; :func:`release` frees it. Each step's records go through a
    :class:`~densenet_debug.trace.TensorStore`: past its memory budget they are written to disk as they are
    recorded and read back unit by unit, and the graph (as large as the records) is not kept.
    """
    _check_inputs(x, y)
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    ref = _fp64(model, eval_mode)
    names = unit_names(model, x, units)
    x64, y64 = _input(x, torch.device("cpu"), torch.float64), _target(y, torch.device("cpu"), torch.float64)
    traces = []
    for step in range(steps):
        store = TensorStore()
        with functions.recording(ref, values=True) as calls:  # custom Functions are units too (.functions)
            trace = traced_step_with_gates(ref, x64, y64, names, loss_fn, store) if keep_graph else trace_step(
                ref, x64, y64, units=names, loss_fn=loss_fn, store=store)
        traces.append(functions.attach(trace, calls))
        if step + 1 < steps:
            if getattr(trace, "retained", None) is not None:  # the graph saved these weights: update a copy
                ref = _detached_copy(ref)
            _sgd_step(ref, trace)
    check_oracle(traces)
    for trace in traces:  # a judge need not read it all again (a spilled oracle is read back from disk)
        trace.checked_finite = True
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
def judge(model: nn.Module, x: Tensor, y: Tensor, backend: str | Backend, oracle: list[Trace], *,
          units: UnitSelector = None, steps: int = 1, eval_mode: bool = False, loss_fn: LossFn = F.cross_entropy,
          propagated: bool = True, _shared: JudgeCache | None = None) -> SideResult:
    """Judge one backend against the oracle: propagated rows plus local teacher-forced rows, every step.

    ``oracle`` holds one :class:`Trace` per step (from :func:`oracle_traces` or rebuilt from stored arrays);
    only what a Trace holds is used, plus ``model`` for the weights at the start. ``_shared``, when given
    (a :class:`JudgeCache`), keeps every unit's error model and the confidence ``lam`` for the caller.
    """
    return judge_many(model, x, y, [backend], oracle, units=units, steps=steps, eval_mode=eval_mode,
                      loss_fn=loss_fn, propagated=propagated, _shared=_shared)[0]


@progress.stage("judging units")
@dropout_off_for
def judge_many(model: nn.Module, x: Tensor, y: Tensor, backends: list[str | Backend], oracle: list[Trace], *,
               units: UnitSelector = None, steps: int = 1, eval_mode: bool = False, loss_fn: LossFn = F.cross_entropy,
               propagated: bool = True, _shared: JudgeCache | None = None) -> list[SideResult]:
    """:func:`judge` for several backends in lockstep: each unit's error model is built once, used by every
    side, and dropped (unless ``_shared`` keeps it), so memory does not grow with the number of units."""
    _check_inputs(x, y)
    steps = max(steps, len(oracle)) if oracle else steps
    if len(oracle) < steps:
        raise UsageError(f"the oracle has {len(oracle)} step(s), {steps} asked")
    shared = JudgeCache.of(_shared)
    if shared.finite_oracle is not oracle:  # checked once per oracle, however many sides judge it
        if not all(getattr(t, "checked_finite", False) for t in oracle[:steps]):
            check_oracle(oracle[:steps])
        shared.finite_oracle = oracle
    names = list(units) if units is not None and not callable(units) else oracle[0].forward_order
    sides = [_Side(parse_backend(b), model, x, y, names, eval_mode) for b in backends]
    ref = _Reference(model, eval_mode, oracle)
    if shared.lam is None:  # shapes suffice: a spilled oracle is not read back to count its elements
        shared.lam = confidence(element_count([trace.metas() for trace in oracle[:steps]]))
    lam = shared.lam
    # max |oracle| is memoised by tensor identity, holding the tensor: a spilled oracle is read back afresh for
    # every unit, so its memo must not keep what it read (else it would hold the whole oracle again)
    scales = _WeakScales() if any(t.spilled for t in oracle[:steps]) else shared.scales
    for step in range(steps):
        o_trace = oracle[step]
        for side in sides:
            side.run_step(names, loss_fn)
        with progress.step("local: units teacher-forced", total=len(names)):
            for name in names:
                if name not in o_trace:
                    continue
                bounds = shared.bounds.get((step, name))
                if bounds is None:
                    unit = ref.at(step)[name]
                    bounds = unit_bounds(unit, o_trace[name], _params64(unit))
                    if _shared is not None:
                        shared.bounds[(step, name)] = bounds
                for side in sides:
                    side.local_unit(name, step, o_trace[name], bounds, lam, scales)
                progress.advance()
        for side, rows in zip(sides, functions.function_rows(step, o_trace, [(s.backend, s.trace) for s in sides],
                                                             lam)):
            side.functions = rows
        for side in sides:
            side.finish_step(step, names, o_trace, ref, x, y, loss_fn, lam, scales, propagated)
    return [side.result for side in sides]


def _kept() -> bool:
    return True


class _WeakScales(dict):
    """:func:`~densenet_debug.verdict.compare.oracle_scale`'s memo (``id -> (tensor, scale, ...)``) holding its tensors
    weakly: an entry lives as long as the tensor it was made for, and keeps nothing alive itself."""

    def __setitem__(self, key: object, value: tuple) -> None:
        if len(self) > 4096:  # forget the entries whose tensors are gone
            for k in [k for k, (ref, *_) in dict.items(self) if ref() is None]:
                del self[k]
        oracle, *rest = value  # None for a spilled record's stable key: only the floats are kept
        super().__setitem__(key, (weakref.ref(oracle) if oracle is not None else _kept, *rest))

    def __getitem__(self, key: object) -> tuple:
        ref, *rest = super().__getitem__(key)
        return (ref(), *rest)

    def __contains__(self, key: object) -> bool:
        entry = dict.get(self, key)
        return entry is not None and entry[0]() is not None


class _Side:
    """One backend's prepared model, inputs and findings while :func:`judge_many` walks the steps."""

    def __init__(self, backend: Backend, model: nn.Module, x: Tensor, y: Tensor, names: list[str],
                 eval_mode: bool) -> None:
        self.backend = backend
        self.model = judging_mode(backend.prepare_model(model), eval_mode)
        self.modules = dict(self.model.named_modules())
        missing = [n for n in names if n not in self.modules]
        if missing:
            raise UsageError(f"unit(s) not in the model: {', '.join(missing[:5])}")
        self.x = _input(x, backend.device, backend.param_dtype, backend)
        self.y = _target(y, backend.device, backend.param_dtype)
        self.result = SideResult(backend.name, [], [], {}, names)
        self.trace: Trace | None = None
        self.previous: dict[str, dict[str, Tensor]] | None = None  # buffers each unit left, last step
        self.previous_oracle: dict[str, dict[str, Tensor]] | None = None  # the same, the oracle's
        self.local: list[Row] = []
        self.functions: list[Row] = []  # the custom Functions' teacher-forced rows (verdict.functions)
        self.step_kinks: list[UnitKink] = []

    def run_step(self, names: list[str], loss_fn: LossFn) -> None:
        # A compiled unit runs no Function's Python: its replay takes the side's dtype and dense layouts.
        calls = functions.recording(self.model, values=False) if not self.backend.compile_backend else nullcontext()
        with self.backend.active(), progress.step(f"{self.backend.name}: step traced"), calls as recorder:
            # torch.compile skips its frames while a dispatch mode is active: copies, not guarded aliases.
            self.trace = trace_step(self.model, self.x, self.y, units=names, loss_fn=loss_fn,
                                    copy_on_write=not self.backend.compile_backend, store=TensorStore())
        if recorder is not None:
            functions.attach(self.trace, recorder)
        self.result.flags = self.backend.flags_in_force()
        self.local, self.functions, self.step_kinks = [], [], []

    def local_unit(self, name: str, step: int, o_rec: UnitRecord, bounds: UnitBounds, lam: float, scales: dict) -> None:
        # the replay needs the side's layouts and dtypes only: a spilled record is not read back for them
        seen = self.trace.meta(name) if name in self.trace else None
        self.local += local_rows(name, step, self.modules[name], o_rec, seen, bounds, self.backend, lam,
                                 self.step_kinks, scales)

    def finish_step(self, step: int, names: list[str], o_trace: Trace, ref: _Reference, x: Tensor, y: Tensor,
                    loss_fn: LossFn, lam: float, scales: dict, propagated: bool) -> None:
        s_trace, local = self.trace, self.local
        composed = compose_tolerances(local, names)
        if any(r.status == Status.MISMATCH for r in local):  # relu kinks inside a unit's own forward
            inner_kinks.explain(local, step, o_trace, s_trace, self.modules, ref.at(step), self.backend,
                                self.step_kinks)
        blame_children(local, names)
        functions.blame(local, self.functions)  # a failing Function is a smaller unit than the module it ran in
        sites = _kink_sites(names, step, o_trace, s_trace, self.modules)
        self.step_kinks += [UnitKink(s.layer, s.count, s.min_margin, s.relative_margin, "", step) for s in sites]
        with progress.step("propagated: end to end compared"):
            prop_rows = propagated_rows(names, step, o_trace, s_trace, local, scales) if propagated else []
        if sites and any(r.status == Status.MISMATCH and r.pass_ == "backward" for r in prop_rows):
            with progress.step("kinks: counterfactual oracle"):
                cf = _counterfactual(ref, step, x, y, o_trace, sites, names, loss_fn)
            self.result.counterfactual_steps.append(step)
            counterfactual.explain(prop_rows, s_trace, cf)
        with progress.step("between: code between units checked"):
            between = between_rows(step, names, s_trace, ref.module(step), self.x, self.y, self.backend,
                                   loss_fn) if propagated else []
        explain_by_local(prop_rows, local + between)  # before amplification: only what nothing upstream explains
        functions.name_in_notes(prop_rows, local)
        if any(r.status == Status.MISMATCH and r.explained_by is None for r in prop_rows):
            self_consistent(prop_rows, s_trace, ref.at(step), self.backend, lam, composed)
            inner_kinks.explain_propagated(prop_rows, step, s_trace, self.modules, ref.at(step), self.backend,
                                           self.step_kinks)
        if any(r.status == Status.NONFINITE for r in local + prop_rows):  # name where the side's NaN/Inf began
            found = first_nonfinite(s_trace, step)
            if found is not None:
                self.result.nonfinite.append(found)
        if propagated and self.previous is not None:
            prop_rows += carried_state(names, step, self.previous, s_trace, self.previous_oracle, o_trace,
                                       self.result.rows)
        self.previous = {rec.name: rec.buffers_after for rec in s_trace if rec.buffers_after}
        self.previous_oracle = {rec.name: rec.buffers_after for rec in o_trace if rec.buffers_after}
        self.trace = None
        self.result.rows += local + self.functions + between + prop_rows
        self.result.kinks += self.step_kinks
        _sgd_step(self.model, o_trace)


def _kink_sites(names: list[str], step: int, o_trace: Trace, s_trace: Trace,
                modules: dict[str, nn.Module]) -> list[kinkmod.KinkSite]:
    """:func:`~densenet_debug.verdict.propagated.kink_sites`, one unit at a time, each site kept compactly: a
    ReLU's branch (exactly 0 or 1, read back as such) as bool, not float64, an eighth of the memory."""
    sites = []
    for name in names:
        for site in kink_sites([name], step, o_trace, s_trace, modules):
            if type(modules[name]) is nn.ReLU:
                site.side_branch = site.side_branch.bool()
            sites.append(site)
    return sites


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


# -- two sides --------------------------------------------------------------------------------------------
def diff(model: nn.Module, x: Tensor, y: Tensor, a: str | Backend | None = None, b: str | Backend | None = None, *,
         steps: int = 1, eval_mode: bool = False, units: UnitSelector = None, fail_on: str = "mismatch",
         device: str | torch.device | None = None, loss_fn: LossFn = F.cross_entropy,
         math_check: bool = True) -> DiffReport:
    """Backend ``a`` against backend ``b``, both judged against the fp64 oracle, layer by layer; ``math_check``:
    also every custom autograd Function's backward against finite differences (:mod:`.mathcheck`)."""
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
    names = unit_names(model, x, units)
    oracle = oracle_traces(model, x, y, steps=steps, eval_mode=eval_mode, units=names, loss_fn=loss_fn)
    try:
        side_a, side_b = judge_many(model, x, y, [ba, bb], oracle, units=names, steps=steps, eval_mode=eval_mode,
                                    loss_fn=loss_fn)
    finally:
        release(oracle)
    report = _report(side_a, side_b, oracle, ba, bb, fail_on, steps, eval_mode, x)
    if math_check:
        from densenet_debug.verdict import mathcheck

        # The oracle's step recorded every user-written Function call (functions.recording patches
        # Function.apply, a superset of the calls the math check's profiler finds): with none, there is nothing
        # to check, and the math check's own float64 step (0.5-0.7 s on BC-100 at batch 8) is not run.
        applied = any(getattr(t, "functions", None) is None or t.functions for t in oracle)
        checks = mathcheck.check(model, x, y, eval_mode=eval_mode, loss_fn=loss_fn) if applied else []
        mathcheck.apply_to_report(report, checks)
    return report


def _report(side_a: SideResult, side_b: SideResult, oracle: list[Trace], ba: Backend, bb: Backend, fail_on: str,
            steps: int, eval_mode: bool, x: Tensor) -> DiffReport:
    rows = merge_sides(side_a, side_b)
    for k in side_a.kinks:
        k.side = "a"
    for k in side_b.kinks:
        k.side = "b"
    kinks = side_a.kinks + side_b.kinks
    kinks_fail = fail_on == "kink"
    failing = any(r.status in FAILING for r in rows) or (kinks_fail and (kinks or any(r.status == "kink"
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
    report.summary = summarize(report, {"a": side_a.nonfinite, "b": side_b.nonfinite})
    return report


def summarize(report: DiffReport, nonfinite: dict[str, list[dict]] | None = None) -> str:
    """The one-line verdict; ``nonfinite``: per side, where each step's first NaN/Inf was produced."""
    kink_rows = sum(1 for r in report.rows if r.status == Status.KINK and r.mode != "between")
    between_kinks = sum(1 for r in report.rows if r.status == Status.KINK and r.mode == "between")
    sites = {s: [k for k in report.kinks if k.side == s and k.mode == "propagated"] for s in ("a", "b")}
    flips = {s: sum(k.count for k in ks) for s, ks in sites.items()}
    kink_text = (f"; kinks (the other branch of a piecewise op within rounding of its boundary): "
                 f"{report.a} at {flips['a']} "
                 f"element(s) in {len(sites['a'])} unit(s), {report.b} at {flips['b']} in {len(sites['b'])}; they "
                 f"explain {kink_rows} propagated row(s)") if any(flips.values()) else ""
    if between_kinks:  # a decision the code between units took on values it rounded itself (verdict.between)
        kink_text += (f"; {between_kinks} between row(s) explained by a branch the code between units took within "
                      f"rounding of its boundary")
    if report.verdict == "agree":
        return f"agree: {report.a} and {report.b} match the fp64 oracle within derived tolerances{kink_text}"
    f = report.first_divergence or {}
    who = {"a": report.a, "b": report.b, "both": f"{report.a} and {report.b}"}.get(f.get("side"), "?")
    if f.get("status") == Status.NONFINITE:
        firsts = [f"{name} at {where(found[0])}" for side, name in (("a", report.a), ("b", report.b))
                  if (found := (nonfinite or {}).get(side))]
        return (f"mismatch: {who} non-finite (NaN/Inf) where the fp64 oracle is finite, first at {f.get('layer')} "
                f"({f.get('pass')} {f.get('quantity')}, {f.get('mode')}, step {f.get('step')}); first NaN/Inf "
                f"produced end to end: {'; '.join(firsts) or 'none'}{kink_text}")
    where_, mode = f.get("layer"), f.get("mode")
    if mode == functions.MODE:  # "wrong at custom autograd Function CatFn in dense.1 (backward grad_input, ..."
        where_, mode = functions.describe(where_), "teacher-forced"
    return (f"mismatch: {who} wrong at {where_} ({f.get('pass')} {f.get('quantity')}, {mode}, "
            f"step {f.get('step')}): error {fmt(f.get('error'))} > tolerance {fmt(f.get('tolerance'))}{kink_text}")


def local_check(model: nn.Module, x: Tensor, y: Tensor, backend: str | Backend, *, units: UnitSelector = None,
                loss_fn: LossFn = F.cross_entropy) -> list[Row]:
    """Teacher-forced rows only, one backend against fp64 (one step); for audits during training.

    ``model`` is not modified (copies are judged). A row whose status is in ``FAILING`` (``mismatch``, or
    ``nonfinite``: NaN/Inf where the fp64 oracle is finite) is a wrong unit.
    """
    backend = parse_backend(backend)
    names = unit_names(model, x, units)
    oracle = oracle_traces(model, x, y, units=names, loss_fn=loss_fn, keep_graph=False)
    result = judge(model, x, y, backend, oracle, units=names, loss_fn=loss_fn, propagated=False)
    return result.rows
