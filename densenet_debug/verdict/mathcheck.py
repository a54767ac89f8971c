"""The math check: every custom ``autograd.Function`` the model calls, against finite differences, in float64.

A custom Function's backward is hand-written; aten ops' derivatives are not the user's. A backward that is
wrong in *every* dtype is wrong in the float64 oracle too, so the teacher-forced comparison (side against
oracle) agrees with it. This check asks the other question: is the backward the derivative of the forward?

**Finding the calls, without touching torch.** A float64 copy of the model (the oracle's weights, inputs,
labels, mode) runs one step under ``sys.setprofile``. The profiler sees Python frames being entered: a
call of ``forward(ctx, ...)`` (or ``setup_context(ctx, inputs, output)``, new style) whose first argument
is a ``torch.autograd.function.BackwardCFunction`` is a custom Function being applied, and that ``ctx`` *is*
the node autograd puts in the graph (``output.grad_fn is ctx``): it gives the class (``_forward_cls``),
``needs_input_grad`` and the forward inputs, which the graph itself does not keep. The inputs are copied
at once (a later in-place op cannot reach them); the module path comes from forward pre/post hooks on the
copy. Backward runs under the profiler only when a Function was seen (a reentrant checkpoint applies the
user's Functions with grad only in its recompute); a recompute's repeat of a call already seen is dropped.
Functions defined by torch or by this tool are not the user's math and are skipped, as are calls none of
whose inputs needs a gradient (their backward is not used in the step).

**The check** (:func:`check_call`), per call: one Gaussian direction ``v`` over the inputs that need a
gradient (unit 2-norm over all of them) and two Gaussian ``w`` over the differentiable outputs (unit 2-norm;
no component is 0, so a NaN/Inf anywhere in an output reaches ``phi``; ``w`` changes no evaluation, so the
two share them); a wrong ``J'`` gives ``<w, (J' - J) v> != 0`` with probability 1::

    analytic  a    = <grad of <w, f> by the Function's backward, v>       (autograd.grad, grad_outputs=w)
    phi(t)         = <w, f(x + t v)>                                      (the Function's forward, no grad)
    D(h)           = (phi(h) - phi(-h)) / (2h) = phi'(0) + phi'''(xi) h^2/6   (+ roundoff)
    Richardson R   = (4 D(h) - D(2h)) / 3
    D(2h) - D(h)   = (h^2/6)(4 phi'''(xi2) - phi'''(xi1)) ~ (h^2/2) phi'''  -> |phi'''| <= 2|D(2h)-D(h)|/h^2
    |R - phi'(0)|  <= (4/9) h^2 max|phi'''|  ~  (8/9)|D(2h) - D(h)|

and the allowance, with a factor 4 for ``phi'''`` varying over ``[-2h, 2h]`` (which also covers a jump of
``phi''`` there, a C1 kink such as ELU's: then ``|R - phi'| <= h s/6`` while ``|D(2h) - D(h)| >= h s/4``)::

    tol = 4 (|D(2h) - D(h)| + 1.5 eps/h) + 1.5 eps/h + eps_a

* ``eps`` bounds the roundoff of one ``phi`` evaluation, first order in ``u = 2^-53``::

      eps = u ((ceil(log2 N) + 2) sum_e |w_e f_e| + ||w||_1 E),    E = sum over the forward's ops of K_op B_op

  The first term is the contraction itself (torch sums floating tensors pairwise: ``log2 N`` roundings for
  ``N`` output elements, plus the product and the step ``x + t v``). ``E`` bounds an output element's own
  error: each aten op the forward ran (seen by the dispatch mode) adds at most ``K_op B_op``, with ``K_op``
  its reduction length (a convolution's ``C_in k_h k_w / groups``, a matrix product's inner size, a sum's
  input over output elements, 1 for elementwise ops and copies) and ``B_op`` the size of its terms (``K``
  times the product of its inputs' largest magnitudes for products, ``K`` times the largest magnitude it
  saw otherwise): the recursive-summation bound ``(K-1) u sum|terms|``, errors passed on unamplified.
  An error model of arbitrary code can be wrong, so ``eps`` is never less than four times the noise the
  five evaluations show: their fourth difference ``phi(-2h) - 4 phi(-h) + 6 phi(0) - 4 phi(h) + phi(2h)``
  is ``h^4`` times the fourth derivative (negligible) plus noise of standard deviation ``sqrt(70) sigma``.
  ``D(h)`` has roundoff ``<= eps/h``, ``R`` ``<= (4 eps/h + eps/(2h))/3 = 1.5 eps/h``.
* ``eps_a`` is the analytic side's, the same model on the terms of ``<g, v>``:
  ``u ((ceil(log2 N) + 2) sum_i |g_i v_i| + ||w||_1 E)``.
* The step: ``h = u^(1/3) ||x||_2`` (the usual balance of ``h^2`` truncation and ``u/h`` roundoff, on the
  inputs' scale; per element that is ``u^(1/3)`` times their RMS).

The error and tolerance of a row are on the scale of the terms, ``max(sum_i |g_i v_i|, |R|)``.

**Kinks.** The allowance assumes ``phi`` is C1 on ``[-2h, 2h]``. A slope jump inside (a ReLU, clamp, abs,
max, a comparison, rounding, an argmax) breaks it, and that is never a false alarm: every evaluation runs
under a dispatch mode that fingerprints the branch each piecewise op took (the sign of a ReLU's input, a
clamp's or max's choice, every integer or boolean output: comparisons, indices); if a fingerprint at
``±h`` or ``±2h`` differs from the one at 0, a kink lies within the segment and ``h`` shrinks 16-fold (up
to 6 times, where ``eps/h`` is still below 1e-3 of a typical term); a kink left at the smallest step, a
non-finite value, or an allowance that leaves the check no power (``tol >= 1/2`` of the scale) makes the
call *unverifiable*: a note, never a finding.

**Reproducibility.** Every evaluation re-seeds torch's RNG (``fork_rng``, seed 0), so a Function that draws
random numbers from torch is checked at fixed draws (its backward sees the same draws as its forward). A
forward whose output still differs between two evaluations on the same inputs (other randomness, global
state) is *not reproducible*: a note, not a failure. So is a forward or backward that raises here.

A wrong backward found here is status ``math``: both backends share it (it is the user's code, in every
dtype), so it fails the diff (exit 1) and the summary names the Function and its module.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from densenet_debug.models.copies import fp64_copy
from densenet_debug.verdict.report import DiffReport, FirstDivergence, Row, Status, fmt

U64 = 2.0 ** -53
DIRECTIONS = 2  # a wrong backward differs along almost every direction; two guard against an unlucky one
SHRINK, MAX_SHRINKS = 16.0, 6
ORIGIN = "float64 finite difference of the Function's forward (Richardson, steps h and 2h)"
LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["FunctionCall", "MathCheck", "apply_to_report", "check", "check_call", "find_calls", "rows"]


@dataclass
class FunctionCall:
    """One application of a custom Function in the oracle's step, with copies of its inputs."""

    cls: type
    module: str  # the module path it ran under ("" for the top-level model)
    args: tuple  # positional arguments after ctx; floating tensors are float64 copies
    needs: tuple[bool, ...]  # per argument: its gradient is used in the step (ctx.needs_input_grad)
    index: int = 0

    @property
    def name(self) -> str:
        return self.cls.__qualname__


@dataclass
class MathCheck:
    """The verdict on one call: ``ok``, ``math`` (the backward is not the forward's derivative), or a note."""

    call: FunctionCall
    status: str  # "ok" | "math" | "unverifiable" | "not_reproducible"
    error: float = 0.0
    tolerance: float = 0.0
    analytic: float = 0.0
    numeric: float = 0.0
    step: float = 0.0
    note: str = ""
    directions: list[dict] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.call.name} in {self.call.module or '(model)'}"


# -- finding the calls ----------------------------------------------------------------------------------
def _user_function(cls: type) -> bool:
    return not (cls.__module__ or "").startswith(("torch.", "densenet_debug."))


def _call_args(frame: object) -> tuple[object, tuple] | None:
    """(ctx, forward's positional inputs) if ``frame`` enters a custom Function's forward or setup_context."""
    code = frame.f_code
    if code.co_name not in ("forward", "setup_context") or code.co_argcount < 1:
        return None
    names = code.co_varnames
    local = frame.f_locals
    ctx = local.get(names[0])
    if not isinstance(ctx, torch.autograd.function.BackwardCFunction):
        return None
    if code.co_name == "setup_context":
        inputs = local.get(names[1]) if code.co_argcount > 1 else None
        return ctx, tuple(inputs) if isinstance(inputs, (tuple, list)) else ()
    args = [local[n] for n in names[1:code.co_argcount]]
    if code.co_flags & 0x04:  # CO_VARARGS: forward(ctx, *tensors)
        args += list(local[names[code.co_argcount + code.co_kwonlyargcount]])
    return ctx, tuple(args)


def _copy(value: object) -> object:
    if isinstance(value, Tensor):
        return value.detach().clone()
    return value


class _Calls:
    """The profiler callback and module stack that collect :class:`FunctionCall`s."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.calls: list[FunctionCall] = []
        self.seen_any = False

    def profile(self, frame: object, event: str, arg: object) -> None:
        if event != "call":
            return
        found = _call_args(frame)
        if found is None:
            return
        ctx, args = found
        self.seen_any = True
        cls = ctx._forward_cls
        needs = tuple(bool(n) for n in ctx.needs_input_grad)[:len(args)]
        if not _user_function(cls) or not any(needs):
            return
        call = FunctionCall(cls=cls, module=self.stack[-1] if self.stack else "",
                            args=tuple(_copy(a) for a in args), needs=needs, index=len(self.calls))
        if not any(_same_call(call, c) for c in self.calls):  # a checkpoint's recompute repeats a call
            self.calls.append(call)


def _same_call(a: FunctionCall, b: FunctionCall) -> bool:
    """The same Function on equal inputs (a checkpoint's recompute runs outside its module's forward hooks, so
    the module is not compared); two calls that agree here are the same check anyway."""
    if a.cls is not b.cls or len(a.args) != len(b.args):
        return False
    for x, y in zip(a.args, b.args):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False
        if isinstance(x, Tensor) and (x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y)):
            return False
    return True


@contextmanager
def _profiled(calls: _Calls) -> Iterator[None]:
    previous = sys.getprofile()
    sys.setprofile(calls.profile)  # replaces the user's profiler (cProfile...) for the forward's length
    try:
        yield
    finally:
        if previous is None or callable(previous):
            sys.setprofile(previous)
        elif hasattr(previous, "enable"):  # a C profiler: getprofile gives its object, which setprofile refuses
            previous.enable()
        else:
            sys.setprofile(None)


def find_calls(model: nn.Module, x: Tensor, y: Tensor, *, eval_mode: bool = False,
               loss_fn: LossFn = F.cross_entropy) -> list[FunctionCall]:
    """Every call of a user-written custom Function in one float64 step of a copy of ``model``."""
    ref = fp64_copy(model, "cpu")
    ref.train(not eval_mode)
    for m in ref.modules():  # as the oracle: dropout's draws are no backend property
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    names = {id(m): n for n, m in ref.named_modules()}
    calls = _Calls()

    def push(module: nn.Module, args: tuple) -> None:
        calls.stack.append(names[id(module)])

    def pop(module: nn.Module, args: tuple, output: object) -> None:
        if calls.stack:
            calls.stack.pop()

    handles = []
    for m in ref.modules():
        handles.append(m.register_forward_pre_hook(push))
        handles.append(m.register_forward_hook(pop, always_call=True))
    x64 = x.detach().to("cpu", torch.float64).requires_grad_(x.requires_grad)
    y64 = y.detach().to("cpu", torch.float64) if y.is_floating_point() else y.detach().to("cpu")
    try:
        with _profiled(calls):
            out = ref(x64)
        if calls.seen_any:
            loss = loss_fn(out, y64)
            if loss.requires_grad:
                with _profiled(calls):
                    loss.backward()
    finally:
        for h in handles:
            h.remove()
    return calls.calls


# -- branch fingerprints and the forward's error model ------------------------------------------------------
_SAME_AS_INPUT = {"relu", "clamp", "clamp_min", "clamp_max", "hardtanh", "abs", "threshold", "relu6", "hardshrink",
                  "softshrink"}
_SIGN = {"leaky_relu", "prelu", "rrelu"}
_PIECEWISE_CONSTANT = {"round", "floor", "ceil", "trunc", "sign", "sgn", "frac", "remainder", "fmod"}
_CHOICE = {"maximum", "minimum", "fmax", "fmin"}
_PRODUCTS = {"convolution", "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mul", "mv", "dot", "einsum",
             "addmv", "addbmm"}


def _base(func: object) -> str:
    return str(func).split(".")[1].rstrip("_") if str(func).startswith("aten.") else str(func)


def _peak(t: Tensor) -> float:
    m = float(t.detach().abs().max()) if t.numel() else 0.0
    return m if math.isfinite(m) else 0.0


def _reduction_length(base: str, ins: list[Tensor], outs: list[Tensor]) -> int:
    """How many terms one output element of the op sums (1 for elementwise ops)."""
    if base == "convolution" and len(ins) > 1:
        w = ins[1]
        return max(1, w.numel() // max(w.shape[0], 1))
    if base in _PRODUCTS and len(ins) > 1 and ins[-1].dim() >= 1 and base != "mul":
        return max(1, ins[-2].shape[-1] if ins[-2].dim() else 1)
    n_in = max((t.numel() for t in ins if t.is_floating_point()), default=1)
    n_out = max((t.numel() for t in outs if t.is_floating_point()), default=1)
    return max(1, n_in // max(n_out, 1))  # sum, mean, norms, batch norm's statistics: in / out elements


class _Branches(TorchDispatchMode):
    """Fingerprints of the branch every piecewise op takes; with ``measure``, the forward's error model too:
    ``error`` bounds the rounding error of every output element, ``sum over ops of K B`` (K the op's reduction
    length, B the largest magnitude of its terms: K times the product of its inputs' peaks for products)."""

    def __init__(self, measure: bool = False) -> None:
        super().__init__()
        self.prints: list[Tensor] = []
        self.measure = measure
        self.error_units = 0.0  # the bound on an output element's rounding error, in units of u

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        base = _base(func)
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        first = ins[0] if ins else None
        inplace = str(func).split(".")[1].endswith("_") if str(func).startswith("aten.") else False
        before = first.clone() if inplace and first is not None and base in _SAME_AS_INPUT | _CHOICE else first
        if self.measure:
            peaks = [_peak(t) for t in ins if t.is_floating_point()]
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if self.measure:
            k = _reduction_length(base, ins, outs)
            if base in _PRODUCTS and len(peaks) >= 2:
                a, b, c = (peaks[1], peaks[2], peaks[0]) if base.startswith(("add", "badd")) and len(peaks) > 2 \
                    else (peaks[0], peaks[1], peaks[2] if len(peaks) > 2 else 0.0)  # addmm(bias, a, b)
                terms = k * a * b + c
            else:
                terms = k * max(peaks + [_peak(t) for t in outs if t.is_floating_point()], default=0.0)
            self.error_units += k * terms if k > 1 else terms
        if base in _SAME_AS_INPUT and before is not None and outs and outs[0].shape == before.shape:
            self.prints.append(outs[0] == before)
        elif base in _SIGN and before is not None:
            self.prints.append(before > 0)
        elif base in _CHOICE and outs and before is not None:
            self.prints.append(outs[0] == before)
        elif base in _PIECEWISE_CONSTANT and outs:
            self.prints.append(outs[0].clone())
        elif first is not None and first.is_floating_point():
            for o in outs:  # comparisons, argmax, pooling and sort indices: the choice itself
                if not o.is_floating_point() and not o.is_complex():
                    self.prints.append(o.clone())
        return out


def _same_branches(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


# -- the check ------------------------------------------------------------------------------------------------
@dataclass
class _Eval:
    outs: list[Tensor]
    prints: list[Tensor]
    error_units: float = 0.0

    def phi(self, ws: list[Tensor | None]) -> float:
        return sum(float((w * o).sum()) for w, o in zip(ws, self.outs) if w is not None)



class _Harness:
    """Evaluations of one call: its forward at ``x + t v``, and its backward."""

    def __init__(self, call: FunctionCall) -> None:
        self.call = call
        self.diff = [i for i, (a, n) in enumerate(zip(call.args, call.needs))
                     if n and isinstance(a, Tensor) and a.is_floating_point()]

    def args(self, shift: list[Tensor] | None = None, t: float = 0.0) -> list:
        out = [a.clone() if isinstance(a, Tensor) else a for a in self.call.args]
        if shift is not None and t:
            for i, v in zip(self.diff, shift):
                out[i] = out[i] + t * v
        return out

    def forward(self, args: list) -> list[Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return [o for o in tree_leaves(self.call.cls.apply(*args)) if isinstance(o, Tensor)]

    def at(self, shift: list[Tensor] | None, t: float, measure: bool = False) -> _Eval:
        mode = _Branches(measure)
        with torch.no_grad(), mode:
            outs = self.forward(self.args(shift, t))
        return _Eval([o.detach() for o in outs], mode.prints, mode.error_units)

    def analytic(self, v: list[Tensor], count: int, gen: torch.Generator
                 ) -> tuple[_Eval, list[tuple[list[Tensor | None], float, float]]]:
        """The forward at x again (with grad), and for ``count`` random unit ``w``: (w, <backward(w), v>, the
        terms sum |g_i v_i|) each."""
        args = self.args()
        leaves = [args[i].detach().requires_grad_(True) for i in self.diff]
        for i, leaf in zip(self.diff, leaves):
            args[i] = leaf.clone()  # a Function that writes its input in place must not write a leaf
        mode = _Branches()
        with mode:
            outs = self.forward(args)
        again = _Eval([o.detach() for o in outs], mode.prints)
        out: list[tuple[list[Tensor | None], float, float]] = []
        for k in range(count):
            ws = [_gaussian(o.shape, o.dtype, gen) if o.requires_grad and o.is_floating_point() else None for o in outs]
            norm = math.sqrt(sum(float((w * w).sum()) for w in ws if w is not None)) or 1.0
            ws = [None if w is None else w / norm for w in ws]
            pairs = [(o, w) for o, w in zip(outs, ws) if w is not None]
            if not pairs:
                return again, []
            grads = torch.autograd.grad([o for o, _ in pairs], leaves, [w for _, w in pairs], allow_unused=True,
                                        retain_graph=k + 1 < count)
            value, terms = 0.0, 0.0
            for g, vi in zip(grads, v):
                if g is not None:
                    value += float((g * vi).sum())
                    terms += float((g * vi).abs().sum())
            out.append((ws, value, terms))
        return again, out


def _gaussian(shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """A Gaussian direction: almost surely no zero component (a NaN/Inf anywhere reaches the contraction), and
    ``<w, (J' - J) v>`` is almost surely nonzero for a wrong ``J'`` (random signs are not: a swap of two
    elements cancels with probability 1/2). Drawn in float32 (3x faster than float64 draws) and widened."""
    return torch.randn(shape, generator=gen).to(dtype)


def _direction(call: FunctionCall, diff: list[int], gen: torch.Generator) -> list[Tensor]:
    vs = [_gaussian(call.args[i].shape, call.args[i].dtype, gen) for i in diff]
    norm = math.sqrt(sum(float((v * v).sum()) for v in vs)) or 1.0
    return [v / norm for v in vs]


def check_call(call: FunctionCall, *, directions: int = DIRECTIONS, seed: int = 0) -> MathCheck:
    """The directional finite-difference check of one call (see the module docstring)."""
    harness = _Harness(call)
    if not harness.diff:
        return MathCheck(call, "unverifiable", note="no floating-point tensor input needs a gradient")
    gen = torch.Generator().manual_seed(seed + 7919 * call.index)
    try:
        base = harness.at(None, 0.0, measure=True)  # branch fingerprints and the error model at x
    except Exception as exc:  # noqa: BLE001 - the user's forward outside its step: a note, not a finding
        return MathCheck(call, "not_reproducible", note=f"its forward raised here ({type(exc).__name__}: {exc})")
    v = _direction(call, harness.diff, gen)
    try:
        again, pairs = harness.analytic(v, directions, gen)
    except Exception as exc:  # noqa: BLE001
        return MathCheck(call, "unverifiable", note=f"its forward or backward raised here ({type(exc).__name__}: "
                                                    f"{exc})")
    if len(base.outs) != len(again.outs) or not all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(base.outs, again.outs)):
        return MathCheck(call, "not_reproducible",
                         note="its forward gives different outputs on the same inputs (with torch's RNG reseeded)")
    if not _same_branches(base.prints, again.prints):
        return MathCheck(call, "not_reproducible", note="its forward takes different branches on the same inputs")
    if not pairs:
        return MathCheck(call, "unverifiable", note="no output needs a gradient")
    for _, a, _ in pairs:
        if not math.isfinite(a):
            return MathCheck(call, "math", error=math.inf, tolerance=0.0, analytic=a,
                             note="its backward gives a non-finite gradient where the forward is finite")
    scale_x = math.sqrt(sum(float((call.args[i] * call.args[i]).sum()) for i in harness.diff))
    h = U64 ** (1 / 3) * max(scale_x, 1e-3)
    for _ in range(MAX_SHRINKS + 1):
        evals = {t: harness.at(v, t * h) for t in (-2, -1, 1, 2)}
        if all(math.isfinite(e.phi(pairs[0][0])) and _same_branches(e.prints, base.prints) for e in evals.values()):
            break
        h /= SHRINK
    else:
        return MathCheck(call, "unverifiable", step=h * SHRINK,
                         note=f"a kink (a branch of a piecewise op) or a non-finite value lies within "
                              f"{h * SHRINK:.2g} of its inputs along the direction at every step tried")
    evals[0] = base
    results = [_judge(call, evals, ws, a, terms, h) for ws, a, terms in pairs]
    for r in results:
        r.directions = [{"direction": k, "analytic": x.analytic, "numeric": x.numeric, "error": x.error,
                         "tolerance": x.tolerance} for k, x in enumerate(results)]
    rank = {"math": 2, "unverifiable": 1, "ok": 0}
    return max(results, key=lambda r: (rank[r.status], r.error / r.tolerance if r.tolerance else math.inf))


def _judge(call: FunctionCall, evals: dict[int, _Eval], ws: list, a: float, terms: float, h: float) -> MathCheck:
    """One ``w``: Richardson's estimate against the backward's, with the allowance of the module docstring."""
    phi = {t: e.phi(ws) for t, e in evals.items()}
    n_out = sum(w.numel() for w in ws if w is not None)
    w_l1 = sum(float(w.abs().sum()) for w in ws if w is not None)
    contraction = sum(float((w * o).abs().sum()) for w, o in zip(ws, evals[0].outs) if w is not None)
    model = U64 * ((math.ceil(math.log2(max(n_out, 2))) + 2) * contraction + w_l1 * evals[0].error_units)
    fourth = phi[-2] - 4 * phi[-1] + 6 * phi[0] - 4 * phi[1] + phi[2]  # h^4 phi'''' + noise of sd 70^0.5 sigma
    eps = max(model, 4 * abs(fourth) / math.sqrt(70))
    d1 = (phi[1] - phi[-1]) / (2 * h)
    d2 = (phi[2] - phi[-2]) / (4 * h)
    r = (4 * d1 - d2) / 3
    eps_a = U64 * (math.ceil(math.log2(max(n_out, 2))) + 2) * terms + U64 * w_l1 * evals[0].error_units
    tol = 4 * (abs(d2 - d1) + 1.5 * eps / h) + 1.5 * eps / h + eps_a
    scale = max(terms, abs(r))
    err = abs(a - r)
    if scale == 0.0:
        return MathCheck(call, "ok", error=err, tolerance=tol, analytic=a, numeric=r, step=h)
    error, tolerance = err / scale, tol / scale
    if err > tol:
        return MathCheck(call, "math", error=error, tolerance=tolerance, analytic=a, numeric=r, step=h,
                         note=f"its backward is not the derivative of its forward: <w, J v> = {a:.6g} by the "
                              f"backward, {r:.6g} by finite differences")
    if tolerance >= 0.5:
        return MathCheck(call, "unverifiable", error=error, tolerance=tolerance, analytic=a, numeric=r, step=h,
                         note="the finite-difference allowance leaves the check no power here")
    return MathCheck(call, "ok", error=error, tolerance=tolerance, analytic=a, numeric=r, step=h)


def check(model: nn.Module, x: Tensor, y: Tensor, *, eval_mode: bool = False, loss_fn: LossFn = F.cross_entropy,
          seed: int = 0) -> list[MathCheck]:
    """:func:`check_call` for every custom Function call of one float64 step of ``model``."""
    return [check_call(c, seed=seed) for c in find_calls(model, x, y, eval_mode=eval_mode, loss_fn=loss_fn)]


# -- rows and the report ----------------------------------------------------------------------------------
def rows(checks: list[MathCheck]) -> list[Row]:
    """One row per call; a wrong backward is status ``math`` for both sides (it is in every dtype)."""
    out = []
    for c in checks:
        status = Status.MATH if c.status == "math" else Status.OK
        note = c.note if c.status != "ok" else ""
        if c.status in ("unverifiable", "not_reproducible"):
            note = f"not checked ({c.status.replace('_', ' ')}): {c.note}"
        ratio = c.error / c.tolerance if c.tolerance else (math.inf if c.error else 0.0)
        out.append(Row(layer=c.call.module or "(model)", pass_="backward",
                       quantity=f"{c.call.name} (custom Function) <w, J v>", error_a=c.error, error_b=c.error,
                       tolerance=c.tolerance, status=status, origin=ORIGIN, mode="math",
                       side="both" if status == Status.MATH else None, tolerance_a=c.tolerance,
                       tolerance_b=c.tolerance, ratio_a=ratio, ratio_b=ratio, order=c.call.index, note=note))
    return out


def apply_to_report(report: DiffReport, checks: list[MathCheck]) -> None:
    """Add the math rows to ``report``: a wrong backward fails it (exit 1) and the summary names the Function."""
    report.rows += rows(checks)
    wrong = [c for c in checks if c.status == "math"]
    skipped = [c for c in checks if c.status in ("unverifiable", "not_reproducible")]
    report.settings["math_check"] = {"functions": len(checks), "wrong": len(wrong), "not_checked": len(skipped)}
    if not checks:
        return
    verified = len(checks) - len(wrong) - len(skipped)
    tail = f"; math check: {verified} of {len(checks)} custom Function call(s) verified"
    if skipped:
        tail += f", {len(skipped)} not checked (" + "; ".join(f"{c.where}: {c.note}" for c in skipped[:3]) + ")"
    if not wrong:
        report.summary += tail
        return
    first = min(wrong, key=lambda c: c.call.index)
    text = (f"math: the backward of custom autograd Function {first.where} is not the derivative of its forward "
            f"(float64, every dtype, both sides): error {fmt(first.error)} > tolerance {fmt(first.tolerance)}")
    if len(wrong) > 1:
        text += f"; {len(wrong) - 1} more wrong call(s): " + ", ".join(sorted({c.where for c in wrong[1:]}))
    if report.verdict == "agree":
        report.verdict = "mismatch"
        report.first_divergence = FirstDivergence(
            layer=first.call.module or "(model)", pass_="backward", quantity=f"{first.call.name} (custom Function)",
            error=first.error, tolerance=first.tolerance, side="both", step=0, mode="math", status=str(Status.MATH))
        report.summary = f"mismatch: {text}{tail}"
    else:
        report.summary += f"; {text}"

