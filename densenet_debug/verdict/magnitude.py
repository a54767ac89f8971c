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
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

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
# error of a correct float32 backward); local rows bound a batch norm by its own error model instead.
_DECOMPOSED = {"native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
               "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training"}


# -- branches of piecewise ops ---------------------------------------------------------------------------
_MASKED = {"relu", "relu_", "threshold", "threshold_", "leaky_relu", "leaky_relu_", "threshold_backward",
           "leaky_relu_backward", "hardtanh_backward"}
_CLAMPS = {"clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "hardtanh", "hardtanh_"}
_CHOICES = {"maximum", "minimum", "max_pool2d_with_indices", "max_pool1d_with_indices",
            "max_pool3d_with_indices"}
BRANCH_OPS = _MASKED | _CLAMPS | _CHOICES


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


def _replay(name: str, args: tuple, kwargs: dict, d: Tensor) -> object:
    """The op on magnitudes, taking the recorded decision ``d`` (module docstring)."""
    m = args[0].abs()
    if name in ("relu", "threshold"):
        fill = 0.0 if name == "relu" else abs(float(_arg(args, kwargs, 2, "value")))
        return torch.where(d, m, torch.full_like(m, fill))
    if name in ("relu_", "threshold_"):
        fill = 0.0 if name == "relu_" else abs(float(_arg(args, kwargs, 2, "value")))
        return args[0].abs_().masked_fill_(~d, fill)
    if name in ("leaky_relu", "leaky_relu_", "leaky_relu_backward"):
        slope = abs(float(_arg(args, kwargs, 1 if name != "leaky_relu_backward" else 2, "negative_slope", 0.01)))
        out = torch.where(d, m, m * slope)
        return args[0].copy_(out) if name.endswith("_") else out
    if name in ("threshold_backward", "hardtanh_backward"):
        return torch.where(d, m, torch.zeros_like(m))
    if name in _CLAMPS:
        lo, hi = _bounds(name, args, kwargs)
        out = torch.where(d == 0, m, torch.full_like(m, abs(hi)) if math.isfinite(hi) else m)
        out = torch.where(d < 0, torch.full_like(m, abs(lo)) if math.isfinite(lo) else m, out)
        return args[0].copy_(out) if name.endswith("_") else out
    if name in ("maximum", "minimum"):
        return torch.where(d, m, args[1].abs())
    # max-pool: the values' argmax, read out of |x| (indices count within each (sample, channel) plane)
    start = m.dim() - int(name[len("max_pool")])
    return m.flatten(start).gather(-1, d.flatten(start)).view_as(d), d


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

    def run(self, func: object, args: tuple, kwargs: dict) -> object:
        """Run one op of the values' run and record its decision (an in-place op's read before it writes)."""
        name = func.overloadpacket.__name__
        d: object = None
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
        k = self.used.get(name, 0)
        self.used[name] = k + 1
        seen = self.recorded.get(name, [])
        if k >= len(seen):  # more calls than the values' run made (the tool's own |x| are no drift)
            self.drift += bool(seen) or name in BRANCH_OPS
            return False, None
        d = seen[k]
        if d is None:
            return False, None
        if name not in BRANCH_OPS:
            return True, tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, d)
        if not name.startswith("max_pool") and not isinstance(args[0], Tensor):
            return False, None
        try:
            if not name.startswith("max_pool") and d.shape != args[0].shape and name not in ("maximum", "minimum"):
                raise RuntimeError("shape")
            return True, _replay(name, args, kwargs, d)
        except RuntimeError:  # the two runs drifted apart: the op on magnitudes, counted
            self.drift += 1
            return False, None


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
        if self.branches is not None and not self._decomposing:
            hit, out = self.branches.replay(func, args, kwargs)
            if hit:
                return out
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
