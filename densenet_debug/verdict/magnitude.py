"""Magnitudes for rounding-error bounds: a unit evaluated on |operands| with every sign dropped.

For a sum of products, the bound on its rounding error scales with ``sum |terms|``, not with the result
(which may cancel). Running the op on ``|inputs|``, ``|parameters|`` and ``|buffers|`` gives that sum for
conv, linear, pooling and the like, but not where the op itself subtracts (``x - mean``, ``a + (-1) * b``).
:class:`MagnitudeMode` closes that gap at the aten level: under it, ``sub`` adds, ``neg`` is ``abs``, an
``alpha`` loses its sign, and every result is made non-negative, in the forward and in the backward that
autograd runs below it. For ops linear in each operand the result is exactly ``sum |terms|``; for other
ops it is the op at the magnitudes of its operands (a heuristic, stated as such in the tolerance origin).

Except ops whose result is a difference that cancels, where that heuristic drops the terms: ``log_softmax``
(``y_i = x_i - max x - log S``) evaluated on magnitudes gives ``|log_softmax(m)|``, ~0 for the largest ``m``
(a model in eval mode whose BN running statistics do not normalise the magnitudes leaves one class far ahead),
while its terms are ``|x_i| + |max x| + |log S|``. Its result's magnitude is the first-order sensitivity to its
operand (``dy_i/dx_j = delta_ij - p_j``: ``|dy_i| <= |dx_i| + max_j |dx_j|``) plus its own terms:
``m_i + max_j m_j + log K`` (``|log S| <= log K`` after the shift by the max). Its backward ``g_i - p_i sum_j g_j``
has terms ``|g_i| + p_i sum_j |g_j| <= m_i + sum_j m_j`` (``p_i <= 1``; the softmax itself is not at hand among
magnitudes). The per-op error model (:mod:`densenet_debug.verdict.ops.errors`) states the same.

**Branches.** A piecewise op decides on signs and orders, which magnitudes do not keep: a max-pool over
|values| picks another pixel than over the values, so its gradient goes elsewhere and the magnitude where the
real gradient flows is 0 (a bound of 0: a false alarm on a correct backend); ``clamp(x, -1, 0.5)`` passes
``x = -0.7`` but not ``|x|``. :class:`Branches` records the decisions of a run on the values (call by call, per
op: a comparison's or index's output, a ReLU's, threshold's, clamp's or leaky ReLU's mask, a max-pool's
argmax) and ``MagnitudeMode(branches=...)`` replays them in the same order, so the magnitude run takes the
values' branches: ``|x|`` where the op passes ``x``, ``|bound|`` where it clamps to a bound, ``|slope| |x|``
on a leaky ReLU's negative side, the values' argmax. A call whose recorded shape does not match (the two runs
drifted apart) falls back to the op on magnitudes and is counted in ``Branches.drift``. Not replayed: max/min
over a dimension, sort and topk (values and indices together), clamps with tensor bounds.

**Kinks of rounded between code** (the between check, :mod:`densenet_debug.verdict.between`, derives the
bounds). A run on the values may decide on an operand it rounded itself, where the side's own decision may
have been the other one. ``Branches.run(..., c)`` keeps, for each deciding call whose operands carry a rounding
count ``c > 0``, the signed coordinate of its decision (zero on the boundary) and ``c``. With ``roundoff``
(``u_side + 2^-53``) and ``eta`` set, the magnitude run judges each such call as it replays it: its ambiguous
elements are those with ``|z| <= c roundoff M_z + c eta`` (``M_z`` the operands' magnitudes there), and there it
takes the larger magnitude of the branches. Whatever the call decided (its output, and the operand a backward
reads: a ReLU's result, a threshold's input, a max-pool's indices) is remembered by storage and view (autograd
hands a saved tensor back as another object), and an op that routes a value by it (the backward ops of
relu/threshold, leaky ReLU and hardtanh, ``where`` and ``masked_fill`` on a comparison or a logical op of
comparisons, a product with ``sgn``, a max-pool's backward) takes both routes' magnitudes at those elements
and records its *jump* there: how much its result can change if the decision flips (so does a ``threshold``
whose value is not its threshold). The *allowance run* (``allowance = True``, after :meth:`Branches.restart`)
is the same magnitude run with zero seeds, the magnitude run's ambiguous elements, and each recorded jump added
to the same call's result: what reaches a unit in backward is the sum of the jumps carried back through
``|J^T|``; in forward, its magnitudes plus the jumps carried forward.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from densenet_debug._autograd import in_backward

# Ops that only move or create values: magnitudes pass through them unchanged.
_PASS = {
    "detach", "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "permute", "transpose", "t",
    "unsqueeze", "squeeze", "slice", "select", "as_strided", "clone", "contiguous", "_to_copy", "copy_",
    "cat", "stack", "split", "split_with_sizes", "chunk", "unbind", "narrow", "index", "index_select",
    "gather", "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full",
    "full_like", "fill_", "zero_", "new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided",
    "alias", "lift_fresh", "flatten", "unflatten", "masked_fill", "masked_fill_", "sym_size", "sym_stride",
    "is_same_size", "_local_scalar_dense", "scalar_tensor", "arange", "lift_fresh_copy", "set_",
}


def _abs(v: object) -> object:
    if isinstance(v, Tensor) and v.is_floating_point():
        return v.abs()
    if isinstance(v, float):
        return abs(v)
    return v


# Fused kernels that subtract inside (x - mean): with ``decompose_fused``, run as their aten decomposition
# under the mode, so that each subtraction inside adds magnitudes too. The between check needs it (a batch
# norm called a second time is between code, and its kernel on |values| cancels: measured 150x under the
# error of a correct float32 backward); local rows bound a batch norm by its own error model instead, and an
# unknown unit (group, layer and instance norm among them) by the generic rule on these magnitudes.
_DECOMPOSED = {"native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
               "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
               "native_group_norm", "native_group_norm_backward", "native_layer_norm", "native_layer_norm_backward",
               "_weight_norm_interface"}


# -- branches of piecewise ops ---------------------------------------------------------------------------
_MASKED = {"relu", "relu_", "threshold", "threshold_", "leaky_relu", "leaky_relu_", "threshold_backward",
           "leaky_relu_backward", "hardtanh_backward"}
_CLAMPS = {"clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "hardtanh", "hardtanh_"}
_CHOICES = {"maximum", "minimum", "max_pool2d_with_indices", "max_pool1d_with_indices",
            "max_pool3d_with_indices"}
BRANCH_OPS = _MASKED | _CLAMPS | _CHOICES
_MASKED_BASE = {"relu", "threshold", "leaky_relu"}
_CLAMPS_BASE = {"clamp", "clamp_min", "clamp_max", "hardtanh"}
_COMPARED = {"gt", "ge", "lt", "le", "eq", "ne"}
_TWO_OPERANDS = _COMPARED | {"maximum", "minimum"}
# Ops that decide on their own operands: with rounded operands (c > 0) their decision may be ambiguous.
_DIRECT = _MASKED_BASE | _CLAMPS_BASE | _TWO_OPERANDS | {"abs", "sgn", "sign", "max_pool2d_with_indices"}
_LOGICAL = {"logical_and", "logical_or", "logical_xor", "logical_not"}
# Ops that route a value or a gradient by an earlier decision, and the operands that carry it.
_ROUTING: dict[str, tuple[tuple[int, ...], frozenset]] = {
    "threshold_backward": ((1,), frozenset({"relu", "threshold"})),
    "leaky_relu_backward": ((1,), frozenset({"leaky_relu"})),
    "hardtanh_backward": ((1,), frozenset({"hardtanh"})),
    "where": ((0,), frozenset(_COMPARED | _LOGICAL)),
    "masked_fill": ((1,), frozenset(_COMPARED | _LOGICAL)),
    "mul": ((0, 1), frozenset({"sgn", "sign"})),
    "max_pool2d_with_indices_backward": ((7,), frozenset({"max_pool2d_with_indices"})),
}


def _view_key(t: Tensor) -> tuple:
    """A tensor as autograd hands it back (a saved tensor is another object on the same storage)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = id(t)
    return ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def _signed(base: str, func: object, args: tuple, kwargs: dict) -> Tensor | None:
    """A float64 copy of the signed coordinate of a deciding op's operands (zero on its boundary:
    :func:`densenet_debug.capture.kinks.signed_coordinate`, through the coverage of
    :mod:`densenet_debug.verdict.inner_kinks`); a max-pool's: its input."""
    if base.startswith("max_pool"):
        x = args[0] if args else None
        return x.detach().to("cpu", torch.float64, copy=True) if isinstance(x, Tensor) and x.dim() == 4 else None
    from densenet_debug.verdict import inner_kinks  # late: it imports the replay machinery

    z = inner_kinks.decision_coordinate(base, func, args, kwargs)
    return None if z is None else z.to("cpu", torch.float64, copy=True)


def _pool_geometry(args: tuple, kwargs: dict, first: int) -> tuple | None:
    """(kernel, stride, padding, dilation) pairs of a 2-d max pool's arguments from ``args[first]``; None with
    ``ceil_mode`` (not covered: excuses nothing)."""
    def pair(v: object, default: tuple[int, int]) -> tuple[int, int]:
        if v is None or (isinstance(v, (list, tuple)) and not v):
            return default
        if isinstance(v, int):
            return (v, v)
        return (int(v[0]), int(v[-1]))  # type: ignore[index]
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    got = [_arg(args, kwargs, first + i, n) for i, n in enumerate(names)]
    if got[4]:
        return None
    k = pair(got[0], (1, 1))
    return k, pair(got[1], k), pair(got[2], (0, 0)), pair(got[3], (1, 1))


def _pool_candidates(z: Tensor, args: tuple, kwargs: dict, rel: float, eta: float
                     ) -> tuple[Tensor, Tensor] | None:
    """A max-pool over rounded values: (windows whose maximum may be another element, per output; input
    elements that may be a window's maximum there, per input). A pair of window elements is ambiguous when
    their values differ by at most ``rel (M_i + M_j) + 2 eta`` (bounded by ``2 rel max M + 2 eta``)."""
    geometry = _pool_geometry(args, kwargs, 1)
    if geometry is None or z.dim() != 4:
        return None
    (kh, kw), stride, (ph, pw), dil = geometry
    n, c, h, w = z.shape
    m = args[0].detach().abs().to(torch.float64).reshape(n * c, 1, h, w)
    vals = torch.nn.functional.pad(z.reshape(n * c, 1, h, w), (pw, pw, ph, ph), value=-math.inf)
    mags = torch.nn.functional.pad(m, (pw, pw, ph, ph))
    cols = torch.nn.functional.unfold(vals, (kh, kw), dilation=dil, stride=stride)  # (n c, K, L)
    mcols = torch.nn.functional.unfold(mags, (kh, kw), dilation=dil, stride=stride)
    top = cols.amax(1, keepdim=True)
    near = (top - cols) <= 2 * rel * mcols.amax(1, keepdim=True) + 2 * eta
    windows = near.sum(1) >= 2  # (n c, L)
    chosen = (near & windows.unsqueeze(1)).to(torch.float64)
    hp, wp = h + 2 * ph, w + 2 * pw
    cand = torch.nn.functional.fold(chosen, (hp, wp), (kh, kw), dilation=dil, stride=stride)
    cand = cand[..., ph:ph + h, pw:pw + w].reshape(n, c, h, w) > 0
    ho = (hp - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wp - dil[1] * (kw - 1) - 1) // stride[1] + 1
    return windows.reshape(n, c, ho, wo), cand


def _pool_spread(g: Tensor, windows: Tensor, cand: Tensor, args: tuple, shape: torch.Size) -> Tensor:
    """Each ambiguous window's gradient magnitude at every candidate it may route to (summed over windows)."""
    geometry = _pool_geometry(args, {}, 2)
    if geometry is None:
        raise RuntimeError("ceil_mode")
    (kh, kw), stride, (ph, pw), dil = geometry
    n, c, h, w = shape
    cols = (g.to(torch.float64) * windows).reshape(n * c, 1, -1).expand(n * c, kh * kw, -1)
    hp, wp = h + 2 * ph, w + 2 * pw
    spread = torch.nn.functional.fold(cols, (hp, wp), (kh, kw), dilation=dil, stride=stride)
    return spread[..., ph:ph + h, pw:pw + w].reshape(n, c, h, w) * cand


def _number(v: object, default: float) -> float | None:
    """A scalar argument as a float (None for a tensor bound, which this module does not replay)."""
    if v is None:
        return default
    if isinstance(v, Tensor):
        return float(v) if v.numel() == 1 else None
    return float(v)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: object = None) -> object:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _decision(name: str, args: tuple, kwargs: dict, out: object) -> Tensor | None:
    """What a piecewise op decided, on the values (module docstring): a mask, a side, an index or a bool."""
    x = args[0] if args else None
    if name in ("relu", "relu_"):
        return x > 0
    if name in ("threshold", "threshold_"):
        return x > _arg(args, kwargs, 1, "threshold")
    if name in ("leaky_relu", "leaky_relu_"):
        return x > 0
    if name == "threshold_backward":
        return args[1] > _arg(args, kwargs, 2, "threshold")
    if name == "leaky_relu_backward":
        return args[1] > 0
    if name == "hardtanh_backward":
        return (args[1] > _arg(args, kwargs, 2, "min_val")) & (args[1] < _arg(args, kwargs, 3, "max_val"))
    if name in _CLAMPS:
        lo, hi = _bounds(name, args, kwargs)
        if lo is None or hi is None:
            return None
        return (x > hi).to(torch.int8) - (x < lo).to(torch.int8)  # +1 clamped to hi, -1 to lo, 0 passed
    if name in ("maximum", "minimum"):
        return args[0] >= args[1] if name == "maximum" else args[0] <= args[1]
    if name.startswith("max_pool"):
        return out[1]
    return None


def _bounds(name: str, args: tuple, kwargs: dict) -> tuple[float | None, float | None]:
    if name.startswith("hardtanh"):
        return _number(_arg(args, kwargs, 1, "min_val"), -1.0), _number(_arg(args, kwargs, 2, "max_val"), 1.0)
    if name.startswith("clamp_min"):
        return _number(_arg(args, kwargs, 1, "min"), -math.inf), math.inf
    if name.startswith("clamp_max"):
        return -math.inf, _number(_arg(args, kwargs, 1, "max"), math.inf)
    return _number(_arg(args, kwargs, 1, "min"), -math.inf), _number(_arg(args, kwargs, 2, "max"), math.inf)


def _replay(name: str, args: tuple, kwargs: dict, d: Tensor, amb: object = None) -> object:
    """The op on magnitudes, taking the recorded decision ``d`` (module docstring); where ``amb`` (ambiguous
    elements of rounded between code), the larger magnitude of the branches either way."""
    m = args[0].abs()
    if name in ("relu", "threshold", "relu_", "threshold_"):
        fill = 0.0 if name.startswith("relu") else abs(float(_arg(args, kwargs, 2, "value")))
        out = torch.where(d, m, torch.full_like(m, fill))
        if isinstance(amb, Tensor):
            out = torch.where(amb, m.clamp_min(fill), out)
        return args[0].copy_(out) if name.endswith("_") else out
    if name in ("leaky_relu", "leaky_relu_", "leaky_relu_backward"):
        slope = abs(float(_arg(args, kwargs, 1 if name != "leaky_relu_backward" else 2, "negative_slope", 0.01)))
        out = torch.where(d, m, m * slope)
        if isinstance(amb, Tensor):
            out = torch.where(amb, m * max(1.0, slope), out)
        return args[0].copy_(out) if name.endswith("_") else out
    if name in ("threshold_backward", "hardtanh_backward"):
        return torch.where(d, m, torch.zeros_like(m))
    if name in _CLAMPS:
        lo, hi = _bounds(name, args, kwargs)
        out = torch.where(d == 0, m, torch.full_like(m, abs(hi)) if math.isfinite(hi) else m)
        out = torch.where(d < 0, torch.full_like(m, abs(lo)) if math.isfinite(lo) else m, out)
        if isinstance(amb, Tensor):
            either = m.clamp_min(max([abs(v) for v in (lo, hi) if math.isfinite(v)], default=0.0))
            out = torch.where(amb, either, out)
        return args[0].copy_(out) if name.endswith("_") else out
    if name in ("maximum", "minimum"):
        out = torch.where(d, m, args[1].abs())
        return torch.where(amb, torch.maximum(m, args[1].abs()), out) if isinstance(amb, Tensor) else out
    # max-pool: the values' argmax, read out of |x| (indices count within each (sample, channel) plane)
    start = m.dim() - int(name[len("max_pool")])
    out = m.flatten(start).gather(-1, d.flatten(start)).view_as(d)
    if isinstance(amb, tuple):  # an ambiguous window: the largest magnitude in it
        out = torch.where(amb[0], torch.ops.aten.max_pool2d_with_indices.default(m, *args[1:], **kwargs)[0], out)
    return out, d


# Ops whose whole output is a decision (booleans or indices): the magnitude run takes the values' output.
DECIDING_OPS = {"gt", "ge", "lt", "le", "eq", "ne", "logical_and", "logical_or", "logical_xor", "logical_not",
                "isnan", "isinf", "isfinite", "isposinf", "isneginf", "signbit", "argmax", "argmin", "nonzero"}


def _decides(name: str, out: object) -> bool:
    """A deciding op (:data:`DECIDING_OPS`) that returned booleans or integers only."""
    flat = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
    return name in DECIDING_OPS and bool(flat) and all(not (t.is_floating_point() or t.is_complex()) for t in flat)


class Branches:
    """The decisions of piecewise ops in one run on the values, replayed in order by a :class:`MagnitudeMode`.

    Every call is counted per op (a non-deciding call of an op as None), so the k-th call of an op in the
    magnitude run meets the k-th call of the run on the values."""

    def __init__(self) -> None:
        self.recorded: dict[str, list[object]] = {}
        self.used: dict[str, int] = {}
        self.drift = 0
        # kinks of the code between units (module docstring, "Kinks of rounded between code")
        self.coordinates: dict[tuple[str, int], tuple[Tensor, float]] = {}  # (op, call) -> (z, c) on the values
        self.roundoff: float | None = None  # u_side + 2^-53: set to judge ambiguity in the magnitude runs
        self.eta = 0.0  # the side's underflow
        self.allowance = False  # the allowance run: the injections are added where they were made
        self.injections: dict[tuple[str, int, bool], Tensor] = {}
        self.ambiguous: dict[str, int] = {}  # op -> ambiguous elements (forward decisions), counted once
        self._links: dict[tuple, tuple[Tensor, str, Tensor, float | Tensor]] = {}
        self._injected: dict[str, int] = {}
        self._ambs: dict[tuple[str, int], object] = {}  # the magnitude run's ambiguous elements, per call
        self._amb: Tensor | tuple[Tensor, Tensor] | None = None  # the ambiguity of the call being replayed
        self._target: Tensor | None = None  # an in-place routing op's operand before it wrote

    def restart(self) -> None:
        """Before another magnitude run: replay from the first call again."""
        self.used, self._links, self._injected, self._amb = {}, {}, {}, None

    def run(self, func: object, args: tuple, kwargs: dict, c: float = 0.0) -> object:
        """Run one op of the values' run and record its decision (an in-place op's read before it writes);
        ``c``: the rounding count of its operands (> 0: its signed coordinate is kept, to judge ambiguity)."""
        name = func.overloadpacket.__name__
        d: object = None
        if c > 0 and name.rstrip("_") in _DIRECT:
            with torch.no_grad():
                z = _signed(name.rstrip("_"), func, args, kwargs)
            if z is not None:
                self.coordinates[(name, len(self.recorded.get(name, [])))] = (z, c)
        if name in BRANCH_OPS and name.endswith("_"):
            with torch.no_grad():
                d = _decision(name, args, kwargs, None)
        out = func(*args, **kwargs)
        with torch.no_grad():
            if name in BRANCH_OPS and not name.endswith("_"):
                d = _decision(name, args, kwargs, out)
            elif name not in BRANCH_OPS and _decides(name, out):  # a comparison's or an index's own output
                d = tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, out)
        self.recorded.setdefault(name, []).append(d.detach().clone() if isinstance(d, Tensor) else d)
        return out

    def replay(self, func: object, args: tuple, kwargs: dict) -> tuple[bool, object]:
        """(True, result) when the values' run decided at this call, else (False, None)."""
        name = func.overloadpacket.__name__
        self._amb = None
        k = self.used.get(name, 0)
        self.used[name] = k + 1
        seen = self.recorded.get(name, [])
        if k >= len(seen):  # more calls than the values' run made (the tool's own |x| are no drift)
            self.drift += bool(seen) or name in BRANCH_OPS
            return False, None
        d = seen[k]
        self._amb = self._ambiguity(name, k, args, kwargs)
        if d is None:
            return False, None
        if name not in BRANCH_OPS:
            out = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, d)
            if name.endswith("_") and isinstance(out, Tensor) and isinstance(args[0], Tensor):
                out = args[0].copy_(out)  # in place (``cond.logical_and_(...)``): later ops read the target
            return True, out
        if not name.startswith("max_pool") and not isinstance(args[0], Tensor):
            return False, None
        try:
            if not name.startswith("max_pool") and d.shape != args[0].shape and name not in ("maximum", "minimum"):
                raise RuntimeError("shape")
            return True, _replay(name, args, kwargs, d, self._amb)
        except RuntimeError:  # the two runs drifted apart: the op on magnitudes, counted
            self.drift += 1
            self._amb = None
            return False, None

    # -- kinks of rounded between code (module docstring) ----------------------------------------------------
    def _ambiguity(self, name: str, k: int, args: tuple, kwargs: dict) -> Tensor | tuple[Tensor, Tensor] | None:
        """Where the values' decision at this call may go either way: ``|z| <= c (u_side + 2^-53) M_z + c eta``
        (a bool per element of ``z``; a max-pool's: per input element, a candidate of an ambiguous window)."""
        if self.allowance:  # the magnitude run's judgement (this run's forward magnitudes carry its jumps)
            return self._ambs.get((name, k))
        got = self.coordinates.get((name, k))
        if got is None or self.roundoff is None:
            return None
        z, c = got
        base = name.rstrip("_")
        try:
            with torch.no_grad():
                if base.startswith("max_pool"):
                    amb = _pool_candidates(z, args, kwargs, c * self.roundoff, c * self.eta)
                else:
                    a = args[0].detach().abs().to(torch.float64)
                    b = _arg(args, kwargs, 1, "other")
                    two = isinstance(b, Tensor) and base in _TWO_OPERANDS
                    m = a + b.detach().abs().to(torch.float64) if two else a
                    amb = z.abs() <= m * (c * self.roundoff) + c * self.eta
                    amb = amb.any(0) if base in _CLAMPS_BASE else amb
        except RuntimeError:  # shapes that do not meet (drift): no ambiguity, so nothing is excused
            return None
        if amb is None:
            return None
        first = amb[0] if isinstance(amb, tuple) else amb
        if not bool(first.any()):
            return None
        if not in_backward():
            self.ambiguous[base] = self.ambiguous.get(base, 0) + int(first.sum())
        self._ambs[(name, k)] = amb
        return amb

    def ambiguity(self, op: str, call: int) -> object:
        """The ambiguous elements the magnitude run found at the ``call``-th call of ``op`` (None: none)."""
        return self._ambs.get((op, call))

    def before(self, func: object, args: tuple) -> None:
        """Before an op of a magnitude run: an in-place op that routes by a decision (``masked_fill_``) writes
        its operand, whose magnitude its jump needs."""
        self._target = None
        name = func.overloadpacket.__name__
        if self._links and name.endswith("_") and name.rstrip("_") in _ROUTING and args and \
                isinstance(args[0], Tensor):
            self._target = args[0].detach().clone()

    def link(self, func: object, args: tuple, kwargs: dict, out: object) -> object:
        """After an op of a magnitude run: remember which elements of what it decided are ambiguous, and at an op
        that routes a gradient by such a decision, take both routes' magnitudes there and inject its jump
        (recorded by the magnitude run, added by the allowance run)."""
        name = func.overloadpacket.__name__
        base = name.rstrip("_")
        amb, self._amb = self._amb, None
        if amb is not None and base in _DIRECT:
            width = 2.0 if base in ("sgn", "sign") else 1.0
            if base.startswith("max_pool"):
                self._remember(out[1], base, *amb)  # its backward reads the indices: (windows, candidates)
            else:
                self._remember(out if isinstance(out, Tensor) else args[0], base, amb, width)
                if isinstance(args[0], Tensor) and base in _MASKED_BASE | _CLAMPS_BASE:  # a backward may read x
                    self._remember(args[0], base, amb, width)
            if base == "threshold" and isinstance(out, Tensor) and not in_backward():
                value = float(_arg(args, kwargs, 2, "value"))
                if value != float(_arg(args, kwargs, 1, "threshold")):  # x or value: a jump at the threshold
                    with torch.no_grad():
                        jump = torch.where(amb, out + abs(value), torch.zeros((), dtype=out.dtype))
                    out = self._inject(base, name, out, jump)
            return out
        if base in _LOGICAL:
            masks = [self._lookup(a, frozenset(_COMPARED | _LOGICAL)) for a in args if isinstance(a, Tensor)]
            masks = [m for m in masks if m is not None]
            if masks and isinstance(out, Tensor):
                either = masks[0][0]
                for m in masks[1:]:
                    either = either | m[0]
                self._remember(out, base, either.expand(out.shape), 1.0)
            return out
        if base not in _ROUTING or not isinstance(out, Tensor) or not self._links:
            return out
        where, kinds = _ROUTING[base]
        found = [(j, self._lookup(args[j], kinds)) for j in where if j < len(args) and isinstance(args[j], Tensor)]
        found = [(j, got) for j, got in found if got is not None]
        if not found:
            return out
        j, (mask, width) = found[0]
        jump = self._jump(base, args, kwargs, out, mask, width, j)
        if jump is None:
            return out
        both, jump = jump
        with torch.no_grad():
            out = out.copy_(torch.maximum(out, both)) if name.endswith("_") else torch.maximum(out, both)
        return self._inject(base, name, out, jump)

    def _inject(self, base: str, name: str, out: Tensor, jump: Tensor) -> Tensor:
        """The magnitude run records a routing call's jump; the allowance run adds it to the same call's result
        (calls counted per op, in both runs alike)."""
        key = (base, self._injected.get(base, 0), in_backward())
        self._injected[base] = key[1] + 1
        with torch.no_grad():
            if not self.allowance:
                self.injections[key] = jump
                return out
            add = self.injections.get(key)
            if add is not None and add.shape == out.shape:
                out = out.add_(add) if name.endswith("_") else out + add
        return out

    @property
    def forward_jumps(self) -> bool:
        """Whether a routing call of the forward jumped (its forward checks then need an allowance too)."""
        return any(not backward for _, _, backward in self.injections)

    def _jump(self, base: str, args: tuple, kwargs: dict, out: Tensor, mask: Tensor, width: float | Tensor,
              j: int) -> tuple[Tensor, Tensor] | None:
        """(both routes' magnitudes, the largest change of the result if the decision flips), at ``mask``."""
        try:
            zero = torch.zeros((), dtype=out.dtype)
            if base == "max_pool2d_with_indices_backward":
                spread = _pool_spread(args[0].abs(), mask, width, args, out.shape).to(out.dtype)  # type: ignore[arg-type]
                return spread, spread
            if base in ("threshold_backward", "hardtanh_backward", "leaky_relu_backward"):
                g = args[0].abs()
                slope = abs(float(_arg(args, kwargs, 2, "negative_slope", 0.0))) if base == "leaky_relu_backward" \
                    else 0.0
                m = mask.expand(out.shape)
                return torch.where(m, g, zero), torch.where(m, g * abs(1.0 - slope) if slope else g, zero)
            if base == "where":
                a, b = (_abs(v) for v in (args[1], args[2]))
                a = a if isinstance(a, Tensor) else torch.tensor(a, dtype=out.dtype)
                b = b if isinstance(b, Tensor) else torch.tensor(b, dtype=out.dtype)
                m = mask.expand(out.shape)
                return torch.where(m, torch.maximum(a, b), zero), torch.where(m, a + b, zero)
            if base == "masked_fill":
                t = (self._target if self._target is not None else args[0]).abs()
                v = abs(float(args[2]))
                m = mask.expand(out.shape)
                return torch.where(m, t.clamp_min(v), zero), torch.where(m, t + v, zero)
            if base == "mul":  # a gradient times a sign (abs's backward): the sign may be the other one
                other = args[1 - j]
                if not isinstance(other, Tensor) or not isinstance(width, float):
                    return None
                m = mask.expand(out.shape)
                return torch.where(m, other.abs(), zero), torch.where(m, other.abs() * width, zero)
        except RuntimeError:  # shapes that do not meet: nothing injected, so nothing is excused
            return None
        return None

    def _remember(self, t: Tensor, kind: str, mask: Tensor, extra: float | Tensor) -> None:
        """``t`` carries ``kind``'s ambiguous decisions at ``mask`` (``extra``: a sign's jump width, or a
        max-pool's candidate elements)."""
        if isinstance(t, Tensor) and mask.shape == t.shape:
            self._links[_view_key(t)] = (t, kind, mask, extra)  # a strong reference: the storage stays ours

    def _lookup(self, t: Tensor, kinds: frozenset) -> tuple[Tensor, float | Tensor] | None:
        got = self._links.get(_view_key(t))
        return None if got is None or got[1] not in kinds else (got[2], got[3])


class MagnitudeMode(TorchDispatchMode):
    """Evaluate every aten op on the magnitudes of its operands (see the module docstring); with ``branches``,
    piecewise ops take the decisions a run on the values recorded there."""

    def __init__(self, decompose_fused: bool = False, branches: Branches | None = None) -> None:
        super().__init__()
        self.decompose_fused = decompose_fused
        self.branches = branches
        self._decomposing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        name = func.overloadpacket.__name__
        if self.decompose_fused and name in _DECOMPOSED:
            from torch._decomp import decomposition_table

            decomposition = decomposition_table.get(func)
            if decomposition is not None:
                self._decomposing += 1  # ops inside are not the values' run's: no branch is replayed there
                try:
                    with self:
                        return tree_map(_abs, decomposition(*tree_map(_abs, tuple(args)), **kwargs))
                finally:
                    self._decomposing -= 1
        linking = self.branches is not None and not self._decomposing
        if linking:
            self.branches.before(func, args)
            hit, out = self.branches.replay(func, args, kwargs)
            if hit:
                return self.branches.link(func, args, kwargs, out)
        out = self._evaluate(func, name, args, kwargs)
        return self.branches.link(func, args, kwargs, out) if linking else out

    def _evaluate(self, func: object, name: str, args: tuple, kwargs: dict) -> object:
        if name in _PASS or name.startswith("_foreach") and name.endswith("_"):
            return func(*args, **kwargs)
        if "alpha" in kwargs:
            kwargs["alpha"] = abs(kwargs["alpha"])
        if name in ("sub", "rsub"):
            a, b = args[0], args[1]
            alpha = abs(args[2]) if len(args) > 2 else kwargs.pop("alpha", 1)
            return torch.add(_abs(a), _abs(b), alpha=alpha) if isinstance(a, Tensor) else torch.add(
                _abs(b), abs(a))
        if name == "neg":
            return args[0].abs()
        if name in ("_prelu_kernel", "_prelu_kernel_backward"):
            return _prelu_terms(name, *tree_map(_abs, tuple(args)))
        if name in ("tanh_backward", "sigmoid_backward", "silu_backward"):  # fused, and subtracts inside
            return _saturating_backward_terms(name, *tree_map(_abs, tuple(args[:2])))
        if name == "_weight_norm_interface_backward":  # fused, subtracts inside, and has no decomposition
            return _weight_norm_backward_terms(*tree_map(_abs, tuple(args[:4])), int(args[4]))
        if name == "_log_softmax":
            return _log_softmax_terms(args[0].abs(), int(args[1]))
        if name == "_log_softmax_backward_data":
            m, dim = args[0].abs(), int(args[2])
            return m + m.sum(dim, keepdim=True)
        if name in ("add", "sub") and len(args) > 2:
            args = (*args[:2], abs(args[2]), *args[3:])
        if name.endswith("_") and args and isinstance(args[0], Tensor):  # in place: the target is a magnitude
            out = func(args[0], *tree_map(_abs, tuple(args[1:])), **kwargs)
            return out.abs_() if isinstance(out, Tensor) and out.is_floating_point() else out
        out = func(*tree_map(_abs, tuple(args)), **kwargs)
        return tree_map(_abs, out)


def _prelu_terms(name: str, *args: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """PReLU at magnitudes, either branch: on |x| its kernel would take the positive branch everywhere, and
    the weight's gradient (``sum g x`` over the negative inputs) would come out 0. ``|x| max(1, |w|)`` forward;
    backward ``|g| max(1, |w|)`` for the input and ``|g| |x|`` per element for the weight (every element as if
    negative; autograd then sums it to the weight's shape)."""
    if name == "_prelu_kernel":
        x, w = args
        return x * w.clamp_min(1.0)
    g, x, w = args
    return g * w.clamp_min(1.0), g * x


def _saturating_backward_terms(name: str, g: Tensor, y: Tensor) -> Tensor:
    """Fused backward formulas that subtract inside, at magnitudes, each subtraction as an addition:
    ``tanh_backward(g, y) = g (1 - y^2)`` -> ``|g| (1 + y^2)``; ``sigmoid_backward(g, y) = g y (1 - y)`` ->
    ``|g| |y| (1 + |y|)``; ``silu_backward(g, x) = g s (1 + x (1 - s))``, ``s = sigmoid(x)`` -> ``|g| s (1 + |x|
    (1 + s))`` with ``s`` at ``|x|`` (no smaller than at ``x``). Where the function saturates the kernel on
    |values| gives about 0 while its rounding does not: a correct float32 tanh between units failed at 38x
    its bound, 8 seeds of 8."""
    if name == "tanh_backward":
        return g * (1 + y * y)
    if name == "sigmoid_backward":
        return g * y * (1 + y)
    s = torch.sigmoid(y)
    return g * s * (1 + y * (1 + s))


def _weight_norm_backward_terms(gw: Tensor, v: Tensor, g: Tensor, norms: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Weight norm's backward (``w = g v / |v|``) at magnitudes, its subtraction as an addition:
    ``grad_v = g/|v| (gw - v s/|v|^2)``, ``grad_g = s/|v|`` with ``s = sum gw v`` over every dim but ``dim``,
    become ``|g|/|v| (|gw| + |v| S/|v|^2)`` and ``S/|v|``, ``S = sum |gw| |v|``. (Its kernel on |values| cancels:
    a correct float32 step failed at 7.8x the bound.)"""
    dims = [d for d in range(v.dim()) if d != dim % max(v.dim(), 1)] if dim != -1 else list(range(v.dim()))
    terms = (gw * v).sum(dims, keepdim=True) if dims else gw * v
    return g / norms * (gw + v * terms / norms**2), (terms / norms).reshape(g.shape)


def _log_softmax_terms(m: Tensor, dim: int) -> Tensor:
    """Sum |terms| of ``log_softmax`` at operand magnitudes ``m`` (module docstring)."""
    k = m.shape[dim] if m.dim() else 1
    top = m.amax(dim, keepdim=True) if m.dim() else m
    return m + top + math.log(k)


def magnitude_module(module: nn.Module, params: dict[str, Tensor] | None = None) -> nn.Module:
    """A float64 CPU copy of ``module`` with |parameters| and |buffers| (``params`` override its own)."""
    clone = copy.deepcopy(module).to("cpu", torch.float64)
    params = params or {}
    with torch.no_grad():
        for name, p in clone.named_parameters():
            p.copy_(params[name].abs() if name in params else p.abs())
        for b in clone.buffers():
            if b.is_floating_point():
                b.abs_()
    return clone
