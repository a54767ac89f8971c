"""NumPy float64 rules for aten ops: the forward value, the vector-Jacobian product, and their rounding counts.

No torch in here: a rule sees NumPy arrays and Python numbers (the graph's constant arguments). Each rule has

* ``forward(a, abs_)`` — the op's value; with ``abs_`` the same formula on ``|inputs|`` with every
  subtraction turned into an addition, i.e. ``A = Σ|terms|`` of each output element;
* ``backward(a, out, g, abs_)`` — the input gradients from the output gradient ``g`` (``{slot: array}``,
  slots numbering the tensor arguments in order, lists flattened); with ``abs_`` the same products with
  ``|operands|`` on a non-negative ``g``: ``|J|ᵀ g`` (what an error ``g`` of the output gradient can become)
  and, on ``|g|``, the ``Σ|terms|`` of each gradient element;
* ``k_fwd(a)`` / ``k_bwd(a)`` — how many roundings an element of the result goes through (its longest chain
  of float operations: the reduction length of a sum of products, plus the op's other operations).
* ``backward_sq(a, out, V)`` (or ``sq``: how to get it from ``backward``) — ``(J∘J)ᵀV``, how the variances of
  independent errors of the output gradient reach the inputs (the interpreter's gradient bound, derived in
  :mod:`.interpreter`).

The error model (Higham) of the forward rows: a result computed in float64 with ``K`` roundings in sequence
lies within ``γ_K · Σ|terms|`` of the exact one, ``γ_K = Kε/(1 - Kε)``, ``ε = 2⁻⁵³``, in any summation order
(the gradient sweep uses ``K`` and ``Σ|terms|`` under the random-rounding model instead). Ops with
``K = 0`` (views, cat, ReLU, max-pool, copies) are exact and must agree bit for bit. BatchNorm, log-softmax
and the loss, whose error is not a plain ``γ_K·Σ|terms|``, give their bound through ``bound_fwd`` /
``bound_bwd`` (derived there). Where the rule cannot reproduce an argument combination (grouped or dilated
convolution, ceil-mode pooling, …) it raises :class:`Unsupported` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from densenet_debug.numpy_oracle import ops

Array = np.ndarray
EPS = 2.0 ** -53


class Unsupported(Exception):
    """An op, or an argument of it, that has no NumPy rule (the message names it)."""


def gamma(k: float) -> float:
    return k * EPS / (1 - k * EPS) if k > 0 else 0.0


@dataclass
class Rule:
    forward: Callable[..., Any]
    backward: Callable[..., dict[int, Array]] | None = None
    k_fwd: Callable[[list], float] = lambda a: 0  # noqa: E731
    k_bwd: Callable[[list], float] = lambda a: 0  # noqa: E731
    bound_fwd: Callable[..., Any] | None = None  # (a, out) -> one-sided bound of the output (array / tuple)
    bound_bwd: Callable[..., dict[int, Array]] | None = None  # (a, out, g) -> one-sided bounds per slot
    exact_bwd: bool = False  # the backward only moves or masks g (no rounding)
    sq: str = "abs"  # how (J∘J)ᵀV is computed: "abs" (entries 0 or ±1), "squares" (the |.|-backward on squared
    #                  operands: the op is a product of its operands), or backward_sq
    backward_sq: Callable[..., dict[int, Array]] | None = None  # (a, out, V) -> (J∘J)ᵀV per slot


RULES: dict[str, Rule] = {}


def rule(*names: str, **kw: Any) -> Callable:
    def deco(fwd: Callable) -> Callable:
        for n in names:
            RULES[n] = Rule(forward=fwd, **kw)
        return fwd
    return deco


def _abs(x: Any) -> Any:
    return np.abs(x) if isinstance(x, np.ndarray) else (abs(x) if isinstance(x, (int, float)) else x)


def _unbroadcast(g: Array, shape: tuple) -> Array:
    """Sum ``g`` over the dimensions broadcasting added or expanded to reach ``shape``."""
    g = np.asarray(g)
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(axis=i, keepdims=True)
    return g.reshape(shape)


def _reduced(out_shape: tuple, shape: tuple) -> int:
    """How many elements ``_unbroadcast`` sums into one."""
    return max(1, math.prod(out_shape) // max(1, math.prod(shape)))


def _shape(x: Any) -> tuple:
    return np.shape(x)


def _dims(d: Any, ndim: int) -> tuple[int, ...]:
    d = [d] if isinstance(d, int) else list(d)
    return tuple(sorted(i % ndim for i in d)) if ndim else ()


# -- elementwise arithmetic (broadcasting) ----------------------------------------------------------------
def _bwd_add(a: list, out: Array, g: Array, abs_: bool, sign: float = 1.0) -> dict[int, Array]:
    alpha = a[2] if len(a) > 2 else 1
    res = {}
    if isinstance(a[0], np.ndarray):
        res[0] = _unbroadcast(g, _shape(a[0]))
    if isinstance(a[1], np.ndarray):
        k = abs(alpha) if abs_ else sign * alpha
        res[len(res)] = _unbroadcast(g * k, _shape(a[1]))
    return res


def _k_bcast(a: list) -> float:
    out = np.broadcast_shapes(*[_shape(x) for x in a[:2]])
    return max(_reduced(out, _shape(x)) for x in a[:2])


@rule("aten.add.Tensor", "aten.add.Scalar", sq="squares", backward=lambda a, o, g, s: _bwd_add(a, o, g, s),
      k_fwd=lambda a: 1 + (len(a) > 2 and a[2] != 1), k_bwd=lambda a: _k_bcast(a) + 1)
def _add(a: list, abs_: bool) -> Array:
    x, y = _abs(a[0]) if abs_ else a[0], _abs(a[1]) if abs_ else a[1]
    alpha = a[2] if len(a) > 2 else 1
    out = x + (abs(alpha) if abs_ else alpha) * y
    return out.astype(np.result_type(a[0], a[1])) if isinstance(out, np.ndarray) and not abs_ else out


@rule("aten.sub.Tensor", "aten.sub.Scalar", sq="squares", backward=lambda a, o, g, s: _bwd_add(a, o, g, s, -1.0),
      k_fwd=lambda a: 1 + (len(a) > 2 and a[2] != 1), k_bwd=lambda a: _k_bcast(a) + 1)
def _sub(a: list, abs_: bool) -> Array:
    alpha = a[2] if len(a) > 2 else 1
    if abs_:
        return _abs(a[0]) + abs(alpha) * _abs(a[1])
    return np.asarray(a[0] - alpha * a[1])


def _bwd_mul(a: list, out: Array, g: Array, abs_: bool) -> dict[int, Array]:
    x, y = (_abs(a[0]), _abs(a[1])) if abs_ else (a[0], a[1])
    res = {}
    if isinstance(a[0], np.ndarray):
        res[0] = _unbroadcast(g * y, _shape(a[0]))
    if isinstance(a[1], np.ndarray):
        res[len(res)] = _unbroadcast(g * x, _shape(a[1]))
    return res


@rule("aten.mul.Tensor", "aten.mul.Scalar", sq="squares", backward=_bwd_mul, k_fwd=lambda a: 1,
      k_bwd=lambda a: _k_bcast(a) + 1)
def _mul(a: list, abs_: bool) -> Array:
    return np.asarray((_abs(a[0]) * _abs(a[1])) if abs_ else a[0] * a[1])


def _bwd_div(a: list, out: Array, g: Array, abs_: bool) -> dict[int, Array]:
    x, y = (_abs(a[0]), _abs(a[1])) if abs_ else (a[0], a[1])
    res = {}
    if isinstance(a[0], np.ndarray):
        res[0] = _unbroadcast(g / y, _shape(a[0]))
    if isinstance(a[1], np.ndarray):
        res[len(res)] = _unbroadcast((g * x / (y * y)) if abs_ else -g * x / (y * y), _shape(a[1]))
    return res


@rule("aten.div.Tensor", "aten.div.Scalar", sq="squares", backward=_bwd_div, k_fwd=lambda a: 1,
      k_bwd=lambda a: _k_bcast(a) + 3)
def _div(a: list, abs_: bool) -> Array:
    return np.asarray((_abs(a[0]) / _abs(a[1])) if abs_ else a[0] / a[1])


@rule("aten.neg.default", backward=lambda a, o, g, s: {0: g if s else -g}, exact_bwd=True)
def _neg(a: list, abs_: bool) -> Array:
    return _abs(a[0]) if abs_ else -a[0]


# -- piecewise: exact, PyTorch's convention of a zero gradient at the kink --------------------------------
@rule("aten.relu.default", backward=lambda a, o, g, s: {0: np.where(o > 0, g, 0.0)}, exact_bwd=True)
def _relu(a: list, abs_: bool) -> Array:
    return np.maximum(a[0], 0.0)


@rule("aten.threshold.default", backward=lambda a, o, g, s: {0: np.where(a[0] > a[1], g, 0.0)}, exact_bwd=True)
def _threshold(a: list, abs_: bool) -> Array:
    return np.where(a[0] > a[1], a[0], a[2])


def _clamp_mask(a: list) -> Array:
    x, lo, hi = a[0], (a[1] if len(a) > 1 else None), (a[2] if len(a) > 2 else None)
    m = np.ones(x.shape, dtype=bool)
    if lo is not None:
        m &= x >= lo
    if hi is not None:
        m &= x <= hi
    return m


def _clamp_rule(lo_default: float | None, hi_default: float | None) -> Rule:
    def bounds_of(a: list) -> tuple:
        lo = a[1] if len(a) > 1 else lo_default
        hi = a[2] if len(a) > 2 else hi_default
        return lo, hi

    def mask(a: list) -> Array:
        lo, hi = bounds_of(a)
        m = np.ones(a[0].shape, dtype=bool)
        if lo is not None:
            m &= a[0] >= lo
        if hi is not None:
            m &= a[0] <= hi
        return m

    return Rule(forward=lambda a, s: np.clip(a[0], *bounds_of(a)) if any(b is not None for b in bounds_of(a))
                else np.array(a[0], copy=True),
                backward=lambda a, o, g, s: {0: np.where(mask(a), g, 0.0)}, exact_bwd=True)


RULES["aten.clamp.default"] = _clamp_rule(None, None)
RULES["aten.hardtanh.default"] = _clamp_rule(-1.0, 1.0)


# -- views and copies: exact, logical values (NumPy has no strides to honour) ---------------------------
def _identity(a: list, abs_: bool) -> Array:
    return _abs(a[0]) if abs_ else np.array(a[0], copy=True)


for _name in ("aten.clone.default", "aten.alias.default", "aten.copy.default", "aten.contiguous.default",
              "aten.lift_fresh_copy.default"):
    RULES[_name] = Rule(forward=_identity, backward=lambda a, o, g, s: {0: g}, exact_bwd=True)


def _to_copy(a: list, abs_: bool) -> Array:
    """A copy; a dtype change to anything but float64, an integer or bool type is not float64 math."""
    dtype = a[1] if len(a) > 1 else None
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    if name is None or name == "float64":
        return _identity(a, abs_)
    if name in ("bool", "int8", "uint8", "int16", "int32", "int64"):
        return np.asarray(a[0]).astype(name)
    raise Unsupported(f"aten._to_copy.default to {name} (the oracle computes in float64)")


RULES["aten._to_copy.default"] = Rule(forward=_to_copy, backward=lambda a, o, g, s: {0: g}, exact_bwd=True)
RULES["aten._assert_tensor_metadata.default"] = Rule(forward=lambda a, s: None)  # a check, no value
RULES["aten.copy.default"] = Rule(forward=lambda a, s: np.broadcast_to(_abs(a[1]) if s else a[1],
                                                                        _shape(a[0])).astype(np.float64),
                                  backward=lambda a, o, g, s: {1: _unbroadcast(g, _shape(a[1]))},
                                  k_bwd=lambda a: _reduced(_shape(a[0]), _shape(a[1])))
RULES["aten.detach.default"] = Rule(forward=_identity, backward=lambda a, o, g, s: {})  # stops the gradient


def _view_bwd(a: list, o: Array, g: Array, s: bool) -> dict[int, Array]:
    return {0: g.reshape(_shape(a[0]))}


def _view(a: list, abs_: bool) -> Array:
    x = _abs(a[0]) if abs_ else a[0]
    return x.reshape([int(v) for v in a[1]])


for _name in ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default"):
    RULES[_name] = Rule(forward=_view, backward=_view_bwd, exact_bwd=True)


@rule("aten.squeeze.default", "aten.squeeze.dim", "aten.squeeze.dims", backward=_view_bwd, exact_bwd=True)
def _squeeze(a: list, abs_: bool) -> Array:
    x = _abs(a[0]) if abs_ else a[0]
    if len(a) == 1:
        return x.reshape([s for s in x.shape if s != 1])
    dims = _dims(a[1], x.ndim)
    return x.reshape([s for i, s in enumerate(x.shape) if not (i in dims and s == 1)])


@rule("aten.unsqueeze.default", backward=_view_bwd, exact_bwd=True)
def _unsqueeze(a: list, abs_: bool) -> Array:
    x = _abs(a[0]) if abs_ else a[0]
    return np.expand_dims(x, a[1] % (x.ndim + 1))


@rule("aten.permute.default", backward=lambda a, o, g, s: {0: np.transpose(g, np.argsort(_dims_list(a[1], g.ndim)))},
      exact_bwd=True)
def _permute(a: list, abs_: bool) -> Array:
    x = _abs(a[0]) if abs_ else a[0]
    return np.transpose(x, _dims_list(a[1], x.ndim))


def _dims_list(d: Any, ndim: int) -> list[int]:
    return [i % ndim for i in d]


@rule("aten.t.default", backward=lambda a, o, g, s: {0: g.T}, exact_bwd=True)
def _t(a: list, abs_: bool) -> Array:
    return (_abs(a[0]) if abs_ else a[0]).T


@rule("aten.transpose.int", backward=lambda a, o, g, s: {0: np.swapaxes(g, a[1], a[2])}, exact_bwd=True)
def _transpose(a: list, abs_: bool) -> Array:
    return np.swapaxes(_abs(a[0]) if abs_ else a[0], a[1], a[2])


@rule("aten.expand.default", backward=lambda a, o, g, s: {0: _unbroadcast(g, _shape(a[0]))},
      k_bwd=lambda a: math.prod(int(v) for v in a[1] if v != -1))
def _expand(a: list, abs_: bool) -> Array:
    x = _abs(a[0]) if abs_ else a[0]
    shape = list(a[1])
    lead = len(shape) - x.ndim
    shape = [x.shape[i - lead] if v == -1 else int(v) for i, v in enumerate(shape)]
    return np.broadcast_to(x, shape).copy()


@rule("aten.cat.default", exact_bwd=True,
      backward=lambda a, o, g, s: dict(enumerate(np.split(g, np.cumsum([t.shape[_cat_dim(a)] for t in _cat_in(a)])[:-1],
                                                          axis=_cat_dim(a)))))
def _cat(a: list, abs_: bool) -> Array:
    return np.concatenate([_abs(t) if abs_ else t for t in _cat_in(a)], axis=_cat_dim(a))


def _cat_in(a: list) -> list[Array]:
    return [t for t in a[0] if not (t.ndim == 1 and t.shape[0] == 0)]  # legacy cat skips 1-D empties


def _cat_dim(a: list) -> int:
    d = a[1] if len(a) > 1 else 0
    return d % _cat_in(a)[0].ndim


def _split_sizes(a: list) -> list[int]:
    x, dim = a[0], (a[2] if len(a) > 2 else 0) % a[0].ndim
    if isinstance(a[1], int):
        n = x.shape[dim]
        return [min(a[1], n - i) for i in range(0, n, a[1])] or [0]
    return list(a[1])


def _split(a: list, abs_: bool) -> tuple:
    x = _abs(a[0]) if abs_ else a[0]
    dim = (a[2] if len(a) > 2 else 0) % x.ndim
    return tuple(np.split(x, np.cumsum(_split_sizes(a))[:-1], axis=dim))


def _split_bwd(a: list, o: tuple, g: tuple, s: bool) -> dict[int, Array]:
    parts = [gi if gi is not None else np.zeros(oi.shape) for gi, oi in zip(g, o)]
    return {0: np.concatenate(parts, axis=(a[2] if len(a) > 2 else 0) % a[0].ndim)}


for _name in ("aten.split.Tensor", "aten.split_with_sizes.default"):
    RULES[_name] = Rule(forward=_split, backward=_split_bwd, exact_bwd=True)


def _slice_index(a: list) -> tuple:
    x = a[0]
    dim = (a[1] if len(a) > 1 else 0) % x.ndim
    n = x.shape[dim]
    start = a[2] if len(a) > 2 and a[2] is not None else 0
    end = a[3] if len(a) > 3 and a[3] is not None else n
    step = a[4] if len(a) > 4 else 1
    start, end = (start + n if start < 0 else start), (end + n if end < 0 else end)
    return (slice(None),) * dim + (slice(max(0, min(start, n)), max(0, min(end, n)), step),)


def _scatter_into(a: list, g: Array, index: tuple) -> dict[int, Array]:
    gx = np.zeros(a[0].shape)
    gx[index] = g
    return {0: gx}


@rule("aten.slice.Tensor", backward=lambda a, o, g, s: _scatter_into(a, g, _slice_index(a)), exact_bwd=True)
def _slice(a: list, abs_: bool) -> Array:
    return (_abs(a[0]) if abs_ else a[0])[_slice_index(a)].copy()


@rule("aten.select.int", backward=lambda a, o, g, s: _scatter_into(a, g, (slice(None),) * (a[1] % a[0].ndim) + (a[2],)),
      exact_bwd=True)
def _select(a: list, abs_: bool) -> Array:
    x = _abs(a[0]) if abs_ else a[0]
    return np.array(x[(slice(None),) * (a[1] % x.ndim) + (a[2],)])


# -- as_strided: positions in the input's own storage (its strides are recorded in the graph) -------------
def _storage_map(a: list) -> tuple[Array, Array]:
    """(storage offset of each input element, storage offset of each output element)."""
    layout = a[-1]  # appended by the interpreter: (size, stride, storage_offset) of the input
    size, stride, off = layout
    src = off + sum(np.arange(n).reshape([-1 if i == d else 1 for i in range(len(size))]) * st
                    for d, (n, st) in enumerate(zip(size, stride))) if size else np.array(off)
    osize, ostride = list(a[1]), list(a[2])
    ooff = a[3] if len(a) > 4 and a[3] is not None else off
    dst = ooff + sum(np.arange(n).reshape([-1 if i == d else 1 for i in range(len(osize))]) * st
                     for d, (n, st) in enumerate(zip(osize, ostride))) if osize else np.array(ooff)
    src = np.broadcast_to(src, size) if size else src
    dst = np.broadcast_to(dst, osize) if osize else dst
    return np.asarray(src), np.asarray(dst)


def _as_strided(a: list, abs_: bool) -> Array:
    x = _abs(a[0]) if abs_ else a[0]
    src, dst = _storage_map(a)
    storage = np.full(int(max(src.max(initial=0), dst.max(initial=0))) + 1, np.nan)
    storage[src.reshape(-1)] = x.reshape(-1)
    out = storage[dst]
    if np.isnan(out).any() and not np.isnan(x).any():
        raise Unsupported("aten.as_strided reading outside its input's own elements")
    return out


def _as_strided_bwd(a: list, o: Array, g: Array, s: bool) -> dict[int, Array]:
    src, dst = _storage_map(a)
    storage = np.zeros(int(max(src.max(initial=0), dst.max(initial=0))) + 1)
    np.add.at(storage, dst.reshape(-1), g.reshape(-1))
    return {0: storage[src]}


RULES["aten.as_strided.default"] = Rule(forward=_as_strided, backward=_as_strided_bwd, exact_bwd=True)


# -- reductions ---------------------------------------------------------------------------------------------
def _red_dims(a: list) -> tuple[int, ...]:
    x = a[0]
    if len(a) < 2 or a[1] is None or (not isinstance(a[1], int) and len(a[1]) == 0):
        return tuple(range(x.ndim))
    return _dims(a[1], x.ndim)


def _keep(a: list) -> bool:
    return bool(a[2]) if len(a) > 2 else False


def _red_count(a: list) -> int:
    return math.prod(a[0].shape[i] for i in _red_dims(a)) if a[0].ndim else 1


def _red_bwd(a: list, g: Array, scale: float) -> dict[int, Array]:
    dims = _red_dims(a)
    if not _keep(a):
        g = np.expand_dims(g, dims) if dims else g
    return {0: np.broadcast_to(g * scale, a[0].shape).copy()}


@rule("aten.sum.dim_IntList", "aten.sum.default", backward=lambda a, o, g, s: _red_bwd(a, g, 1.0),
      k_fwd=_red_count, exact_bwd=True)
def _sum(a: list, abs_: bool) -> Array:
    x = _abs(a[0]) if abs_ else a[0]
    return np.asarray(x.sum(axis=_red_dims(a), keepdims=_keep(a)))


@rule("aten.mean.dim", "aten.mean.default", backward=lambda a, o, g, s: _red_bwd(a, g, 1.0 / _red_count(a)),
      backward_sq=lambda a, o, v: _red_bwd(a, v, 1.0 / _red_count(a) ** 2),
      k_fwd=lambda a: _red_count(a) + 1, k_bwd=lambda a: 1)
def _mean(a: list, abs_: bool) -> Array:
    x = _abs(a[0]) if abs_ else a[0]
    return np.asarray(x.mean(axis=_red_dims(a), keepdims=_keep(a)))


# -- matrix products ----------------------------------------------------------------------------------------
@rule("aten.mm.default", sq="squares", k_fwd=lambda a: a[0].shape[1],
      k_bwd=lambda a: max(a[1].shape[1], a[0].shape[0]),
      backward=lambda a, o, g, s: {0: g @ (_abs(a[1]) if s else a[1]).T, 1: (_abs(a[0]) if s else a[0]).T @ g})
def _mm(a: list, abs_: bool) -> Array:
    return (_abs(a[0]) @ _abs(a[1])) if abs_ else a[0] @ a[1]


def _addmm_bwd(a: list, o: Array, g: Array, s: bool) -> dict[int, Array]:
    beta, alpha = a[3] if len(a) > 3 else 1, a[4] if len(a) > 4 else 1
    m1, m2 = (_abs(a[1]), _abs(a[2])) if s else (a[1], a[2])
    beta, alpha = (abs(beta), abs(alpha)) if s else (beta, alpha)
    return {0: _unbroadcast(g * beta, _shape(a[0])), 1: alpha * (g @ m2.T), 2: alpha * (m1.T @ g)}


@rule("aten.addmm.default", backward=_addmm_bwd, sq="squares", k_fwd=lambda a: a[1].shape[1] + 3,
      k_bwd=lambda a: max(a[2].shape[1], a[1].shape[0]) + 1)
def _addmm(a: list, abs_: bool) -> Array:
    beta, alpha = a[3] if len(a) > 3 else 1, a[4] if len(a) > 4 else 1
    if abs_:
        return abs(beta) * np.abs(a[0]) + abs(alpha) * (np.abs(a[1]) @ np.abs(a[2]))
    return beta * a[0] + alpha * (a[1] @ a[2])


# -- convolution (2-D, groups 1, no dilation, same stride and padding along both axes) --------------------
def _conv_args(a: list) -> tuple[int, int]:
    x = a[0]
    stride, padding, dilation, transposed, _, groups = a[3], a[4], a[5], a[6], a[7], a[8]
    if x.ndim != 4 or transposed or groups != 1 or any(d != 1 for d in dilation) \
            or len(set(stride)) != 1 or len(set(padding)) != 1:
        raise Unsupported(f"aten.convolution.default with ndim={x.ndim}, transposed={transposed}, groups={groups}, "
                          f"dilation={list(dilation)}, stride={list(stride)}, padding={list(padding)}")
    return int(stride[0]), int(padding[0])


def _conv(a: list, abs_: bool) -> Array:
    stride, padding = _conv_args(a)
    x, w, b = (_abs(a[0]), _abs(a[1]), _abs(a[2])) if abs_ else (a[0], a[1], a[2])
    y, _ = ops.conv2d_forward(x, w, stride, padding)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def _conv_bwd(a: list, o: Array, g: Array, s: bool) -> dict[int, Array]:
    stride, padding = _conv_args(a)
    x, w = (_abs(a[0]), _abs(a[1])) if s else (a[0], a[1])
    gx, gw = ops.conv2d_backward(g, (x, w, stride, padding))
    out = {0: gx, 1: gw}
    if a[2] is not None:
        out[2] = g.sum(axis=(0, 2, 3))
    return out


RULES["aten.convolution.default"] = Rule(
    forward=_conv, backward=_conv_bwd, sq="squares",
    k_fwd=lambda a: a[1].shape[1] * a[1].shape[2] * a[1].shape[3] + (a[2] is not None),
    k_bwd=lambda a: max(a[1].shape[0] * a[1].shape[2] * a[1].shape[3], a[0].shape[0] * _conv_out(a)))


def _conv_out(a: list) -> int:
    """Ho·Wo: the length of the weight gradient's sum per sample."""
    stride, padding = _conv_args(a)
    (h, w), (kh, kw) = a[0].shape[2:], a[1].shape[2:]
    return ((h + 2 * padding - kh) // stride + 1) * ((w + 2 * padding - kw) // stride + 1)


# -- pooling --------------------------------------------------------------------------------------------------
def _pool_args(a: list, name: str) -> tuple[int, int, int, int, int, int]:
    k = list(a[1]) if not isinstance(a[1], int) else [a[1]]
    st = list(a[2]) if len(a) > 2 and a[2] else k
    st = st if not isinstance(st, int) else [st]
    pd = list(a[3]) if len(a) > 3 and not isinstance(a[3], int) else [a[3] if len(a) > 3 else 0]
    kh, kw = (k * 2)[:2]
    sh, sw = (st * 2)[:2]
    ph, pw = (pd * 2)[:2]
    return kh, kw, sh, sw, ph, pw


def _windows(x: Array, kh: int, kw: int, sh: int, sw: int) -> Array:
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def _avg_check(a: list) -> tuple:
    ceil = a[4] if len(a) > 4 else False
    divisor = a[6] if len(a) > 6 else None
    if a[0].ndim != 4 or ceil or divisor is not None:
        raise Unsupported(f"aten.avg_pool2d.default with ceil_mode={ceil}, divisor_override={divisor}")
    kh, kw, sh, sw, ph, pw = _pool_args(a, "avg_pool2d")
    count_pad = a[5] if len(a) > 5 else True
    if (ph or pw) and not count_pad:
        raise Unsupported("aten.avg_pool2d.default with padding and count_include_pad=False")
    return kh, kw, sh, sw, ph, pw


def _avg_pool(a: list, abs_: bool) -> Array:
    kh, kw, sh, sw, ph, pw = _avg_check(a)
    x = _abs(a[0]) if abs_ else a[0]
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    return _windows(x, kh, kw, sh, sw).sum(axis=(4, 5)) / (kh * kw)


def _avg_pool_bwd(a: list, o: Array, g: Array, s: bool) -> dict[int, Array]:
    kh, kw, sh, sw, ph, pw = _avg_check(a)
    n, c, h, w = a[0].shape
    gx = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    ho, wo = g.shape[2:]
    part = g / (kh * kw)
    for i in range(kh):
        for j in range(kw):
            gx[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw] += part
    return {0: gx[:, :, ph:ph + h, pw:pw + w]}


RULES["aten.avg_pool2d.default"] = Rule(forward=_avg_pool, backward=_avg_pool_bwd,
                                        backward_sq=lambda a, o, v: {0: _avg_pool_bwd(a, o, v, True)[0]
                                                                     / (_pool_args(a, "")[0] * _pool_args(a, "")[1])},
                                        k_fwd=lambda a: _pool_args(a, "")[0] * _pool_args(a, "")[1] + 1,
                                        k_bwd=lambda a: _pool_args(a, "")[0] * _pool_args(a, "")[1] + 1)


def _max_check(a: list) -> tuple:
    dil = list(a[4]) if len(a) > 4 else [1]
    ceil = a[5] if len(a) > 5 else False
    if a[0].ndim != 4 or ceil or any(d != 1 for d in dil):
        raise Unsupported(f"aten.max_pool2d_with_indices.default with dilation={dil}, ceil_mode={ceil}")
    return _pool_args(a, "max_pool2d")


def _max_pool(a: list, abs_: bool) -> tuple[Array, Array]:
    kh, kw, sh, sw, ph, pw = _max_check(a)
    x = a[0]
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    win = _windows(xp, kh, kw, sh, sw)
    flat = win.reshape(*win.shape[:4], kh * kw)
    arg = flat.argmax(axis=-1)  # the first maximum in row-major window order, as PyTorch's CPU kernel
    val = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    ho, wo = val.shape[2:]
    rows = np.arange(ho)[:, None] * sh + arg // kw - ph
    cols = np.arange(wo)[None, :] * sw + arg % kw - pw
    return (np.abs(val) if abs_ else val), (rows * w + cols).astype(np.int64)


def _max_pool_bwd(a: list, o: tuple, g: tuple, s: bool) -> dict[int, Array]:
    n, c, h, w = a[0].shape
    gx = np.zeros((n, c, h * w))
    gy = g[0] if g[0] is not None else np.zeros(o[0].shape)
    idx = o[1].reshape(n, c, -1)
    for i in range(n):
        for j in range(c):
            np.add.at(gx[i, j], idx[i, j], gy[i, j].reshape(-1))
    return {0: gx.reshape(n, c, h, w)}


RULES["aten.max_pool2d_with_indices.default"] = Rule(
    forward=_max_pool, backward=_max_pool_bwd, k_bwd=lambda a: _pool_args(a, "")[0] * _pool_args(a, "")[1])


def _adaptive_ranges(n: int, m: int) -> list[tuple[int, int]]:
    return [((i * n) // m, -((-(i + 1) * n) // m)) for i in range(m)]


def _adaptive(a: list, abs_: bool) -> Array:
    x = _abs(a[0]) if abs_ else a[0]
    oh, ow = (list(a[1]) * 2)[:2]
    out = np.zeros(x.shape[:-2] + (oh, ow))
    for i, (h0, h1) in enumerate(_adaptive_ranges(x.shape[-2], oh)):
        for j, (w0, w1) in enumerate(_adaptive_ranges(x.shape[-1], ow)):
            out[..., i, j] = x[..., h0:h1, w0:w1].mean(axis=(-2, -1))
    return out


def _adaptive_bwd(a: list, o: Array, g: Array, s: bool) -> dict[int, Array]:
    x = a[0]
    oh, ow = (list(a[1]) * 2)[:2]
    gx = np.zeros(x.shape)
    for i, (h0, h1) in enumerate(_adaptive_ranges(x.shape[-2], oh)):
        for j, (w0, w1) in enumerate(_adaptive_ranges(x.shape[-1], ow)):
            gx[..., h0:h1, w0:w1] += (g[..., i, j] / ((h1 - h0) * (w1 - w0)))[..., None, None]
    return {0: gx}


def _adaptive_k(a: list) -> int:
    x = a[0]
    oh, ow = (list(a[1]) * 2)[:2]
    return -(-x.shape[-2] // oh) * -(-x.shape[-1] // ow) + 2


for _name in ("aten._adaptive_avg_pool2d.default", "aten.adaptive_avg_pool2d.default"):
    RULES[_name] = Rule(forward=_adaptive, backward=_adaptive_bwd, k_fwd=_adaptive_k, k_bwd=lambda a: 2,
                        backward_sq=lambda a, o, v: {0: _adaptive_bwd(a, o, v, True)[0] / _adaptive_min(a)})


def _adaptive_min(a: list) -> int:
    """The smallest window: Σ v/size² <= (Σ v/size) / min size."""
    oh, ow = (list(a[1]) * 2)[:2]
    return min(h1 - h0 for h0, h1 in _adaptive_ranges(a[0].shape[-2], oh)) * \
        min(w1 - w0 for w0, w1 in _adaptive_ranges(a[0].shape[-1], ow))


# -- batch normalization ------------------------------------------------------------------------------------
def _bn_args(name: str, a: list) -> tuple:
    """(x, weight, bias, running_mean, running_var, training, momentum, eps) of any batch-norm overload."""
    if name == "aten._native_batch_norm_legit_no_training.default":
        return a[0], a[1], a[2], a[3], a[4], False, a[5], a[6]
    if name == "aten._native_batch_norm_legit.no_stats":
        return a[0], a[1], a[2], None, None, a[3], a[4], a[5]
    return a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]


def _bn_rule(name: str) -> Rule:
    def _stats(x: Array) -> tuple[Array, Array, tuple, tuple]:
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x.mean(axis=axes), ((x - x.mean(axis=axes).reshape(shape)) ** 2).mean(axis=axes), axes, shape

    def forward(a: list, abs_: bool) -> tuple:
        x, w, b, rm, rv, train, mom, eps = _bn_args(name, a)
        c = x.shape[1]
        w1 = np.ones(c) if w is None else w
        b0 = np.zeros(c) if b is None else b
        if train:
            mean, var, axes, shape = _stats(x)
            m = x.size // c
            invstd = 1.0 / np.sqrt(var + eps)
            y = (x - mean.reshape(shape)) * invstd.reshape(shape) * w1.reshape(shape) + b0.reshape(shape)
            out = [y, mean, invstd]
            if rm is not None:
                out += [(1 - mom) * rm + mom * mean, (1 - mom) * rv + mom * var * (m / max(m - 1, 1))]
            return tuple(out)
        y, _, _, _ = ops.batch_norm_forward(x, w1, b0, rm, rv, False, mom, eps)
        return (y, np.zeros(0), np.zeros(0))

    def _normalized(a: list) -> tuple:
        """(x, weight, bias, training, channels, weight or ones, axes, shape, invstd, x̂) of one call."""
        x, w, b, rm, rv, train, mom, eps = _bn_args(name, a)
        c = x.shape[1]
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean, var = (_stats(x)[:2]) if train else (rm, rv)
        invstd = 1.0 / np.sqrt(var + eps)
        xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
        return x, w, b, train, c, np.ones(c) if w is None else w, axes, shape, invstd, xhat

    def backward(a: list, o: tuple, g: tuple, abs_: bool) -> dict[int, Array]:
        x, w, b, train, c, w1, axes, shape, invstd, xhat = _normalized(a)
        gy = g[0] if g[0] is not None else np.zeros(x.shape)
        if abs_:  # |J|ᵀ: the exact Jacobian's magnitudes (x̂'s own rounding is in bound_bwd)
            xhat = np.abs(xhat)
        gb = gy.sum(axis=axes)
        gw = (gy * xhat).sum(axis=axes)
        scale = ((np.abs(w1) if abs_ else w1) * invstd).reshape(shape)
        if train:
            m = gy.size // c
            if abs_:
                gx = scale * (gy + (gb / m).reshape(shape) + xhat * (gw / m).reshape(shape))
            else:
                gx = scale * (gy - (gb / m).reshape(shape) - xhat * (gw / m).reshape(shape))
        else:
            gx = gy * scale
        out = {0: gx}
        slot = 1
        if w is not None:
            out[slot] = gw
            slot += 1
        if b is not None:
            out[slot] = gb
        return out

    def bound_fwd(a: list, o: tuple) -> tuple:
        """One-sided: half of :func:`bounds.batch_norm`'s two-sided bound (its derivation is there)."""
        from densenet_debug.numpy_oracle import bounds

        x, w, b, rm, rv, train, mom, eps = _bn_args(name, a)
        c = x.shape[1]
        w1 = np.ones(c) if w is None else w
        b0 = np.zeros(c) if b is None else b
        rm0 = np.zeros(c) if rm is None else rm
        rv0 = np.ones(c) if rv is None else rv
        got = bounds.batch_norm(x, w1, b0, rm0, rv0, np.zeros(x.shape), bool(train))
        out = [got["output"][1] / 2]
        if train:
            mean, var, axes, shape = _stats(x)
            m = x.size // c
            out += [np.zeros(c), np.zeros(c)]  # saved mean / invstd: internal, never compared
            if rm is not None:
                # var = mean d², d = x - μ with δd = ε|d| + γ_M·mean|x| (bounds.batch_norm's derivation)
                d = x - mean.reshape(shape)
                dd = EPS * np.abs(d) + gamma(m) * np.abs(x).mean(axis=axes).reshape(shape)
                d_var = gamma(m + 2) * var + 2 * (np.abs(d) * dd).mean(axis=axes)
                unbias = m / max(m - 1, 1)
                out += [_running_bound(rm, mean, mom, gamma(m) * np.abs(x).mean(axis=axes)),
                        _running_bound(rv, var * unbias, mom, unbias * d_var + 2 * EPS * var * unbias)]
        else:
            out += [np.zeros(0), np.zeros(0)]
        return tuple(out)

    def bound_bwd(a: list, o: tuple, g: tuple) -> dict[int, Array]:
        from densenet_debug.numpy_oracle import bounds

        x, w, b, rm, rv, train, mom, eps = _bn_args(name, a)
        c = x.shape[1]
        gy = g[0] if g[0] is not None else np.zeros(x.shape)
        w1 = np.ones(c) if w is None else w
        b0 = np.zeros(c) if b is None else b
        rm0 = np.zeros(c) if rm is None else rm
        rv0 = np.ones(c) if rv is None else rv
        got = bounds.batch_norm(x, w1, b0, rm0, rv0, gy, bool(train))
        out = {0: got["grad_input"][1] / 2}
        slot = 1
        if w is not None:
            out[slot] = got["grad_weight"][1] / 2
            slot += 1
        if b is not None:
            out[slot] = got["grad_bias"][1] / 2
        return out

    def backward_sq(a: list, o: tuple, v: tuple) -> dict[int, Array]:
        """(J∘J)ᵀV exactly. Train: J_ij = s·(δ_ij - (1 + x̂_i·x̂_j)/m) within a channel, so
        Σ_i J_ij²·V_i = s²·(V_j·(1 - 2(1 + x̂_j²)/m) + (ΣV + 2x̂_j·ΣVx̂ + x̂_j²·ΣVx̂²)/m²)."""
        x, w, b, train, c, w1, axes, shape, invstd, xh = _normalized(a)
        vy = v[0] if v[0] is not None else np.zeros(x.shape)
        x2 = xh ** 2
        s2 = ((w1 * invstd) ** 2).reshape(shape)
        if train:
            m = x.size // c
            sv, svx, svx2 = (vy.sum(axis=axes).reshape(shape), (vy * xh).sum(axis=axes).reshape(shape),
                             (vy * x2).sum(axis=axes).reshape(shape))
            vx = s2 * np.maximum(vy * (1 - 2 * (1 + x2) / m) + (sv + 2 * xh * svx + x2 * svx2) / m ** 2, 0.0)
        else:
            vx = s2 * vy
        out = {0: vx}
        slot = 1
        if w is not None:
            out[slot] = (x2 * vy).sum(axis=axes)
            slot += 1
        if b is not None:
            out[slot] = vy.sum(axis=axes)
        return out

    return Rule(forward=forward, backward=backward, bound_fwd=bound_fwd, bound_bwd=bound_bwd, backward_sq=backward_sq)


def _running_bound(old: Array, new: Array, mom: float, d_new: Array) -> Array:
    """(1 - m)·old + m·new: three roundings of its two terms, plus m times the error of ``new``."""
    return 3 * EPS * (np.abs((1 - mom) * old) + np.abs(mom * new)) + mom * d_new


for _name in ("aten._native_batch_norm_legit_functional.default", "aten.native_batch_norm.default",
              "aten._native_batch_norm_legit.default", "aten._native_batch_norm_legit_no_training.default",
              "aten._native_batch_norm_legit.no_stats"):
    RULES[_name] = _bn_rule(_name)


# -- log-softmax and the loss --------------------------------------------------------------------------------
def _log_softmax(a: list, abs_: bool) -> Array:
    x, dim = a[0], a[1] % a[0].ndim
    z = x - x.max(axis=dim, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=dim, keepdims=True))


def _log_softmax_bound(a: list, o: Array) -> Array:
    """z - max - lse: ε(|x| + |max|) for the shift, lse = log Σ exp(z) errs by (γ_C + 2ε)(1 + |lse|)
    (exp's relative ε per term and the sum's γ_C become an absolute error through log; log's own ε·|lse|),
    and the final subtraction ε·|out|."""
    x, dim = a[0], a[1] % a[0].ndim
    c = x.shape[dim]
    top = np.abs(x).max(axis=dim, keepdims=True)
    z = x - x.max(axis=dim, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=dim, keepdims=True))
    return EPS * (np.abs(x) + top) + (gamma(c) + 2 * EPS) * (1 + np.abs(lse)) + EPS * np.abs(o)


def _log_softmax_bwd(a: list, o: Array, g: Array, s: bool) -> dict[int, Array]:
    dim = a[1] % a[0].ndim
    p = np.exp(o)
    if s:
        return {0: g + p * g.sum(axis=dim, keepdims=True)}
    return {0: g - p * g.sum(axis=dim, keepdims=True)}


def _log_softmax_bwd_bound(a: list, o: Array, g: Array) -> dict[int, Array]:
    """g - exp(out)·Σg: γ_{C+3} of its terms, plus exp's sensitivity to each side's own rounded ``out``
    (p·δout·Σ|g|, δout the forward bound above)."""
    dim = a[1] % a[0].ndim
    p, sg = np.exp(o), np.abs(g).sum(axis=dim, keepdims=True)
    return {0: gamma(a[0].shape[dim] + 3) * (np.abs(g) + p * sg) + _log_softmax_bound(a, o) * p * sg}


def _log_softmax_sq(a: list, o: Array, v: Array) -> dict[int, Array]:
    """J_ij = δ_ij - p_i: (J∘J)ᵀV <= 2(V + p²·ΣV)."""
    dim = a[1] % a[0].ndim
    return {0: 2 * (v + np.exp(o) ** 2 * v.sum(axis=dim, keepdims=True))}


RULES["aten._log_softmax.default"] = Rule(forward=_log_softmax, backward=_log_softmax_bwd, bound_fwd=_log_softmax_bound,
                                          bound_bwd=_log_softmax_bwd_bound, backward_sq=_log_softmax_sq)


def _nll_check(a: list) -> tuple[int, int]:
    weight, reduction, ignore = a[2], a[3], a[4]
    if weight is not None or a[0].ndim != 2:
        raise Unsupported("aten.nll_loss_forward.default with class weights or inputs other than (batch, classes)")
    return reduction, ignore


def _nll(a: list, abs_: bool) -> tuple[Array, Array]:
    reduction, ignore = _nll_check(a)
    x, t = a[0], a[1].astype(np.int64)
    keep = t != ignore
    picked = -x[np.arange(len(t)), np.where(keep, t, 0)] * keep
    picked = np.abs(picked) if abs_ else picked
    total = float(keep.sum())
    if reduction == 0:
        return picked, np.array(total)
    loss = picked.sum() / total if reduction == 1 else picked.sum()
    return np.array(loss), np.array(total)


def _nll_bwd(a: list, o: tuple, g: tuple, s: bool) -> dict[int, Array]:
    reduction, ignore = _nll_check(a)
    x, t = a[0], a[1].astype(np.int64)
    keep = t != ignore
    gl = g[0]
    per = gl * keep if reduction == 0 else np.full(len(t), float(gl)) * keep
    if reduction == 1:
        per = per / float(keep.sum())
    gx = np.zeros(x.shape)
    gx[np.arange(len(t)), np.where(keep, t, 0)] = per if s else -per
    return {0: gx}


def _nll_sq(a: list, o: tuple, v: tuple) -> dict[int, Array]:
    total = float((a[1] != a[4]).sum())
    scale = 1.0 / total if a[3] == 1 else 1.0
    return {0: _nll_bwd(a, o, v, True)[0] * scale}


RULES["aten.nll_loss_forward.default"] = Rule(forward=_nll, backward=_nll_bwd, backward_sq=_nll_sq,
                                              k_fwd=lambda a: a[0].shape[0] + 1, k_bwd=lambda a: 2)


# -- constants: no inputs to differentiate -------------------------------------------------------------------
def _empty(a: list, abs_: bool) -> Array:
    return np.zeros([int(s) for s in a[0]])


RULES["aten.empty.memory_format"] = Rule(forward=_empty)
RULES["aten.zeros.default"] = Rule(forward=_empty)
RULES["aten.full.default"] = Rule(forward=lambda a, s: np.full([int(v) for v in a[0]], a[1], dtype=np.float64))
RULES["aten.scalar_tensor.default"] = Rule(forward=lambda a, s: np.array(a[0], dtype=np.float64))
RULES["aten.clamp_max.default"] = Rule(forward=lambda a, s: np.minimum(a[0], a[1]),
                                       backward=lambda a, o, g, s: {0: np.where(a[0] <= a[1], g, 0.0)}, exact_bwd=True)
RULES["aten.clamp_min.default"] = Rule(forward=lambda a, s: np.maximum(a[0], a[1]),
                                       backward=lambda a, o, g, s: {0: np.where(a[0] >= a[1], g, 0.0)}, exact_bwd=True)


# -- selection, comparisons, |x|, leaky ReLU: exact or one rounding -------------------------------------------
def _cmp(fn: Callable[[Any, Any], Array]) -> Rule:
    return Rule(forward=lambda a, s: np.asarray(fn(a[0], a[1])))  # a boolean mask: no gradient


for _name, _fn in (("gt", np.greater), ("ge", np.greater_equal), ("lt", np.less), ("le", np.less_equal),
                   ("eq", np.equal), ("ne", np.not_equal)):
    RULES[f"aten.{_name}.Scalar"] = RULES[f"aten.{_name}.Tensor"] = _cmp(_fn)


def _where_bwd(a: list, o: Array, g: Array, s: bool) -> dict[int, Array]:
    """Slots count the condition (a tensor argument) too: the two values are slots 1 and 2."""
    return {i: _unbroadcast(np.where(a[0] == keep, g, 0.0), _shape(a[i])) for i, keep in ((1, True), (2, False))}


def _where(a: list, s: bool) -> Array:
    return np.where(a[0], _abs(a[1]) if s else a[1], _abs(a[2]) if s else a[2])


RULES["aten.where.self"] = Rule(forward=_where,
                                backward=lambda a, o, g, s: _where_bwd(a, o, g, s),
                                k_bwd=lambda a: max(_reduced(np.broadcast_shapes(*[_shape(x) for x in a]), _shape(x))
                                                    for x in a[1:]) - 1)
RULES["aten.abs.default"] = Rule(forward=lambda a, s: np.abs(a[0]),
                                 backward=lambda a, o, g, s: {0: np.abs(g) if s else g * np.sign(a[0])},
                                 exact_bwd=True)


def _leaky_slope(a: list) -> float:
    return a[1] if len(a) > 1 else 0.01


RULES["aten.leaky_relu.default"] = Rule(
    forward=lambda a, s: np.where(a[0] > 0, a[0], a[0] * _leaky_slope(a)) if not s else np.abs(a[0]),
    backward=lambda a, o, g, s: {0: np.where(a[0] > 0, g, g * (abs(_leaky_slope(a)) if s else _leaky_slope(a)))},
    backward_sq=lambda a, o, v: {0: np.where(a[0] > 0, v, v * _leaky_slope(a) ** 2)},
    k_fwd=lambda a: 1, k_bwd=lambda a: 1)
for _name, _value in (("zeros_like", 0.0), ("ones_like", 1.0)):
    RULES[f"aten.{_name}.default"] = Rule(forward=lambda a, s, v=_value: np.full(np.shape(a[0]), v))
RULES["aten.full_like.default"] = Rule(forward=lambda a, s: np.full(np.shape(a[0]), a[1], dtype=np.float64))
