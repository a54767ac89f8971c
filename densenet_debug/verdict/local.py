"""Local (teacher-forced) rows: each unit of a side re-run on the oracle's inputs and grad_outputs.

A side is wrong at a unit only when one of these rows fails. The bound of every quantity is derived by
:mod:`densenet_debug.verdict.tolerance` for the precision that side computes it in (:func:`precision`), plus the
float64 teacher's own bound (:func:`with_teacher`: the oracle's record is one float64 evaluation of the unit on
the same inputs, and float64 rounds differently across machines); a NaN/Inf where the oracle is finite is
status ``nonfinite``, never a comparison (:mod:`densenet_debug.verdict.nonfinite`); exact ops
(cat, ReLU, flatten) must equal themselves evaluated in fp64 on the side's own rounded operands. A composite
unit (a module with its own math around children) is replayed whole; its tolerance adds its descendants'.

Every error and tolerance is read on the scale of the quantity's terms (max sum |terms| from the error model,
:mod:`densenet_debug.verdict.compare`), so tolerances of different units are numbers of one kind and their
first-order sums (:func:`compose_tolerances`, the propagated rule) are not swamped by a quantity whose truth
cancels to ~0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from densenet_debug.backends import Backend, unit_roundoff
from densenet_debug.trace import Trace, UnitRecord
from densenet_debug.verdict import kinks as kinkmod
from densenet_debug.verdict.compare import Comparison, compare, oracle_scale
from densenet_debug.verdict.nonfinite import finite
from densenet_debug.verdict.replay import Replay, exact_expectation, oracle_values, replay_unit
from densenet_debug.verdict.report import FAILING, Row, Status, UnitKink
from densenet_debug.verdict.tolerance import (
    EXACT,
    PIECEWISE,
    SLOPED,
    TEACHER_ORIGIN,
    U64,
    Precision,
    UnitBounds,
    fp64_precision,
    underflow,
)

QUANTITY_PASS = {"output": "forward", "buffer": "forward"}
NONFINITE_NOTE = "NaN/Inf where the fp64 oracle is finite"


def base(key: str) -> tuple[str, str, int | None]:
    """``grad_input.3`` -> (``grad_input``, ``backward``, 3); ``buffer.running_mean`` -> (``running_mean``...)."""
    head, _, tail = key.partition(".")
    if head == "buffer":
        return tail, "forward", None
    index = int(tail) if tail.isdigit() else None
    return head, QUANTITY_PASS.get(head, "backward"), index


def precision(backend: Backend, unit: str, bounds: UnitBounds, side_tensor: Tensor | None,
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
    if backend.autocast is not None and dtypes:
        # An op on low-precision operands may round its result to their dtype before it is cast up (the
        # gradient of an fp32 parameter of a BN that ran on bf16 activations): one rounding of that dtype.
        u_out = max(u_out, max(unit_roundoff(d) for d in dtypes))
    u_acc = backend.accumulate_roundoff if out_dtype != torch.float64 else unit_roundoff(torch.float64)
    u_cmp = max([u_acc] + [unit_roundoff(d) for d in dtypes])
    low = min(dtypes + [out_dtype], key=lambda d: torch.finfo(d).smallest_normal if d.is_floating_point else 0.0)
    eta = 2 * underflow(low)
    return Precision(u_op=u_op, u_acc=u_acc, u_out=u_out, lam=lam, eta=eta, u_cmp=u_cmp)


def element_count(oracle: list[Trace]) -> int:
    total = 0
    for trace in oracle:
        for rec in trace:
            total += sum(t.numel() for t in rec.outputs if t is not None)
            total += sum(t.numel() for t in rec.grad_inputs if t is not None)
            total += sum(t.numel() for t in rec.param_grads.values())
            total += sum(t.numel() for t in rec.buffers_after.values())
    return 4 * total  # two sides, local and propagated


def describe(p: Precision) -> str:
    def pw(u: float) -> str:
        return f"2^{round(math.log2(u))}" if u > 0 else "0"

    return (f"u_op={pw(p.u_op)} u_acc={pw(p.u_acc)} u_out={pw(p.u_out)} lam={p.lam:.1f} "
            "(Hoeffding, union bound: P(any false alarm) <= 1e-6)")


class _Aggregate:
    """Max over the tensors of one quantity (a cat's many grad_inputs make one row)."""

    def __init__(self) -> None:
        self.best = None
        self.index = None
        self.nonfinite = False

    def add(self, comp: object, index: int | None) -> None:
        self.nonfinite |= comp.nonfinite
        if self.best is None or comp.ratio > self.best.ratio or (comp.ratio == self.best.ratio
                                                                 and comp.error > self.best.error):
            keep_error = max(comp.error, self.best.error) if self.best is not None else comp.error
            self.best, self.index = comp, index
            self.best.error = keep_error
        elif comp.error > self.best.error:
            self.best.error = comp.error


def local_rows(name: str, step: int, module: nn.Module, o_rec: UnitRecord, s_rec: UnitRecord | None, bounds: UnitBounds,
                backend: Backend, lam: float, kinks_out: list[UnitKink], cache: dict | None = None) -> list[Row]:
    replay = replay_unit(module, o_rec, s_rec, backend)
    operands = [t for t in replay.inputs if t is not None]
    truth = oracle_values(o_rec, first_call=True)
    expected = _selected_bit_for_bit(module, replay) if bounds.exact else None
    proven = expected is not None  # every quantity already found equal, bit for bit: not compared again
    if expected is None:
        expected = exact_expectation(module, replay) if bounds.exact else truth
    exclude = None
    if bounds.kinky and kinkmod.is_kinky(module) and o_rec.inputs and operands:
        site = kinkmod.find(name, step, module, o_rec.inputs[0], replay.inputs[0])
        if site is not None:  # the oracle input itself rounds across the boundary (underflow, a tie)
            exclude = site.mask
            kinks_out.append(UnitKink(name, site.count, site.min_margin, site.relative_margin, "", step, "local"))
    groups: dict[str, _Aggregate] = {}
    meta: dict[str, tuple[str, str]] = {}
    keys = set(truth) | {k for k in replay.values if not k.startswith("buffer.") or k in truth}
    for key in sorted(keys):
        quantity, pass_, index = base(key)
        side_t, oracle_t = replay.values.get(key), expected.get(key, truth.get(key))
        if oracle_t is None and side_t is None:
            continue
        if bounds.exact:
            bound = exact_bound(side_t, operands, bounds.roundings)
            meta[quantity] = (pass_, bounds.origin)
        elif key in bounds:
            prec = precision(backend, name, bounds, side_t, operands, lam)
            bound = with_teacher(bounds, key, prec)
            meta[quantity] = (pass_, f"{bounds.origin}; {describe(prec)}; {TEACHER_ORIGIN}")
        else:  # integer buffers (num_batches_tracked) and anything without a model must match exactly
            bound = None
            meta.setdefault(quantity, (pass_, f"{bounds.origin}; no rounding model: must be exact"))
        ex = exclude if (exclude is not None and quantity == "grad_input" and side_t is not None
                         and side_t.shape == exclude.shape) else None
        # read on the scale of the terms the error model sums (never on a truth that cancels to ~0)
        if proven and key in expected and side_t is not None and side_t.numel():
            # S = max |truth| (no terms: an exact op sums none), of the oracle's record: memoised in ``cache``
            # for the other side and the propagated row of the same quantity
            basis = truth.get(key)
            scale = oracle_scale(basis, cache) if basis is not None and basis.shape == oracle_t.shape else \
                oracle_scale(oracle_t)
            comp = Comparison(0.0, 0.0, 0.0, (), int(ex.sum()) if ex is not None else 0, scale=scale)
        else:
            comp = compare(side_t, oracle_t, bound, ex, None if bounds.exact else cache,
                           None if bounds.exact else bounds.scale(key))
        # a NaN/Inf side makes the worst ratio non-finite; only then is it worth scanning for one
        comp.nonfinite = not math.isfinite(comp.ratio) and not finite(side_t) and finite(oracle_t)
        groups.setdefault(quantity, _Aggregate()).add(comp, index)
    rows = []
    for quantity, agg in groups.items():
        comp, index = agg.best, agg.index
        pass_, origin = meta[quantity]
        worst = ((index,) if index is not None and _multi(truth, quantity) else ()) + tuple(comp.worst)
        order = o_rec.forward_index if pass_ == "forward" else (o_rec.backward_index or 0)
        status = Status.NONFINITE if agg.nonfinite else (Status.OK if comp.ok else Status.MISMATCH)
        note = (NONFINITE_NOTE if agg.nonfinite else
                f"{comp.excluded} kink element(s) excluded" if comp.excluded else "")
        rows.append(Row(layer=name, pass_=pass_, quantity=quantity, error_a=comp.error, error_b=None,
                        tolerance=comp.tolerance, status=status, origin=origin, step=step, mode="local",
                        tolerance_a=comp.tolerance, ratio_a=comp.ratio, worst_a=worst or None, order=order,
                        note=note, scale=comp.scale))
    return rows


# Units that only select and move values (no arithmetic): their exact expectation in the side's own dtype is
# the fp64 one (tolerance.EXACT and the piecewise ops without a slope; by exact type, not a subclass of them).
_SELECTIONS = frozenset(EXACT + PIECEWISE) - frozenset(SLOPED)


def _selected_bit_for_bit(module: nn.Module, replay: Replay) -> dict[str, Tensor | None] | None:
    """The usual case of a selection unit, cheaply: its expectation evaluated in the operands' own dtypes, if
    every quantity of the replay equals it bit for bit (every row is then 0: ``compare`` sees equal tensors
    of one dtype without widening them); None otherwise, and the fp64 expectation judges as before. (Equal in
    the side's dtype is what "exact" asks; a clamp or threshold value the dtype cannot hold, 0.1, is then the
    side's 0.1 on both sides.)"""
    if type(module) not in _SELECTIONS:
        return None
    quick = exact_expectation(module, replay, wide=False)
    for key, want in quick.items():
        got = replay.values.get(key)
        if want is None or got is None or got.dtype != want.dtype or got.device != want.device or \
                not torch.equal(got, want):
            return None
    return quick


def with_teacher(bounds: UnitBounds, key: str, prec: Precision) -> Tensor | None:
    """The side's bound plus the teacher's: ``|side - teacher| <= |side - exact| + |teacher - exact|``.

    The teacher (the oracle's record of this unit) is a float64 evaluation of the same unit on the same
    inputs: on another machine, thread count or CPU kernel it rounds differently, within the float64 bound
    over the same magnitudes (:func:`~densenet_debug.verdict.tolerance.fp64_precision`).
    """
    return bounds.bound(key, prec.plus(fp64_precision(prec.lam)))


def exact_bound(side_t: Tensor | None, operands: list[Tensor], roundings: int = 0) -> Tensor | None:
    """Zero (None: must be bit-exact), unless the op stores its result in a narrower dtype than its operands
    (one rounding) or rounds ``roundings`` times per element in the side's dtype (leaky ReLU's slope and
    product): then ``(n u_side + 2^-53) |side| + n eta``, n the roundings (the fp64 expectation rounds once more),
    plus one ``u_side |side|`` for reading the bound on the side's value rather than the exact one."""
    if side_t is None or not side_t.is_floating_point():
        return None
    u_out = unit_roundoff(side_t.dtype)
    narrower = not all(unit_roundoff(t.dtype) >= u_out for t in operands if t.is_floating_point())
    n = roundings + (1 if narrower else 0)
    if n == 0:
        return None
    magnitude = side_t.detach().to("cpu", torch.float64).abs()
    if roundings == 0:  # the cast to a narrower dtype alone (as before)
        return magnitude * u_out
    return magnitude * ((n + 1) * u_out + U64) + n * underflow(side_t.dtype)


def _multi(values: dict, quantity: str) -> bool:
    return sum(1 for k in values if k.startswith(quantity + ".")) > 1


Composed = dict[tuple[int, str, str], float]


def inside(name: str, unit: str) -> bool:
    """``name`` is a descendant of ``unit``; every unit is inside the model's own (``""``)."""
    return name != unit and (unit == "" or name.startswith(unit + "."))


def ancestors(names: Iterable[str]) -> set[str]:
    """Every unit name some other of ``names`` lies :func:`inside` (``""`` included when any name is not
    ``""``): one pass over the names, not a test of every pair."""
    out: set[str] = set()
    for name in names:
        if name:
            out.add("")
            parts = name.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def compose_tolerances(local: list[Row], names: list[str]) -> Composed:
    """A composite unit's replay runs its descendants too: its tolerance adds theirs (first order, per pass).

    Returns what was added, per (step, composite unit, pass), so a composite judged again elsewhere (the
    propagated rule's :func:`~densenet_debug.verdict.propagated.self_consistent`) gets the same allowance.
    """
    composites = set(names) & ancestors(names)
    added: Composed = {}
    if not composites:
        return added
    per_unit: dict[tuple[int, str, str], float] = {}
    for r in local:
        key = (r.step, r.layer, r.pass_)
        per_unit[key] = max(per_unit.get(key, 0.0), r.tolerance)
    for r in local:
        if r.layer not in composites:
            continue
        extra = sum(t for (step, layer, pass_), t in per_unit.items()
                    if step == r.step and pass_ == r.pass_ and inside(layer, r.layer))
        if r.pass_ == "backward":  # the backward of the descendants runs on their own forward values
            extra += sum(t for (step, layer, pass_), t in per_unit.items()
                         if step == r.step and pass_ == "forward" and inside(layer, r.layer))
        if extra <= 0:
            continue
        added[(r.step, r.layer, r.pass_)] = extra
        r.tolerance = r.tolerance_a = r.tolerance + extra
        r.ratio_a = r.error_a / r.tolerance if r.tolerance > 0 else math.inf
        if r.status == Status.NONFINITE:
            continue
        r.status = Status.OK if r.error_a <= r.tolerance else Status.MISMATCH
        r.origin += "; plus the sum of its descendant units' local tolerances (first order)"
    return added


def blame_children(local: list[Row], names: list[str]) -> None:
    """A failing composite unit with a failing descendant is not the culprit; the descendant is.

    The model's own unit too, but only by a descendant's finite failure (``mismatch``, ``math``): a descendant
    non-finite in its teacher-forced replay may just have been handed the oracle's value beyond its dtype's range
    (``exp(200 x)`` cast to float32), which the model's own forward code produced.
    """
    failing = {(r.step, r.layer) for r in local if r.status in FAILING}
    finite = {(r.step, r.layer) for r in local if r.status in (Status.MISMATCH, Status.MATH)}
    for r in local:
        if r.status not in FAILING:
            continue
        kids = [n for (s, n) in (failing if r.layer else finite) if s == r.step and inside(n, r.layer)]
        if kids:
            r.explained_by = sorted(kids)[0]
            r.note = f"explained by failing unit {r.explained_by}"
