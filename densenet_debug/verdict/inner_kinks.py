"""Kinks inside a composite unit: a piecewise op written anywhere in a unit's own forward (``F.relu(self.bn1(x))``,
``torch.clamp``, ``torch.where(x > 0, ...)``), or in the children a composite's replay runs, whose input lies
within rounding of one of its branch boundaries.

A composite unit is replayed whole in the side's dtype on the oracle's inputs (:mod:`.replay`). When one of
its inner piecewise ops sees an element within rounding of a boundary, the side takes the other branch there
and the composite's grad_input differs by a whole term (by a jump of the value, for a ``where`` on a
comparison): far beyond its tolerance, yet no fault. Module-level kink detection (:mod:`.kinks`) only sees
kinky *units*, never a functional op inside one.

When a local row of a unit fails, :func:`explain` replays the unit twice more under a dispatch mode that
records, for every call of a covered op, each element's *branch*: once as the side (its module, dtype, flags)
and once as the fp64 reference module, on the same oracle inputs. The branch is derived from the op's
*inputs*, upcast exactly to float64, through :func:`densenet_debug.capture.kinks.signed_coordinate` (scalar
bounds first rounded to the input's dtype, as the kernel rounds them), never from what the kernel returned:
a kernel that decides wrong on its own inputs (a relu passing negatives) takes no "other branch" and is not
excused. Max-pool's branch is its argmax, which only the kernel returns; a side's argmax counts only where it
is a maximum of the side's own window (recomputed in float64), so a pool that picks a wrong pixel is no kink.

Calls are matched by op and order (the two replays run the same code); an op whose calls cannot be matched
(a count or a shape differs) is left as it is, which can only keep a row failing. Elements on different
branches are the flips. The *counterfactual* is the fp64 replay again, taking the side's branch at exactly
those elements of exactly those calls: the forward op's output there is what its side's branch gives on the
fp64 operands, and so is the backward op's, whose branch is read from its own inputs the same way (a
``threshold_backward`` from the relu output or the threshold input it reads, ``hardtanh_backward``,
``leaky_relu_backward``, ``sgn`` for abs, the ``ge``/``le``/``eq``/``gt``/``lt`` comparisons that clamp's and
maximum's backward formulas run). Max-pool's backward reads the forced argmax itself, and a ``where`` the
forced comparison result. If the side's replay agrees with the counterfactual within the row's tolerance,
the row is status ``kink`` (explained); otherwise it stays ``mismatch``. A row with no flipped element is
never excused, and an op not listed below forces nothing, so it excuses nothing.

A backward op that reads its forward op's *result* (relu's ``threshold_backward``, in-place hardtanh's and
leaky relu's backward) would take its branch from a kernel's output after all; its flips are kept only if
they number no more than the flips of the forward ops it can belong to (checkpoint recompute runs those
again, so a kink's backward never has more), so a forward kernel that passes what it should not (its
backward then "flips" where its forward did not) is not excused.

Covered (in place or not): ``relu``, ``threshold`` and their ``threshold_backward``; ``hardtanh`` (``F.relu6``)
and ``hardtanh_backward``; ``clamp``/``clamp_min``/``clamp_max`` with scalar bounds (their backward is
comparisons and a ``where``); ``leaky_relu`` and ``leaky_relu_backward`` (a slope change); ``abs`` and
``sgn``/``sign``; ``max_pool2d_with_indices`` (``F.max_pool2d``, ``F.max_pool1d``; argmax ties) and its
backward; the comparisons ``gt``/``ge``/``lt``/``le``/``eq``/``ne`` against a tensor or a scalar, so any
``where``/``masked_fill`` on one, and every op whose backward formula selects by a comparison (``maximum``/
``minimum`` also forward; ``amax``/``amin`` ties through their backward's ``eq``). Not covered (they force
nothing, so they excuse nothing): clamp with tensor bounds, ``max_pool3d``, adaptive max pools, ``max``/
``min`` over a dim, ``sort``/``topk``/``argmax`` (gradients routed by indices), integer and complex inputs.

**Margins.** A kink's margin is the fp64 distance to the boundary at a flipped element (max-pool: the gap
between the window's fp64 maximum and the fp64 value at the side's pick), of a forward call when one
flipped, else of a backward one; relative to the call's largest distance.

**Memory and time.** The side's replay keeps a branch per element (one byte; a max-pool's int64 argmax per
window), read from the op's input in place where the boundary is 0 (no copy); the reference replay,
recorded against the side's calls, keeps only the masks of calls that flipped. A relu costs one comparison
of its input and one of its ``threshold_backward``'s on each side and keeps 2 bytes per element on the side,
none on the reference (a float64 copy of every relu input on both sides would keep 16).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from densenet_debug.capture.kinks import signed_coordinate
from densenet_debug.capture.mode import _non_tensor_arguments
from densenet_debug.capture.records import OpRecord
from densenet_debug.trace import Trace, UnitRecord
from densenet_debug.verdict import kinks as kinkmod
from densenet_debug.verdict.replay import Replay, replay_unit, side_values
from densenet_debug.verdict.report import Row, Status, UnitKink

# Branch codes per element: bool for two branches (passes or not), int8 -1/0/1 for a sign, int8 0/1/2 for
# below / inside / above a band, int64 argmax indices for a max-pool window.
_BELOW, _INSIDE, _ABOVE = 0, 1, 2
_MAX_POOL = "max_pool2d_with_indices"
_COMPARISONS = ("gt", "ge", "lt", "le", "eq", "ne")


def kind_of(func: object) -> str:
    """``aten.relu_.default`` -> ``relu``: the op a call is matched and forced by."""
    name = str(func)
    name = name.split(".")[1] if name.startswith("aten.") else name
    return name.rstrip("_")


def _argument(func: object, args: tuple, kwargs: dict, name: str) -> object:
    """The argument ``name`` of a call, by ``func``'s schema (its default when not passed)."""
    for i, a in enumerate(func._schema.arguments):  # type: ignore[attr-defined]
        if a.name == name:
            if i < len(args):
                return args[i]
            return kwargs.get(name, a.default_value if a.has_default_value() else None)
    return None


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _rounded(value: object, dtype: torch.dtype) -> object:
    """A float scalar as the kernel sees it: rounded to the floating dtype of the tensor it meets."""
    if isinstance(value, float) and dtype.is_floating_point:
        return float(torch.tensor(value, dtype=dtype))
    return value


def _coordinate(as_op: str, shift: tuple[str, ...], band: bool, func: object, args: tuple, kwargs: dict,
                tensors: list[Tensor]) -> Tensor | None:
    """:func:`signed_coordinate` of ``tensors`` under ``as_op``'s boundary, with the call's scalar arguments
    rounded to the dtype of ``tensors[0]``.

    ``shift``: the scalar arguments the coordinate subtracts. ``x - 0`` is ``x``, exact in its own dtype, on
    its own device (relu, abs, leaky relu, a threshold or a comparison at 0: no copy at all); any other shift,
    or a second tensor, is taken in float64, where the difference of two values upcast from one dtype has the
    exact sign.
    """
    dtype = tensors[0].dtype
    arguments = tuple((n, _rounded(v, dtype)) for n, v in _non_tensor_arguments(func, args, kwargs))
    exact = len(tensors) == 1 and all(v == 0 for n, v in arguments if n in shift and _number(v))
    if exact and not band:
        return tensors[0].detach()
    values = [t.detach() if exact else t.detach().to(torch.float64) for t in tensors]
    record = OpRecord(index=0, key=(), phase="forward", op=as_op, module="", input_layouts=(), arguments=arguments,
                      output_layouts=(), input_values=values)  # type: ignore[arg-type]
    z = signed_coordinate(record)
    return None if z is None else z.detach()


# -- which tensors a call's branch is read from (a structural test: recording and forcing count alike) -----
Operands = Callable[[object, tuple, dict], "list[Tensor] | None"]


def _floating(i: int) -> Operands:
    def operands(func: object, args: tuple, kwargs: dict) -> list[Tensor] | None:
        x = args[i] if i < len(args) else None
        return [x] if isinstance(x, Tensor) and x.is_floating_point() else None
    return operands


def _scalar_bounds(*names: str) -> Operands:
    """The input, when every bound present is a number (clamp with tensor bounds is not covered)."""
    def operands(func: object, args: tuple, kwargs: dict) -> list[Tensor] | None:
        bounds = [_argument(func, args, kwargs, n) for n in names]
        if any(isinstance(b, Tensor) for b in bounds) or not any(_number(b) for b in bounds):
            return None
        return _floating(0)(func, args, kwargs)
    return operands


def _compared(func: object, args: tuple, kwargs: dict) -> list[Tensor] | None:
    a, b = args[0] if args else None, _argument(func, args, kwargs, "other")
    if not isinstance(a, Tensor) or a.is_complex() or a.dtype == torch.bool:
        return None
    if isinstance(b, Tensor):
        return None if b.is_complex() or b.dtype == torch.bool else [a, b]
    return [a] if _number(b) else None


def _both(func: object, args: tuple, kwargs: dict) -> list[Tensor] | None:
    got = _compared(func, args, kwargs)
    return got if got is not None and len(got) == 2 else None


# -- the branch from the signed coordinate --------------------------------------------------------------------
Code = Callable[[Tensor, object, tuple, dict], Tensor]


def _positive(z: Tensor, func: object, args: tuple, kwargs: dict) -> Tensor:
    return z > 0


def _sign(z: Tensor, func: object, args: tuple, kwargs: dict) -> Tensor:
    return torch.sign(z).to(torch.int8)


def _hardtanh_band(z: Tensor, func: object, args: tuple, kwargs: dict) -> Tensor:
    """Strict: a bound itself is outside (hardtanh_backward passes nothing there)."""
    code = torch.full(z.shape[1:], _INSIDE, dtype=torch.int8)
    code[z[1] >= 0] = _ABOVE
    code[z[0] <= 0] = _BELOW
    return code


def _clamp_band(z: Tensor, func: object, args: tuple, kwargs: dict) -> Tensor:
    """Inclusive: clamp's backward passes the gradient at a bound. ``z`` has a row per bound present, ``min``
    first (clamp_min and clamp_max: two equal rows)."""
    code = torch.full(z.shape[1:], _INSIDE, dtype=torch.int8)
    op = kind_of(func)
    if op == "clamp_max" or (op == "clamp" and _number(_argument(func, args, kwargs, "max"))):
        code[z[-1] > 0] = _ABOVE
    if op == "clamp_min" or (op == "clamp" and _number(_argument(func, args, kwargs, "min"))):
        code[z[0] < 0] = _BELOW
    return code


def _comparison(op: str) -> Code:
    test = {"gt": torch.gt, "ge": torch.ge, "lt": torch.lt, "le": torch.le, "eq": torch.eq, "ne": torch.ne}[op]

    def code(z: Tensor, func: object, args: tuple, kwargs: dict) -> Tensor:
        return test(z, 0)
    return code


# -- the op's values on the side's branch, from the fp64 arguments, at the flipped elements ------------------
Force = Callable[[object, tuple, dict, Tensor, Tensor], Tensor]


def _passes_or(fill: Callable[[object, tuple, dict, Tensor], Tensor], i: int = 0) -> Force:
    """``args[i]`` where the side's branch passes, ``fill`` of it elsewhere."""
    def force(func: object, args: tuple, kwargs: dict, branch: Tensor, mask: Tensor) -> Tensor:
        x = args[i].expand(mask.shape)[mask]
        passes = branch if branch.dtype == torch.bool else branch == _INSIDE
        return torch.where(passes, x, fill(func, args, kwargs, x))
    return force


def _zero(func: object, args: tuple, kwargs: dict, x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def _value(func: object, args: tuple, kwargs: dict, x: Tensor) -> Tensor:
    return torch.full_like(x, float(_argument(func, args, kwargs, "value")))  # type: ignore[arg-type]


def _sloped(func: object, args: tuple, kwargs: dict, x: Tensor) -> Tensor:
    return x * float(_argument(func, args, kwargs, "negative_slope"))  # type: ignore[arg-type]


def _bounded(lo: str, hi: str) -> Force:
    def force(func: object, args: tuple, kwargs: dict, branch: Tensor, mask: Tensor) -> Tensor:
        x = args[0][mask]
        low, high = _argument(func, args, kwargs, lo), _argument(func, args, kwargs, hi)
        out = x.clone()
        if _number(low):
            out = torch.where(branch == _BELOW, torch.full_like(x, float(low)), out)
        if _number(high):
            out = torch.where(branch == _ABOVE, torch.full_like(x, float(high)), out)
        return out
    return force


def _signed_x(func: object, args: tuple, kwargs: dict, branch: Tensor, mask: Tensor) -> Tensor:
    return branch.to(args[0].dtype) * args[0][mask]


def _branch_itself(func: object, args: tuple, kwargs: dict, branch: Tensor, mask: Tensor) -> Tensor:
    """sgn/sign and comparisons: the output *is* the branch."""
    return branch


def _extremum(larger: bool) -> Force:
    def force(func: object, args: tuple, kwargs: dict, branch: Tensor, mask: Tensor) -> Tensor:
        a, b = args[0].expand(mask.shape)[mask], args[1].expand(mask.shape)[mask]
        takes_b = branch < 0 if larger else branch > 0
        return torch.where(takes_b, b, a)
    return force


@dataclass(frozen=True)
class _Rule:
    """How one op's calls are coded (``operands`` read under ``as_op``'s boundary, turned into a branch per
    element by ``code``) and forced (``force``: the values on the side's branch at the flipped elements).

    ``reads_result_of``: for a backward op whose input may be its forward op's output, those forward ops
    (their flips bound this op's, module docstring). ``argmax``: the branch is the op's argmax output, coded
    and forced after the call (:func:`_max_pool_call`, :func:`_force_max_pool`), not by ``code``/``force``.
    """

    as_op: str
    operands: Operands
    code: Code | None
    force: Force | None
    shift: tuple[str, ...] = ()  # the scalar arguments the coordinate subtracts (:func:`_coordinate`)
    band: bool = False
    reads_result_of: tuple[str, ...] = ()
    argmax: bool = False


_RULES: dict[str, _Rule] = {
    "relu": _Rule("aten.relu.default", _floating(0), _positive, _passes_or(_zero)),
    "threshold": _Rule("aten.threshold.default", _floating(0), _positive, _passes_or(_value), ("threshold",)),
    "threshold_backward": _Rule("aten.threshold.default", _floating(1), _positive, _passes_or(_zero), ("threshold",),
                                reads_result_of=("relu", "threshold")),
    "hardtanh": _Rule("aten.hardtanh.default", _scalar_bounds("min_val", "max_val"), _hardtanh_band,
                      _bounded("min_val", "max_val"), ("min_val", "max_val"), band=True),
    "hardtanh_backward": _Rule("aten.hardtanh.default", _floating(1), _hardtanh_band, _passes_or(_zero),
                               ("min_val", "max_val"), band=True, reads_result_of=("hardtanh",)),
    "clamp": _Rule("aten.clamp.default", _scalar_bounds("min", "max"), _clamp_band, _bounded("min", "max"),
                   ("min", "max"), band=True),
    "clamp_min": _Rule("aten.clamp_min.default", _scalar_bounds("min"), _clamp_band, _bounded("min", "max"),
                       ("min",), band=True),
    "clamp_max": _Rule("aten.clamp_max.default", _scalar_bounds("max"), _clamp_band, _bounded("min", "max"),
                       ("max",), band=True),
    "leaky_relu": _Rule("aten.leaky_relu.default", _floating(0), _positive, _passes_or(_sloped)),
    "leaky_relu_backward": _Rule("aten.leaky_relu.default", _floating(1), _positive, _passes_or(_sloped),
                                 reads_result_of=("leaky_relu",)),
    "abs": _Rule("aten.abs.default", _floating(0), _sign, _signed_x),
    "sgn": _Rule("aten.abs.default", _floating(0), _sign, _branch_itself),
    "sign": _Rule("aten.abs.default", _floating(0), _sign, _branch_itself),
    "maximum": _Rule("aten.gt.Tensor", _both, _sign, _extremum(larger=True)),
    "minimum": _Rule("aten.gt.Tensor", _both, _sign, _extremum(larger=False)),
    **{op: _Rule(f"aten.{op}.Tensor", _compared, _comparison(op), _branch_itself, ("other",)) for op in _COMPARISONS},
    _MAX_POOL: _Rule("aten.max_pool2d_with_indices.default", _floating(0), None, None, argmax=True),
}


def decision_coordinate(op: str, func: object, args: tuple, kwargs: dict) -> Tensor | None:
    """The signed coordinate of piecewise op ``op``'s decision on its operands (zero on the boundary, the sign
    its branch), as this module reads it for every op it covers; None where it covers none (backward ops that
    read a forward result, a max-pool's argmax, an op without a rule)."""
    rule = _RULES.get(op)
    if rule is None or rule.reads_result_of or rule.argmax:
        return None
    tensors = rule.operands(func, args, kwargs)
    if tensors is None:
        return None
    return _coordinate(rule.as_op, rule.shift, rule.band, func, args, kwargs, tensors)


def _in_backward() -> bool:
    """Inside an autograd backward pass (a checkpoint's recompute included)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _Call:
    """One coded call of the side (its branch per element) or of the reference (where its branch differs from
    the side's call of the same op and order, and how close to the boundary it was there)."""

    kind: str
    backward: bool
    shape: tuple[int, ...] | None  # None: the call could not be coded; its op is then left unforced
    arguments: tuple = ()  # its non-tensor arguments as passed: a threshold that differs is another op
    code: Tensor | None = None  # side: the branch of every element (a max-pool's argmax per window), on the CPU
    valid: Tensor | None = None  # side, max-pool: the argmax is a maximum of the side's own window
    flipped: Tensor | None = None  # reference: elements on another branch than the side's (None: none)
    margin: float = math.inf  # reference: its smallest distance to the boundary at a flipped element
    relative: float = math.inf  # margin / its largest distance in the call


def _flipped(ref: _Call, code: Tensor, side: _Call | None) -> Tensor | None:
    """The reference's elements on another branch than the side's call ``side`` (matched by op and order)."""
    if side is None or side.code is None or side.backward != ref.backward or side.code.shape != code.shape \
            or side.arguments != ref.arguments:
        return None
    mask = side.code != code
    if side.valid is not None:  # a max-pool argmax that is no maximum of the side's own window is no kink
        mask &= side.valid
    return mask if mask.numel() and bool(mask.view(torch.uint8).amax()) else None  # amax: 40x faster than any()


def _closest(call: _Call, distance: Tensor, at: Tensor | None = None) -> None:
    """The reference's margin at its flipped elements (``at``: the distances there, when not ``distance``'s)."""
    gap = float((distance if at is None else at)[call.flipped].min())
    scale = float(distance.max())
    call.margin, call.relative = gap, (gap / scale if scale > 0 else math.inf)


def _max_pool_call(func: object, args: tuple, kwargs: dict, out: object, backward: bool, side: _Call | None,
                   reference: bool) -> _Call:
    x, idx = args[0].detach(), out[1].detach().cpu()  # type: ignore[index]
    x64 = x.to("cpu", torch.float64)
    call = _Call(_MAX_POOL, backward, tuple(idx.shape), _non_tensor_arguments(func, args, kwargs))
    if reference:
        call.flipped = _flipped(call, idx, side)
        if call.flipped is not None:  # the fp64 gap between its maximum and the side's pick
            flat = x64.flatten(-2)
            top = flat.gather(-1, idx.flatten(-2)).view(idx.shape)
            chosen = flat.gather(-1, side.code.flatten(-2)).view(idx.shape)  # type: ignore[union-attr]
            _closest(call, x64.abs(), (top - chosen))
        return call
    window_max = torch.ops.aten.max_pool2d_with_indices.default(x64, *args[1:], **kwargs)[0]
    call.code = idx.clone()
    call.valid = x64.flatten(-2).gather(-1, idx.flatten(-2)).view(idx.shape) == window_max
    return call


class _Record(TorchDispatchMode):
    """The branch of every element of every covered call, in call order.

    ``against``: the side's calls; the reference run then keeps, per call, only where it differs from the
    side's call of the same op and order, and its margin there (no tensor of every element is kept).
    """

    def __init__(self, against: list[_Call] | None = None) -> None:
        super().__init__()
        self.reference = against is not None
        self.side: dict[str, list[_Call]] = {}
        for c in against or []:
            self.side.setdefault(c.kind, []).append(c)
        self.calls: list[_Call] = []
        self.counts: dict[str, int] = {}

    def _match(self, kind: str) -> _Call | None:
        k = self.counts.get(kind, 0)
        self.counts[kind] = k + 1
        matched = self.side.get(kind, [])
        return matched[k] if k < len(matched) else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        kind = kind_of(func)
        rule = _RULES.get(kind)
        tensors = rule.operands(func, args, kwargs) if rule is not None else None
        if tensors is None:
            return func(*args, **kwargs)
        side = self._match(kind)
        if rule.argmax:
            out = func(*args, **kwargs)
            try:
                self.calls.append(_max_pool_call(func, args, kwargs, out, _in_backward(), side, self.reference))
            except (RuntimeError, TypeError, ValueError, IndexError):
                self.calls.append(_Call(kind, _in_backward(), None))
            return out
        self.calls.append(self._code(kind, rule, func, args, kwargs, tensors, side))  # before: it may write x
        return func(*args, **kwargs)

    def _code(self, kind: str, rule: _Rule, func: object, args: tuple, kwargs: dict, tensors: list[Tensor],
              side: _Call | None) -> _Call:
        backward = _in_backward()
        try:
            z = _coordinate(rule.as_op, rule.shift, rule.band, func, args, kwargs, tensors)
            if z is None:
                return _Call(kind, backward, None)
            code = rule.code(z, func, args, kwargs).cpu()  # type: ignore[misc]
            call = _Call(kind, backward, tuple(code.shape), _non_tensor_arguments(func, args, kwargs))
            if not self.reference:
                call.code = code
                return call
            call.flipped = _flipped(call, code, side)
            if call.flipped is not None:
                _closest(call, (z.abs().amin(0) if rule.band else z.abs()).to("cpu", torch.float64))
            return call
        except (RuntimeError, TypeError, ValueError):  # e.g. a layout that cannot be read back: not coded
            return _Call(kind, backward, None)


@dataclass
class InnerKinks:
    """The flipped elements of one unit's side replay against the fp64 replay."""

    count: int  # flipped elements of forward calls (of any call when no forward call flipped)
    calls: int  # calls with at least one flip
    min_margin: float  # smallest fp64 distance to the boundary at a flipped element (forward calls first)
    relative_margin: float  # min_margin / largest distance of that call
    flips: dict[str, dict[int, tuple[Tensor, Tensor]]]  # op -> call index -> (flipped mask, side's branch)
    by_op: dict[str, int]  # op -> elements counted in ``count``

    @property
    def what(self) -> str:
        """``3 relu`` / ``2 hardtanh, 1 gt``: what took the other branch."""
        return ", ".join(f"{n} {op}" for op, n in self.by_op.items())


def find(side_calls: list[_Call], ref_calls: list[_Call]) -> InnerKinks | None:
    """Flipped elements of the matched calls; None when nothing that can be matched flipped.

    ``ref_calls`` recorded against ``side_calls`` (:class:`_Record`). Calls are matched per op by order; an
    op whose calls differ in number, phase or shape on the two sides, or one of whose calls could not be
    coded, is left out (unforced: it can only keep a row failing).
    """
    ops: dict[str, tuple[list[_Call], list[_Call]]] = {}
    for c in side_calls:
        ops.setdefault(c.kind, ([], []))[0].append(c)
    for c in ref_calls:
        ops.setdefault(c.kind, ([], []))[1].append(c)
    flips: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    flipped: dict[str, int] = {}  # op -> flipped elements, every phase
    forward: dict[str, int] = {}
    margins: dict[str, list[tuple[bool, float, float]]] = {}  # forward calls' first
    for op, (side, ref) in ops.items():
        if len(side) != len(ref) or any(s.shape is None or s.shape != r.shape or s.backward != r.backward
                                        or s.arguments != r.arguments
                                        for s, r in zip(side, ref)):
            continue
        for k, (s, r) in enumerate(zip(side, ref)):
            if r.flipped is None or s.code is None:
                continue
            n = int(r.flipped.sum())
            flips.setdefault(op, {})[k] = (r.flipped, s.code[r.flipped])
            flipped[op] = flipped.get(op, 0) + n
            margins.setdefault(op, []).append((s.backward, r.margin, r.relative))
            if not s.backward:
                forward[op] = forward.get(op, 0) + n
    for op in list(flips):
        rule = _RULES.get(op)
        if rule is not None and rule.reads_result_of and \
                flipped[op] > sum(flipped.get(f, 0) for f in rule.reads_result_of):
            del flips[op]  # a result read wrong: its forward kernel, not a kink (module docstring)
            forward.pop(op, None)
            margins.pop(op, None)
    if not flips:
        return None
    by_op = forward or {op: flipped[op] for op in flips}
    _, margin, relative = min((m for ms in margins.values() for m in ms), default=(True, math.inf, math.inf))
    return InnerKinks(count=sum(by_op.values()), calls=sum(len(v) for v in flips.values()), min_margin=margin,
                      relative_margin=relative, flips=flips, by_op=by_op)


class _Force(TorchDispatchMode):
    """The fp64 run taking the side's branch at the flipped elements of each covered call (by op and order)."""

    def __init__(self, flips: dict[str, dict[int, tuple[Tensor, Tensor]]]) -> None:
        super().__init__()
        self.flips = flips
        self.calls: dict[str, int] = {}

    def _next(self, kind: str) -> tuple[Tensor, Tensor] | None:
        k = self.calls.get(kind, 0)
        self.calls[kind] = k + 1
        return self.flips.get(kind, {}).get(k)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        kind = kind_of(func)
        rule = _RULES.get(kind)
        if rule is None or rule.operands(func, args, kwargs) is None:
            return func(*args, **kwargs)
        flip = self._next(kind)
        if flip is None:
            return func(*args, **kwargs)
        if rule.argmax:
            out = func(*args, **kwargs)
            _force_max_pool(args[0], out, *flip)
            return out
        mask, branch = flip
        with torch.no_grad():
            forced = rule.force(func, args, kwargs, branch, mask)  # before the call: it may write its input
            out = func(*args, **kwargs)
            out[mask.to(out.device)] = forced.to(out.device, out.dtype)
        return out


def _force_max_pool(x: Tensor, out: tuple[Tensor, Tensor], mask: Tensor, branch: Tensor) -> None:
    """The side's argmax at the flipped windows, and the fp64 input there as the pooled value."""
    values, idx = out
    with torch.no_grad():
        idx[mask] = branch.to(idx.device)
        at = x.detach().flatten(-2).gather(-1, idx.flatten(-2)).view(idx.shape)
        values[mask] = at[mask].to(values.dtype)


class _Fp64:
    """The fp64 CPU backend the reference replay runs under (what :func:`replay_unit` reads of a Backend)."""

    device = torch.device("cpu")
    param_dtype = torch.float64

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        yield


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
        ref = _Record(against=rec.calls)
        with ref:
            replay_unit(ref_module, o_rec, None, _Fp64())
        found = find(rec.calls, ref.calls)
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
            r.note = (f"{found.what} element(s) inside {name or 'the model'} took the other branch "
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
    """Turn failing local rows that the inner kinks of their unit (any covered op) explain into ``kink`` rows."""
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
