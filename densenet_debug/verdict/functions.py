"""Custom autograd Functions as teacher-forced units of their own, forward and backward.

A custom ``torch.autograd.Function`` is a composite the user wrote by hand: a wrong *composition* of correct
ops (a cat backward that hands an input the wrong slice) passes every per-op check, and a module that calls it
fails as a whole without saying which of its parts is wrong. So every call of a user's Function is a unit too,
as a module is: replayed whole on the oracle's inputs and grad_outputs, and the smallest failing unit is blamed
(a Function before the module it ran in).

**Recording** (:class:`FunctionRecorder`, around each side's traced step and the oracle's). For the step's length
``torch.autograd.Function.apply`` is wrapped (and restored on exit): a user's Function applied is seen with its
class, its arguments (tensor inputs copied at once: a later in-place op cannot reach them) and its outputs, whose
``grad_fn`` is the Function's own node (a ``BackwardCFunction``, ``_forward_cls`` the class). A pre-hook on that
node copies the grad_outputs it receives and a hook what its backward returns (grad_inputs) — hooks on the
Function's own node, not module backward hooks, which break in-place ops. (Wrapping ``apply`` costs nothing per
op; a ``sys.setprofile`` callback, as :mod:`~densenet_debug.verdict.mathcheck` uses for its one extra forward,
cost a traced BC-100 step 20-40 %.) The module path is the innermost module whose forward is running (forward
pre/post hooks on every module); ``(model)`` for the model's own forward. A call is named by (module path, class,
occurrence k among that module's calls of that class, in forward order): ``dense.1 · CatFn``, ``dense.1 ·
CatFn#2`` for the second. The oracle's records hold float64 values (through a
:class:`~densenet_debug.trace.TensorStore`, so past the memory budget they go to disk); a side's hold only what
its replay needs: each input's dtype and layout and each grad_output's layout. A call one side made and the
oracle did not (a branch on the dtype in the user's code) has nothing to be teacher-forced with: a note row says
so, never dropped silently. A checkpoint's recompute (autograd is running a backward) names no new call: a
non-reentrant one repeats a call whose node is already hooked, and a reentrant one, whose forward ran without
grad, supplies the node of the call it repeats (found by class, shapes and a value fingerprint). Functions
defined by torch or by this tool are skipped. Measured: a diff of a 16-layer in-place DenseNet block whose cats
are a custom Function (batch 8, 32x32, mkldnn vs native) took as long as with ``torch.cat`` (42 s), and its peak
memory rose from 3.4 to 4.2 GB (the oracle's float64 records of the calls).

**Teacher forcing** (:func:`function_rows`). The call is wrapped in a parameterless module (:class:`Applied`:
``cls.apply`` with the recorded non-tensor arguments in place) and judged exactly as a module unit is
(:func:`~densenet_debug.verdict.local.local_rows`): the oracle's float64 inputs cast to the dtype the side saw and
rebuilt in its layout, ``cls.apply`` under the side's :meth:`~densenet_debug.backends.Backend.active` flags, the
backward by ``autograd.grad`` with the oracle's grad_outputs cast to the outputs' dtype in the layout the side's
node received them. A Function has no error model of its own, so its bound is the generic one of a unit without
one (:func:`~densenet_debug.verdict.tolerance.unit_bounds` on the wrapper: every aten op of the forward and of the
hand-written backward evaluated on the magnitudes of its operands, ``M = sum |terms|``, K = all input elements:
``(2 u_op + lam u_acc sqrt(K) + u_out) M + eta``, plus the float64 teacher's own), raised to a matmul's operand
rounding (TF32, autocast) when the Function's own math runs a convolution or a matrix product. Non-finite values
where the oracle is finite are status ``nonfinite``, never compared. A Function that draws from torch's generator
(its state moved during the oracle's call: a dropout written by hand) cannot be replayed with the oracle's draws;
it is a note row, not judged (the math check reseeds its draws).

**Kinks inside.** A piecewise op inside the Function (``F.relu(a - b)``) whose input lies within rounding of its
boundary can take the other branch in the side's replay than in the oracle's float64 run (the cast of the inputs
or rounding inside moves it across): the gradient then jumps by what the branch routes, which no rounding bound
covers. Where a backward row fails, the forward is run once more on each side of the comparison under a dispatch
mode that fingerprints every piecewise op's branch per element (:class:`_Branches`); if they differ, the
failing backward rows are status ``kink`` (not a finding; ``--fail-on kink`` makes them one), named with the
count. Forward rows are never excused (a kink moves a value by its margin, within rounding), nor are runs whose
sequences of piecewise ops differ (a branch taken in Python, on the dtype too). A fault in a call that also has a
kink is then left to the module that ran it, whose replay still fails.

**Blame** (:func:`blame`). A module whose replay runs a failing Function (the Function ran in it or in one of its
descendants) is explained by the Function (``explained_by``), as a composite by its failing child: its rows stay
in the report, failing, and the first divergence names the Function. Rows have mode ``function``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd import Function
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from densenet_debug._autograd import in_backward
from densenet_debug.backends import Backend
from densenet_debug.trace import Layout, Spilled, TensorStore, Trace, UnitRecord, flatten_tensors, materialize
from densenet_debug.verdict.local import inside, local_rows
from densenet_debug.verdict.mathcheck import _user_function
from densenet_debug.verdict.report import FAILING, Row, Status
from densenet_debug.verdict.tolerance import UnitBounds, unit_bounds

MODE = "function"
SEPARATOR = " · "
MODEL = "(model)"
_MATMUL = {"convolution", "convolution_backward", "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mv", "dot",
           "addmv", "addbmm", "einsum", "_convolution", "cudnn_convolution", "mkldnn_convolution"}

__all__ = ["MODE", "Applied", "FunctionCall", "FunctionRecorder", "blame", "describe", "function_rows", "recording"]


class _Slot:
    """Where a tensor argument goes in a call's argument template."""

    def __repr__(self) -> str:
        return "<tensor>"


SLOT = _Slot()


@dataclass
class FunctionCall:
    """One application of a user's custom Function in a traced step."""

    cls: type
    module: str  # the module path it ran under ("" for the model's own forward)
    occurrence: int  # among this module's calls of this class, in forward order
    template: tuple  # the positional arguments, each tensor replaced by SLOT
    inputs: list[Tensor | Spilled]  # the oracle's: values; a side's: meta tensors (dtype and shape)
    input_layouts: list[Layout]
    needs: list[bool]  # per tensor input: it required grad, with grad enabled (its gradient is wanted)
    entered: int  # how many modules had started their forward before this call (for its order)
    kwargs: dict = field(default_factory=dict)  # keyword arguments, as given
    random: bool = False  # it drew from torch's (CPU) generator: a replay cannot draw the same numbers
    fingerprint: tuple = ()  # a call made without grad: its inputs' shapes, dtypes and sums (to find its recompute)
    outputs: list[Tensor | Spilled] = field(default_factory=list)
    grad_outputs: list[Tensor | Spilled | None] | None = None
    grad_output_layouts: list[Layout | None] = field(default_factory=list)
    grad_inputs: list[Tensor | Spilled | None] | None = None

    @property
    def name(self) -> str:
        return self.cls.__qualname__

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.module, self.name, self.occurrence)

    @property
    def label(self) -> str:
        """The unit's name in rows: ``dense.1 · CatFn`` (``#k`` from the second call on)."""
        suffix = f"#{self.occurrence + 1}" if self.occurrence else ""
        return f"{self.module or MODEL}{SEPARATOR}{self.name}{suffix}"


def describe(label: str) -> str:
    """``dense.1 · CatFn`` -> ``custom autograd Function CatFn in dense.1`` (for a summary line; ``(model) ·
    CatFn`` -> ``... CatFn in the model's own forward``)."""
    module, _, name = label.partition(SEPARATOR)
    where = "the model's own forward" if module == MODEL else module
    return f"custom autograd Function {name} in {where}"


def module_of(label: str) -> str:
    """The module path a Function row's unit ran under ("" for the model's own forward)."""
    module = label.partition(SEPARATOR)[0]
    return "" if module == MODEL else module


# -- recording ---------------------------------------------------------------------------------------------
class FunctionRecorder:
    """Records every call of a user's custom Function during one traced step (module docstring).

    ``values``: keep the tensors (the oracle's, in ``store``), else only dtypes and layouts (a side's).
    """

    def __init__(self, model: nn.Module, values: bool, store: TensorStore | None = None) -> None:
        self.model, self.values = model, values
        self.store = store if store is not None or not values else TensorStore()
        self.calls: list[FunctionCall] = []
        self._names = {id(m): n for n, m in model.named_modules()}
        self._stack: list[str] = []
        self.entered: list[str] = []  # modules in the order their forward first started
        self._seen_modules: set[str] = set()
        self._counts: dict[tuple[str, str], int] = {}
        self._handles: list = []
        self._original: object = None
        self.active = False

    # module stack
    def _push(self, module: nn.Module, args: tuple) -> None:
        name = self._names.get(id(module), "")
        self._stack.append(name)
        if name not in self._seen_modules and not in_backward():
            self._seen_modules.add(name)
            self.entered.append(name)

    def _pop(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._stack:
            self._stack.pop()

    def __enter__(self) -> FunctionRecorder:
        for m in self.model.modules():
            self._handles.append(m.register_forward_pre_hook(self._push))
            self._handles.append(m.register_forward_hook(self._pop, always_call=True))
        original = Function.__dict__["apply"]  # a classmethod: its function takes the class first
        recorder = self

        def apply(cls: type, *args: object, **kwargs: object) -> object:
            if not recorder.active or not _user_function(cls):
                return original.__func__(cls, *args, **kwargs)
            return recorder._apply(original.__func__, cls, args, kwargs)

        self._original = original
        Function.apply = classmethod(apply)  # only for this step's length (restored on exit, on error too)
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        if self._original is not None:
            Function.apply = self._original
            self._original = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.store is not None:
            self.store.seal()

    def _apply(self, apply: Callable, cls: type, args: tuple, kwargs: dict) -> object:
        with _disable_current_modes():  # the copies are the tool's, no op of the step
            call, recompute = self._call(cls, args, kwargs)
            rng = torch.random.get_rng_state() if call is not None and not recompute else None
        out = apply(cls, *args, **kwargs)
        if call is None:
            return out
        with _disable_current_modes():
            if rng is not None:
                call.random = not torch.equal(rng, torch.random.get_rng_state())
            outs = flatten_tensors(out)
            node = next((o.grad_fn for o in outs if getattr(o.grad_fn, "_forward_cls", None) is cls), None)
            if recompute:  # a reentrant checkpoint's: this is the node backward runs, with the gradients wanted
                call.needs = [t.requires_grad for t in args if isinstance(t, Tensor)]
            else:
                call.outputs = [self._keep(o) for o in outs] if self.values else [None] * len(outs)
            if node is not None:
                self._hook(node, call)
        return out

    def _call(self, cls: type, args: tuple, kwargs: dict) -> tuple[FunctionCall | None, bool]:
        """The call being made, and whether it is a checkpoint's recompute of one already named."""
        tensors = [a for a in args if isinstance(a, Tensor)]
        grad = torch.is_grad_enabled()
        if in_backward():  # a checkpoint's recompute: the call it repeats is already named
            # non-reentrant: that call ran with grad and its node is the one backward runs; reentrant: it ran
            # without grad (its fingerprint was taken) and this recompute's node is the one backward runs
            candidates = [c for c in self.calls if c.cls is cls and c.fingerprint and c.grad_outputs is None]
            if not candidates:
                return None, True
            fingerprint = _fingerprint(tensors)
            return next((c for c in candidates if c.fingerprint == fingerprint), None), True
        module = self._stack[-1] if self._stack else ""
        k = self._counts.get((module, cls.__qualname__), 0)
        self._counts[(module, cls.__qualname__)] = k + 1
        template = tuple(SLOT if isinstance(a, Tensor) else a for a in args)
        call = FunctionCall(cls=cls, module=module, occurrence=k, template=template, kwargs=dict(kwargs),
                            inputs=[self._keep(t) for t in tensors], input_layouts=[Layout.of(t) for t in tensors],
                            needs=[grad and t.requires_grad for t in tensors], entered=len(self.entered),
                            fingerprint=() if grad else _fingerprint(tensors))
        self.calls.append(call)
        return call, False

    def _keep(self, t: Tensor) -> Tensor | Spilled:
        if not self.values:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        t = t.detach()
        return self.store.keep(t.to("cpu") if t.device.type != "cpu" else t, clone=True)

    def _hook(self, node: object, call: FunctionCall) -> None:
        def pre(grad_outputs: tuple) -> None:
            if not self.active or call.grad_outputs is not None:
                return
            with _disable_current_modes():
                call.grad_output_layouts = [Layout.of(g) if isinstance(g, Tensor) else None for g in grad_outputs]
                call.grad_outputs = [self._keep(g) if isinstance(g, Tensor) and self.values else None
                                     for g in grad_outputs]

        def post(grad_inputs: tuple, grad_outputs: tuple) -> None:
            if not self.active or call.grad_inputs is not None:
                return
            with _disable_current_modes():
                call.grad_inputs = [self._keep(g) if isinstance(g, Tensor) and need and self.values else None
                                    for g, need in zip(grad_inputs, call.needs)]

        self._handles.append(node.register_prehook(pre))
        self._handles.append(node.register_hook(post))


def _fingerprint(tensors: list[Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, float(t.detach().double().sum()) if t.is_floating_point() else 0.0)
                 for t in tensors)


@contextmanager
def recording(model: nn.Module, values: bool) -> Iterator[FunctionRecorder]:
    """Record the custom Function calls of the step run inside (see :class:`FunctionRecorder`)."""
    recorder = FunctionRecorder(model, values)
    with recorder:
        yield recorder


# -- judging -----------------------------------------------------------------------------------------------
class Applied(nn.Module):
    """One call of a custom Function as a parameterless module: ``cls.apply`` on its tensors, the recorded
    non-tensor arguments in place."""

    def __init__(self, cls: type, template: tuple, kwargs: dict | None = None) -> None:
        super().__init__()
        self.cls, self.template, self.kwargs = cls, template, kwargs or {}

    def forward(self, *tensors: Tensor) -> object:
        it = iter(tensors)  # (isinstance, not identity: a deep copy of this module copies the slots)
        return self.cls.apply(*[next(it) if isinstance(a, _Slot) else a for a in self.template], **self.kwargs)


def _orders(call: FunctionCall, entered: list[str], units: dict[str, tuple[int, int | None]]) -> tuple[int, int]:
    """(forward, backward) order of a call among the units (``units``: name -> (forward_index, backward_index)):
    after the last unit that started before it; in backward, with the unit that ran its backward last of those
    that started after it (they run theirs first)."""
    forward = max((units[n][0] for n in entered[:call.entered] if n in units), default=0)
    after = [b for f, b in units.values() if f > forward and b is not None]
    return forward, max(after, default=0)


def _record(call: FunctionCall, label: str, orders: tuple[int, int], values: bool) -> UnitRecord:
    """The call as a :class:`UnitRecord` for :func:`~densenet_debug.verdict.replay.replay_unit`."""
    def get(ts: list | None) -> list:
        return [materialize(t) if values else t for t in (ts or [])]

    grad_inputs = get(call.grad_inputs) if call.grad_inputs is not None else [None] * len(call.inputs)
    return UnitRecord(name=label, kind=call.name, forward_index=orders[0], training=True,
                      inputs=get(call.inputs), outputs=get(call.outputs), grad_outputs=get(call.grad_outputs),
                      grad_inputs=grad_inputs, input_layouts=list(call.input_layouts),
                      grad_output_layouts=list(call.grad_output_layouts),
                      backward_index=orders[1] if call.grad_outputs is not None else None, calls=1)


class _Ops(TorchDispatchMode):
    """The names of the aten ops run inside (below any other mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _bounds(call: FunctionCall, module: Applied, o_rec: UnitRecord) -> UnitBounds:
    ops = _Ops()
    with ops:
        bounds = unit_bounds(module, o_rec, {})
    bounds.matmul = bool(ops.names & _MATMUL)
    bounds.origin = (f"custom autograd Function {call.name}, replayed whole; "
                     + bounds.origin.replace(f"({Applied.__name__})", f"({call.name})"))
    return bounds


def function_rows(step: int, o_trace: Trace, sides: list[tuple[Backend, Trace | None]], lam: float) -> list[list[Row]]:
    """Teacher-forced rows of every custom Function call the oracle's step made (``o_trace.functions``), for
    each side (its backend and traced step, whose ``functions`` give dtypes and layouts); mode ``function``. An
    oracle without ``functions`` (rebuilt from a fixture, which stores none) gives none."""
    if not hasattr(o_trace, "functions"):  # an oracle rebuilt from a fixture: no Function was recorded
        return [[] for _ in sides]
    o_calls: list[FunctionCall] = o_trace.functions
    by_side = [{c.key: c for c in (getattr(t, "functions", None) or [])} for _, t in sides]
    out: list[list[Row]] = [_one_sided(calls, {c.key for c in o_calls}, step) for calls in by_side]
    if not o_calls:
        return out
    entered = getattr(o_trace, "entered", [])
    units = {n: (rec.forward_index, rec.backward_index) for n in o_trace.units if (rec := o_trace.meta(n))}
    for o_call in o_calls:
        label = o_call.label
        orders = _orders(o_call, entered, units)
        if o_call.random:
            for rows in out:
                rows.append(_note_row(label, step, orders, "not judged: it draws random numbers (torch's generator "
                                                           "moved during the call), which a replay cannot draw as "
                                                           "the oracle did; the math check reseeds them"))
            continue
        o_rec = _record(o_call, label, orders, values=True)
        module = Applied(o_call.cls, o_call.template, o_call.kwargs)
        try:
            bounds = _bounds(o_call, module, o_rec)
        except Exception as exc:  # noqa: BLE001 - the user's code on magnitudes: a note, not a finding
            for rows in out:
                rows.append(_note_row(label, step, orders, f"not judged: its forward or backward raised on the "
                                                           f"magnitudes of its operands ({type(exc).__name__}: {exc})"))
            continue
        for (backend, _), calls, rows in zip(sides, by_side, out):
            s_call = calls.get(o_call.key)
            s_rec = _record(s_call, label, orders, values=False) if s_call is not None else None
            # the side's own non-tensor arguments (a dtype, a flag the model derives from its inputs' dtype)
            same = s_call is not None and len(s_call.inputs) == len(o_call.inputs)
            replayed = Applied(o_call.cls, s_call.template, s_call.kwargs) if same else module
            try:
                found = local_rows(label, step, replayed, o_rec, s_rec, bounds, backend, lam, [], None)
            except Exception as exc:  # noqa: BLE001 - raised on the oracle's inputs here: a note, not a finding
                rows.append(_note_row(label, step, orders, f"not replayed: it raised on the oracle's inputs cast "
                                                           f"to this side ({type(exc).__name__}: {exc})"))
                continue
            for r in found:
                r.mode = MODE
            if any(r.status == Status.MISMATCH and r.pass_ == "backward" for r in found):
                _explain_inner_kinks(found, replayed, o_rec, s_rec, backend)
            if s_call is None and calls:  # the side recorded its calls, and made no such one
                for r in found:
                    r.note = "; ".join(filter(None, [r.note, "not applied in this side's step (judged on the "
                                                             "oracle's inputs all the same)"]))
            rows += found
    return out


def _one_sided(calls: dict[tuple, FunctionCall], oracle_keys: set[tuple], step: int) -> list[Row]:
    """A note row for each call a side made that the oracle's step did not (a branch on the dtype or backend in
    the user's code): nothing to teacher-force it with, and never dropped silently; what it changed shows in the
    between-units and propagated rows."""
    return [_note_row(c.label, step, (0, 0), "applied on this side only, not in the float64 oracle's step: not "
                                           "judged here (its effect shows in the between and propagated rows)")
            for key, c in calls.items() if key not in oracle_keys]


_PIECEWISE = {"relu", "leaky_relu", "prelu", "rrelu", "abs", "sign", "sgn", "threshold", "relu6", "hardtanh", "clamp",
              "clamp_min", "clamp_max", "hardshrink", "softshrink", "elu", "celu", "selu"}
_CHOICE = {"maximum", "minimum", "fmax", "fmin"}
_ROUNDING = {"round", "floor", "ceil", "trunc", "frac", "remainder", "fmod"}


class _Branches(TorchDispatchMode):
    """The branch every piecewise op of a forward takes, per element: for the ReLU family ``out == in`` and the
    sign of ``in`` (at exactly 0 ``relu(0) == 0`` as for a positive input, but its gradient mask differs: an input
    rounded to 0 is a kink), ``sign(a - b)`` for max/min, a rounding's result, and every integer or boolean output
    of an op on floating inputs (comparisons, indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.prints: list[Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        raw = func.overloadpacket.__name__
        name = raw.rstrip("_")
        first = args[0] if args and isinstance(args[0], Tensor) else None
        before = first.clone() if first is not None and raw.endswith("_") and name in _PIECEWISE | _CHOICE else first
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if name in _PIECEWISE and before is not None and outs and outs[0].shape == before.shape:
            self.prints.append((outs[0] == before).to(torch.int8) * 3 + torch.sign(before).to(torch.int8))
        elif name in _CHOICE and before is not None and len(args) > 1 and isinstance(args[1], Tensor):
            self.prints.append(torch.sign(before - args[1]).to(torch.int8))
        elif name in _ROUNDING and outs:
            self.prints.append(outs[0].to(torch.float64))
        elif first is not None and first.is_floating_point():
            self.prints += [o.clone() for o in outs if not o.is_floating_point() and not o.is_complex()]
        return out


def _same(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise: the same branch (a fingerprint of one run against the other's; values compared in float64)."""
    if a.is_floating_point() or b.is_floating_point():
        return a.to(torch.float64) == b.to(torch.float64)
    return a == b


def _other_branches(module: Applied, o_rec: UnitRecord, s_rec: UnitRecord | None, backend: Backend) -> int:
    """How many elements of the piecewise ops inside the Function's forward (a ReLU, clamp, max, comparison,
    rounding: :class:`_Branches`) take another branch in the side's replay than
    in the oracle's float64 run on the same (unrounded) inputs: kinks within rounding of their boundary, from the
    cast of its inputs or from rounding inside it. Two runs of different sequences of piecewise ops (a branch in
    Python, on the dtype too) are not a kink: 0."""
    xs = []
    for i, t in enumerate(o_rec.inputs):
        seen = s_rec.inputs[i] if s_rec is not None and i < len(s_rec.inputs) else None
        dtype = (seen.dtype if seen is not None else backend.param_dtype) if t.is_floating_point() else t.dtype
        xs.append(t.to(backend.device, dtype))
    side, exact = _Branches(), _Branches()
    with torch.no_grad():
        with backend.active(), side:
            module(*xs)
        with exact:
            module(*o_rec.inputs)
    if len(side.prints) != len(exact.prints):
        return 0  # another sequence of ops (a branch in Python, on the dtype too): no kink of ours excuses it
    return sum(int((~_same(a.cpu(), b)).sum()) if a.shape == b.shape else a.numel() + 1
               for a, b in zip(side.prints, exact.prints))


def _explain_inner_kinks(rows: list[Row], module: Applied, o_rec: UnitRecord, s_rec: UnitRecord | None,
                         backend: Backend) -> None:
    """A failing backward row of a Function whose forward takes another branch of a piecewise op in the side's
    replay than in float64 (a ReLU of a difference within rounding of zero): the gradient jumps there by the
    size of what the branch routes, which no rounding bound covers. Status ``kink``, not a finding (``--fail-on
    kink`` makes it one); forward rows keep theirs (a kink moves a value by its margin, within rounding)."""
    try:
        flips = _other_branches(module, o_rec, s_rec, backend)
    except Exception:  # noqa: BLE001 - the user's forward again: nothing excused
        return
    if flips == 0:
        return
    what = f"{flips} element(s)"
    for r in rows:
        if r.status == Status.MISMATCH and r.pass_ == "backward":
            r.status = Status.KINK
            r.note = (f"kink inside the Function: its forward takes the other branch of a piecewise op than the "
                      f"float64 oracle at {what} (within rounding of its boundary)")


def _note_row(label: str, step: int, orders: tuple[int, int], note: str) -> Row:
    return Row(layer=label, pass_="forward", quantity="output", error_a=0.0, error_b=None, tolerance=0.0,
               status=Status.OK, origin="custom autograd Function: not judged", step=step, mode=MODE,
               tolerance_a=0.0, ratio_a=0.0, order=orders[0], note=note)


def blame(local: list[Row], functions: list[Row]) -> None:
    """A failing module whose replay runs a failing Function (applied in it or in a descendant) is explained
    by the Function, the smaller unit: a failing forward explains both passes of the module, a failing backward
    its backward. A row already explained by a failing descendant module keeps that culprit."""
    failing = [f for f in functions if f.status in FAILING]
    if not failing:
        return
    for r in local:
        if r.status not in FAILING or r.explained_by is not None:
            continue
        culprits = [f for f in failing if f.step == r.step and (f.pass_ == "forward" or r.pass_ == "backward")
                    and (module_of(f.layer) == r.layer or inside(module_of(f.layer), r.layer))]
        if culprits:
            first = min(culprits, key=lambda f: (f.pass_ != "forward", f.order))
            r.explained_by = first.layer
            r.note = f"explained by failing {describe(first.layer)} ({first.pass_} {first.quantity})"


def name_in_notes(rows: list[Row], local: list[Row]) -> None:
    """A propagated row downstream of a module's failure that a Function explains says so in its note."""
    by_unit = {(r.step, r.layer): r.explained_by for r in local
               if r.status in FAILING and r.explained_by is not None and SEPARATOR in r.explained_by}
    for r in rows:
        label = by_unit.get((r.step, r.explained_by)) if r.explained_by is not None else None
        if label is not None and r.note.startswith("downstream of"):
            r.note += f", explained by failing {describe(label)}"


def attach(trace: Trace, recorder: FunctionRecorder) -> Trace:
    """Hang what ``recorder`` saw on ``trace`` (``trace.functions``, ``trace.entered``) and return it."""
    trace.functions = recorder.calls
    trace.entered = list(recorder.entered)
    return trace
