"""Numerical gradient check of every unit of a model, teacher-forced, in float64.

Each unit (:func:`densenet_debug.trace.discover_units`: leaf modules, plus modules whose own ``forward``
does tensor math) is replayed as a pure function of its tensor inputs *and parameters*
(``torch.func.functional_call``) on the inputs it saw in a real float64 forward/backward of the model.
The gradient its backward produced in that step, for the grad_output it really received (in the memory
layout it really had: the #708 bug was a layout bug), is compared with finite differences of <v, f>.

``fast`` mode projects on a few Gaussian directions per tensor, one tensor at a time (units with many
tensors, a concatenation of 17 features, move them together and re-check alone any tensor whose share
is too small, or all of them when the unit fails, to name the tensor). ``full`` mode compares whole
Jacobians of tensors under a size limit. Tolerances come from an error model, per comparison
(:mod:`densenet_debug.gradcheck.numerics`); non-smooth points crossed by a step (a ReLU input near 0)
are found, masked and reported as kinks. A composite that fails while every unit inside it passes is
the culprit (the code in its own ``forward``).

Every op a composite runs in its own ``forward`` (``F.relu``, ``torch.cat``, a ``torch.library`` custom op) is
a unit of its own too, ``module · aten.op`` (:mod:`densenet_debug.gradcheck.ops`), and so is every call of a
user-written custom ``autograd.Function``, smaller than the module it runs in: its backward against finite
differences of its forward on the inputs of that call (:func:`densenet_debug.verdict.mathcheck.check_call`,
the derivation there), a row named ``module · Function``. A hand-written backward that is wrong is thus named
at the Function; the module around it fails too and is explained by it
(:func:`~densenet_debug.gradcheck.report.mark_culprits`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from densenet_debug.errors import UsageError
from densenet_debug.gradcheck.full import check_full
from densenet_debug.gradcheck.function import UnitFunction
from densenet_debug.gradcheck.numerics import (
    DIRECTIONS,
    FULL_LIMIT,
    FULL_LIMIT_NAMED,
    JOINT_FROM,
    RESOLUTION_TARGET,
    DirectionPool,
    Outcome,
    check_joint,
)
from densenet_debug.gradcheck.ops import composite_ops
from densenet_debug.gradcheck.report import GradcheckReport, GradRow, Kink, mark_culprits
from densenet_debug.models.copies import fp64_copy
from densenet_debug.trace import Layout, discover_units, trace_step
from densenet_debug.verdict import mathcheck
from densenet_debug.verdict.nonfinite import check_oracle, finite

__all__ = ["GradRow", "GradcheckReport", "Kink", "gradcheck_model", "gradcheck_unit"]

MODES = ("fast", "full")
_RECORD = ("inputs", "outputs", "grad_outputs", "grad_inputs")
ProgressFn = Callable[[int, int, str], None]


def gradcheck_unit(
    module: nn.Module, inputs: Sequence[object], grad_outputs: Sequence[Tensor | None] | None = None, *,
    mode: str = "fast", seed: int = 0, name: str = "", kwargs: dict | None = None,
    input_layouts: Sequence[Layout | None] | None = None,
    grad_output_layouts: Sequence[Layout | None] | None = None,
    grads: dict[str, Tensor | None] | None = None, buffers: dict[str, Tensor] | None = None,
    full_limit: int = FULL_LIMIT, directions: int = DIRECTIONS,
) -> list[GradRow]:
    """Check one unit on given (teacher-forced) inputs and grad_outputs; one row per checked tensor.

    ``grad_outputs`` None draws Gaussian ones. ``grads`` maps tensor names (``input0``, ``weight``,
    ``conv.weight``) to the gradients the unit's backward produced in a real step; without it the
    backward is replayed here (inputs and grad_outputs in ``*_layouts`` when given). Every floating
    input and every parameter that requires grad is checked unless ``grads`` restricts them.
    Works in float64: other dtypes are checked on a float64 copy. Kinks crossed are counted in
    ``row.kinks`` (masked and re-checked when the row passes).
    """
    _check_mode(mode)
    if _needs_cast(module, inputs):
        module = fp64_copy(module)
        inputs = [a.to(torch.float64) if isinstance(a, Tensor) and a.is_floating_point() else a for a in inputs]
        grad_outputs = None if grad_outputs is None else [
            None if g is None else g.to(torch.float64) for g in grad_outputs]
        grads = None if grads is None else {k: None if g is None else g.to(torch.float64) for k, g in grads.items()}
    unit = UnitFunction(
        name, module, list(inputs), dict(kwargs or {}),
        buffers=buffers, grad_outputs=None if grad_outputs is None else list(grad_outputs),
        input_layouts=input_layouts, grad_output_layouts=grad_output_layouts, grads=grads, seed=seed,
    )
    rows, _ = _check_unit(unit, mode, DirectionPool(torch.Generator().manual_seed(seed)), full_limit, directions)
    return rows


def gradcheck_model(
    model: nn.Module, x: Tensor, y: Tensor, *, mode: str = "fast", layers: list[str] | None = None,
    seed: int = 0, eval_mode: bool = False, progress: ProgressFn | None = None,
    directions: int = DIRECTIONS, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> GradcheckReport:
    """Check every unit of ``model`` (or those under ``layers``) on one float64 step with ``x``, ``y``.

    The model is copied to float64 (same device); BN runs in train mode with batch statistics unless
    ``eval_mode``. Rows come in backward order; ``first_failure`` is the first culprit. Random numbers
    (dropout masks, directions) come from ``seed``; the caller's RNG state is left as it was.
    """
    _check_mode(mode)
    device = _device_of(model, x)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return _gradcheck_model(model, x, y, mode, layers, seed, eval_mode, progress, directions, loss_fn)


def _gradcheck_model(model: nn.Module, x: Tensor, y: Tensor, mode: str, layers: list[str] | None, seed: int,
                     eval_mode: bool, progress: ProgressFn | None, directions: int,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] | None) -> GradcheckReport:
    start = time.perf_counter()
    model64 = fp64_copy(model)
    model64.train(not eval_mode)
    device = _device_of(model64, x)
    x64 = x.to(device=device, dtype=torch.float64)
    y = y.to(device)
    named = dict(model64.named_modules())
    units = discover_units(model64, x64)
    selected, named_exactly = _select(units, layers, named)
    buffers0 = {id(b): b.detach().clone() for b in model64.buffers()}  # BN state before the step
    kw = {} if loss_fn is None else {"loss_fn": loss_fn}
    if not finite(x64):
        raise UsageError("the inputs hold NaN/Inf: nothing can be differentiated on them")
    with _capturing_calls(model64, selected) as calls:
        trace = trace_step(model64, x64, y, units=selected, record=_RECORD, **kw)
    check_oracle([trace], "the float64 step gradcheck differentiates")
    shared = _shared_parameters(named, units, trace)
    order = trace.backward_order + [n for n in trace.forward_order if trace[n].backward_index is None]
    rows: list[GradRow] = []
    kinks: list[Kink] = []
    pool = DirectionPool(torch.Generator().manual_seed(seed))
    for i, name in enumerate(order):
        if progress is not None:
            progress(i, len(order), name)
        module, rec = named[name], trace[name]
        args, kwargs = calls.get(name, (list(rec.inputs), {}))
        args = [t if t is not None else a for t, a in zip(_pad(rec.inputs, len(args)), args)]
        grads = _recorded_grads(module, rec, shared)
        unit = UnitFunction(
            name, module, args, kwargs, buffers={k: buffers0[id(b)] for k, b in module.named_buffers()},
            grad_outputs=list(rec.grad_outputs) or None, input_layouts=rec.input_layouts,
            grad_output_layouts=rec.grad_output_layouts, grads=grads, seed=seed, outputs=rec.outputs,
        )
        limit = FULL_LIMIT_NAMED if name in named_exactly else FULL_LIMIT
        covered = _covered_below(name, selected, named, shared)
        unit_rows, unit_kinks = _check_unit(unit, mode, pool, limit, directions, covered)
        rows += unit_rows
        kinks += unit_kinks
    if progress is not None:
        progress(len(order), len(order), "")
    rows = _with_op_rows(rows, model64, x64, named, selected, units, mode, seed, eval_mode)
    rows = _with_function_rows(rows, model, x, y, eval_mode, seed, selected, kw)
    mark_culprits(rows)
    env = {"torch": torch.__version__, "device": str(device), "dtype": "float64", "seed": seed,
           "train": not eval_mode, "batch": int(x.shape[0])}
    return GradcheckReport(rows, kinks, mode, order, time.perf_counter() - start, env)


# -- custom Functions ------------------------------------------------------------------------------------
_FUNCTION_STATUS = {"ok": "pass", "math": "fail", "unverifiable": "skip", "not_reproducible": "skip"}


def _with_function_rows(rows: list[GradRow], model: nn.Module, x: Tensor, y: Tensor, eval_mode: bool, seed: int,
                        selected: list[str], kw: dict) -> list[GradRow]:
    """``rows`` with one row per custom Function call under a selected unit, each just before the first row of
    the module it ran in (rows follow backward order, and a Function runs inside its module's backward)."""
    inside = [n for n in selected if n]
    calls = [c for c in mathcheck.find_calls(model, x, y, eval_mode=eval_mode, **kw)
             if "" in selected or any(c.module == n or c.module.startswith(n + ".") for n in inside)]
    if not calls:
        return rows
    by_module: dict[str, list[GradRow]] = {}
    for c in calls:
        by_module.setdefault(c.module, []).append(_function_row(mathcheck.check_call(c, seed=seed)))
    return _placed(rows, by_module)


def _placed(rows: list[GradRow], by_module: dict[str, list[GradRow]]) -> list[GradRow]:
    """``rows`` with each module's extra rows just before that module's first row (the rest at the end)."""
    out: list[GradRow] = []
    for r in rows:
        out += by_module.pop(r.layer, [])
        out.append(r)
    return out + [r for group in by_module.values() for r in group]


# -- ops in a composite's own forward --------------------------------------------------------------------
def _with_op_rows(rows: list[GradRow], model64: nn.Module, x64: Tensor, named: dict[str, nn.Module],
                  selected: list[str], units: list[str], mode: str, seed: int, eval_mode: bool) -> list[GradRow]:
    """``rows`` with one unit per op a selected composite runs in its own ``forward`` (:mod:`.ops`)."""
    composites = [u for u in selected if any(v != u and (not u or v.startswith(u + ".")) for v in units)]
    by_module: dict[str, list[GradRow]] = {}
    for name, unit, inputs, layouts in composite_ops(model64, x64, composites, eval_mode=eval_mode):
        module = name.rpartition(" · ")[0] if " · " in name else ""
        by_module.setdefault(module, []).extend(
            gradcheck_unit(unit, inputs, None, mode=mode, seed=seed, name=name, input_layouts=layouts))
    return _placed(rows, by_module)


def _function_row(check: mathcheck.MathCheck) -> GradRow:
    call = check.call
    note = check.note if check.status != "ok" else ""
    if check.status in ("unverifiable", "not_reproducible"):
        note = f"not checked ({check.status.replace('_', ' ')}): {check.note}"
    return GradRow(layer=f"{call.module} · {call.name}" if call.module else call.name,
                   tensor="custom Function <w, J v>", error=check.error, tolerance=check.tolerance,
                   status=_FUNCTION_STATUS[check.status], mode="function", scale=1.0, step=check.step,
                   directions=len(check.directions) or 1, origin={"finite_difference": check.tolerance},
                   note=note)


# -- one unit -------------------------------------------------------------------------------------------
def _check_unit(unit: UnitFunction, mode: str, pool: DirectionPool, full_limit: int, directions: int,
                covered: frozenset[str] = frozenset()) -> tuple[list[GradRow], list[Kink]]:
    """Rows of one unit. ``covered``: its parameters that a checked unit inside it owns (own rows there)."""
    if not unit.slots:
        return [GradRow(unit.name, "-", 0.0, 0.0, "skip", mode=mode,
                        note="no gradient flows through this unit in the step")], []
    rows: list[GradRow] = []
    kinks: list[Kink] = []
    joint = list(range(len(unit.slots)))
    if mode == "full":
        rest = []
        for s in joint:
            outcome = check_full(unit, s, full_limit)
            if outcome is None:
                rest.append(s)
            else:
                rows.append(_row(unit, [s], outcome, "full"))
                kinks += _kink(unit, [s], outcome)
        joint = rest
    if not joint:
        return rows, kinks
    if len(joint) < JOINT_FROM:  # one tensor at a time: cheap with folded points, and sharpest per tensor
        for s in joint:
            outcome = check_joint(unit, [s], pool, directions)
            rows.append(_row(unit, [s], outcome, "fast", full_note=mode == "full"))
            kinks += _kink(unit, [s], outcome)
        return rows, kinks
    outcome = check_joint(unit, joint, pool, directions)
    singles: list[int] = []
    if len(joint) > 1 and outcome.status == "fail":
        singles = list(joint)  # name the tensor: the same check, one tensor moving at a time
    elif len(joint) > 1 and outcome.status == "pass":
        # A tensor with a small share of the joint signal (BN's γ, β) gets its own, sharper check, unless
        # a unit inside this one owns it: its gradient is checked there, and here it only moves jointly
        # (re-checking each of a whole model's parameters alone cost 2/3 of gradcheck on small DenseNets).
        singles = [s for s, r in zip(joint, outcome.resolutions)
                   if r is not None and r > RESOLUTION_TARGET and unit.slots[s].name not in covered]
    checked = [(s, check_joint(unit, [s], pool, directions)) for s in singles]
    if outcome.status == "fail" and not any(o.status == "fail" for _, o in checked):
        checked = []  # only the joint comparison fails: report it as it is
    if outcome.status != "fail" or not checked:
        own = [(s, r) for s, r in zip(joint, outcome.resolutions) if unit.slots[s].name not in covered]
        rest = [r for s, r in own if s not in singles and r is not None]
        if singles or len(own) < len(joint):
            outcome.resolution = max(rest) if rest else None
            outcome.note = "; ".join(filter(None, [outcome.note, *(["re-checked alone: " + ", ".join(
                unit.slots[s].name for s in singles)] if singles else []), *([
                f"{len(joint) - len(own)} parameters of units inside move jointly only (own rows at their unit)"]
                if len(own) < len(joint) else [])]))
        rows.append(_row(unit, joint, outcome, "fast", full_note=mode == "full"))
        kinks += _kink(unit, joint, outcome)
    for s, o in checked:
        rows.append(_row(unit, [s], o, "fast", full_note=mode == "full"))
        kinks += _kink(unit, [s], o)
    return rows, kinks


def _row(unit: UnitFunction, slots: list[int], o: Outcome, mode: str, full_note: bool = False) -> GradRow:
    note = o.note
    if full_note:
        note = "; ".join(filter(None, [note, f"Jacobian over the full-mode limit: fast check ({o.directions} "
                                               "directions)"]))
    status = o.status
    if not (math.isfinite(o.error) and math.isfinite(o.tolerance)):  # nan <= nan is no pass, inf <= inf neither
        status = "nonfinite"
        note = "; ".join(filter(None, [note, "NaN/Inf in the error or its tolerance: never a pass"]))
    return GradRow(
        layer=unit.name, tensor="+".join(unit.slots[s].name for s in slots), error=o.error,
        tolerance=o.tolerance, status=status, mode=mode, scale=o.scale, resolution=o.resolution,
        step=o.eta, directions=o.directions, kinks=o.kink_count, origin=o.origin, note=note,
    )


def _kink(unit: UnitFunction, slots: list[int], o: Outcome) -> list[Kink]:
    if not o.kink_count:
        return []
    return [Kink(unit.name, "+".join(unit.slots[s].name for s in slots), o.kink_count, o.kink_fraction, o.eta,
                 o.status != "kink", sorted(o.sites))]


# -- model plumbing ---------------------------------------------------------------------------------------
def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def _needs_cast(module: nn.Module, inputs: Sequence[object]) -> bool:
    tensors = [t for t in (*module.parameters(), *module.buffers(), *inputs)
               if isinstance(t, Tensor) and t.is_floating_point()]
    return any(t.dtype != torch.float64 for t in tensors)


def _device_of(model: nn.Module, x: Tensor) -> torch.device:
    for p in model.parameters():
        return p.device
    return x.device


def _select(units: list[str], layers: list[str] | None, named: dict[str, nn.Module]) -> tuple[list[str], set[str]]:
    if not layers:
        return units, set()
    chosen: list[str] = []
    for layer in layers:
        if layer not in named:
            raise UsageError(f"unknown --layer {layer!r}: not a module of the model "
                             "(list unit names with `densenet-debug gradcheck --list`)")
        inside = [u for u in units if u == layer or (u.startswith(f"{layer}.") if layer else True)]
        if not inside:
            raise UsageError(f"--layer {layer!r} runs no computation of its own or below it")
        chosen += [u for u in inside if u not in chosen]
    return [u for u in units if u in chosen], {u for u in layers if u in units}


def _pad(values: list, n: int) -> list:
    return list(values[:n]) + [None] * (n - len(values))


@contextmanager
def _capturing_calls(model: nn.Module, names: list[str]) -> Iterator[dict[str, tuple[list, dict]]]:
    """Record each unit's first call (positional args incl. non-tensors, kwargs) for a faithful replay."""
    from densenet_debug._autograd import in_backward

    named = dict(model.named_modules())
    calls: dict[str, tuple[list, dict]] = {}
    handles = []
    for name in names:
        def hook(m: nn.Module, args: tuple, kwargs: dict, n: str = name) -> None:
            if n not in calls and not in_backward():
                calls[n] = ([a.detach() if isinstance(a, Tensor) else a for a in args], dict(kwargs))

        handles.append(named[name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _covered_below(name: str, units: list[str], named: dict[str, nn.Module], shared: set[int]) -> frozenset[str]:
    """Parameter names (relative to ``name``) that a checked unit strictly inside ``name`` owns, unshared."""
    prefix = f"{name}." if name else ""
    inside = [u for u in units if u != name and u.startswith(prefix)]
    return frozenset(f"{u[len(prefix):]}.{k}" for u in inside for k, p in named[u].named_parameters()
                     if id(p) not in shared)


def _shared_parameters(named: dict[str, nn.Module], units: list[str], trace) -> set[int]:
    """Parameters whose .grad sums several uses (tied weights, a module called twice): not one unit's answer."""
    seen: dict[int, int] = {}
    for name in units:
        module = named[name]
        if any(True for _ in module.children()):
            continue
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    shared = {k for k, c in seen.items() if c > 1}
    for name in units:
        if name in trace and trace[name].calls > 1:
            shared |= {id(p) for p in named[name].parameters()}
    return shared


def _recorded_grads(module: nn.Module, rec, shared: set[int]) -> dict[str, Tensor | None] | None:
    """The unit's own answer from the real step, or None (replay) when a parameter's .grad is not its alone."""
    params = dict(module.named_parameters())
    if any(id(p) in shared for p in params.values()):
        return None
    grads: dict[str, Tensor | None] = {}
    for i, g in enumerate(rec.grad_inputs):
        grads[f"input{i}"] = None if g is None else g.detach()
    for pname, p in params.items():
        grads[pname] = None if p.grad is None else p.grad.detach()
    return grads
