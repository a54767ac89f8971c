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
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

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


class MagnitudeMode(TorchDispatchMode):
    """Evaluate every aten op on the magnitudes of its operands (see the module docstring)."""

    def __init__(self, decompose_fused: bool = False) -> None:
        super().__init__()
        self.decompose_fused = decompose_fused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        name = func.overloadpacket.__name__
        if self.decompose_fused and name in _DECOMPOSED:
            from torch._decomp import decomposition_table

            decomposition = decomposition_table.get(func)
            if decomposition is not None:
                with self:
                    return tree_map(_abs, decomposition(*tree_map(_abs, tuple(args)), **kwargs))
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
