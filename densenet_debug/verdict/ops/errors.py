"""Per-op error models: an elementwise bound on |side op - fp64 op| when both run on the same (oracle) inputs.

The side's op runs on the oracle's inputs rounded to the side's dtype; the oracle's output is one float64
evaluation of the same op on the unrounded inputs. Every model below is first order in the roundoffs of a
:class:`~densenet_debug.verdict.tolerance.Precision` (``u_op`` operand rounding, TF32/autocast included for
conv and matmul; ``u_acc`` accumulation; ``u_cmp`` elementwise intermediates; ``u_out`` the stored result;
``eta`` gradual underflow; ``lam`` the Hoeffding confidence of a sum of K rounding errors, see
:mod:`densenet_debug.verdict.tolerance`). The judge evaluates each bound at the side's precision plus the
teacher's own float64 precision (``B(p + q) = B(p) + B(q)``: both are within their bounds of the exact op).
Magnitudes are computed once per op, in float64, from the oracle's inputs, so both sides share them.

* **Multilinear ops** (``convolution``, ``convolution_backward``, ``mm``/``addmm``/``bmm``, average pools and their
  backward, ``sum``/``mean``): ``sum |terms|`` is the same op evaluated on ``|operands|`` (no term cancels), and
  a sum of K products errs by at most ``(operands u_op + lam u_acc sqrt(K) + u_out) sum|terms|``. K per output:
  conv forward ``Cin/g * prod(k)`` (+1 with a bias); conv grad_input ``Cout/g * prod(k)``; grad_weight and
  grad_bias ``N * prod(output spatial)``; mm ``K`` of the product (+1 for addmm's bias); pools the window
  (backward: the windows that can cover one input element, ``prod(ceil(k/s))``); reductions the reduced count.
* **Exact ops** (views, ``cat``, ``slice``, ``split``, ``copy_``, ``clone``, ``relu``, ``threshold_backward``, max-pool
  values, ``where``, ``clamp`` ...) only select or move elements, and rounding commutes with selection
  (``round(max(x)) == max(round(x))``, ``relu(round(x)) == round(relu(x))``): the side must equal the oracle
  rounded to the side's dtype **exactly**, except at kinks. When the side's inputs and output differ in dtype
  (an autocast cast), double rounding allows ``(u_in + u_out)|o|``.
* **Elementwise arithmetic**: ``add``/``sub`` ``u_op (|a| + |alpha b|) + u_out |o|``; ``mul``/``div``
  ``2 u_op |o| + u_out |o|`` (a Python scalar operand is rounded to the op's dtype too). These are worst-case
  (not probabilistic) bounds that a correct kernel can come close to, so the second-order terms are kept
  (a factor ``1 + 2(u_op + u_out)``) and each operand and the result may underflow (``eta`` apiece).
* **Batch norm** (``native_batch_norm`` and its backward), ported from the module-level model of
  :mod:`densenet_debug.verdict.tolerance`, with ``r = lam u_acc sqrt(R)`` (R = N*H*W per channel) and c = u_cmp.
  Forward (training): ``e_mu = (u_op + r) mean|x| + c|mu|``, ``e_var = (2u_op + r + 3c) E[x^2] + 2|mu| e_mu``,
  ``rel = e_var / (2(var + eps)) + 2c``, ``e_y = |gamma|(u_op|x| + e_mu) / sigma + |gamma xhat|(rel + 4c + u_op)
  + (u_op + c)|beta| + u_out|y|``; ``save_mean`` ``e_mu + u_out|mu|``; ``save_invstd`` ``(rel + u_out) / sigma``.
  Eval: mean and variance are operands (``u_op``). Backward, with mean and invstd given as (rounded) operands:
  ``e_xhat = (u_op(|x| + |mu|) + c|x - mu|)/sigma + (u_op + c)|xhat|``; ``e_sg = (u_op + r) sum|g|``;
  ``e_sgx = (u_op + r + c) sum|g xhat| + sum |g| e_xhat``; ``grad_bias = s_g`` and ``grad_weight = s_gx`` add
  ``u_out``; ``t = g - s_g/R - xhat s_gx/R`` errs by ``(u_op + 2c)|g| + e_sg/R + |xhat| e_sgx/R + e_xhat|s_gx|/R
  + 2c(|s_g| + |xhat s_gx|)/R``, and ``grad_input = gamma t / sigma`` by ``|gamma|/sigma (e_t + (2u_op + 2c)|t|)
  + u_out|gx|``. Eval backward: ``gx = g gamma invstd``, four roundings: ``(3u_op + 3c + u_out)|gx|``.
* **log_softmax** ``y = x - m - log S``, ``S = sum exp(x - m)``: operand rounding moves y_i by at most
  ``u_op(|x_i| + max|x|)`` (``dy_i/dx_j = delta_ij - p_j``); ``exp`` errs relatively by ``c(1 + |x_j - m|)``,
  the sum by ``lam u_acc sqrt(K)``, ``log`` adds ``c|log S|``, the two subtractions ``2c(|x_i| + |m| + |log S|)``.
  Backward ``gx = g - p s``, ``p = exp(y)``, ``s = sum g``: ``u_op|g| + p((u_op + lam u_acc sqrt(K)) sum|g| +
  |s|(u_op|y| + 2c)) + c|gx| + u_out|gx|``.
* **nll_loss**: forward ``-sum w x_t / W`` is a sum of N products (the |.|-evaluation, K = N, plus a division);
  backward writes single products ``-g w / W`` per row: ``(2u_op + 2c + u_out)|gx|``.
* **Anything else** gets the generic bound: the op evaluated on the magnitudes of its operands
  (:class:`~densenet_debug.verdict.magnitude.MagnitudeMode`), at least ``|o|``, with K = all input elements:
  ``(2u_op + lam u_acc sqrt(K) + u_cmp + u_out) M``. Exact for ops linear in each operand, a heuristic
  otherwise; the row says ``generic``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from densenet_debug.verdict.magnitude import MagnitudeMode
from densenet_debug.verdict.tolerance import Precision, repeated_addend_count, sum_accumulation_factor

aten = torch.ops.aten
EXACT = "exact"  # sentinel bound: the side must equal the oracle rounded to its dtype

Bound = Callable[[Precision], Tensor]


@dataclass
class OpModel:
    """The error model of one op call: a bound per output (``EXACT``, a function of the precision, or None
    for an output not compared), the model's name and the sentence that says why."""

    name: str
    origin: str
    bounds: list[object] = field(default_factory=list)
    matmul: bool = False  # operands take TF32/autocast rounding
    generic: bool = False


def base_name(op: str) -> str:
    """``aten.relu_.default`` -> ``relu_``; ``aten.add.Tensor`` -> ``add``."""
    return op.split(".")[1] if op.count(".") >= 1 else op


# Ops that only select, move or create elements (the base name, any overload, in place or not).
EXACT_OPS = frozenset({
    "detach", "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "permute", "transpose", "t",
    "unsqueeze", "squeeze", "slice", "select", "as_strided", "clone", "contiguous", "_to_copy", "copy", "cat",
    "stack", "split", "split_with_sizes", "chunk", "unbind", "narrow", "index_select", "gather", "alias",
    "flatten", "unflatten", "relu", "threshold", "threshold_backward", "max_pool2d_with_indices", "abs", "neg",
    "hardtanh", "clamp", "clamp_min", "clamp_max", "where", "masked_fill", "constant_pad_nd", "flip", "roll",
    "repeat", "zeros_like", "new_zeros", "ones_like", "new_ones", "full_like", "new_full", "fill", "zero",
    "scalar_tensor", "lift_fresh", "lift_fresh_copy", "index", "amax", "amin", "max", "min", "gt", "lt", "ge",
    "le", "eq", "ne", "sign", "zeros", "ones", "full", "arange", "_to_dense", "expand_as", "view_as",
    "squeeze_", "unsqueeze_", "transpose_", "as_strided_", "sym_size", "unfold",
})


def _strip(name: str) -> str:
    return name[:-1] if name.endswith("_") and name[:-1] in EXACT_OPS | _MODELS.keys() else name


def _abs(t: object) -> object:
    return t.abs() if isinstance(t, Tensor) and t.is_floating_point() else t


def _sum_bound(magnitude: Tensor, operands: int, k: int, cmp: int = 0) -> Bound:
    def bound(p: Precision) -> Tensor:
        return magnitude * (operands * p.u_op + p.lam * p.u_acc * math.sqrt(max(k, 1)) + cmp * p.cmp
                            + p.u_out) + p.eta
    return bound


def _scaled(magnitude: Tensor, u_op: float, cmp: float, u_out: float) -> Bound:
    """``(u_op * a + cmp * c + u_out * o) * magnitude + eta`` for elementwise ops."""
    def bound(p: Precision) -> Tensor:  # each operand and the result may underflow: eta apiece
        second = 1 + 2 * (p.u_op + p.cmp + p.u_out)  # (1+u)^n - 1 <= n u (1 + n u): the second-order terms
        return magnitude * ((u_op * p.u_op + cmp * p.cmp + u_out * p.u_out) * second) + (u_op + 1) * p.eta
    return bound


def _prod(xs: object) -> int:
    return math.prod(int(v) for v in xs) if isinstance(xs, (list, tuple)) else int(xs)


# -- multilinear ------------------------------------------------------------------------------------------
def _convolution(a: list, outs: list) -> OpModel:
    x, w, b = a[0], a[1], a[2]
    transposed, groups = bool(a[6]), int(a[8])
    mag = aten.convolution.default(x.abs(), w.abs(), None if b is None else b.abs(), *a[3:])
    # weight (Cout, Cin/g, k...) for a conv, (Cin, Cout/g, k...) for a transposed one
    k = (w.shape[0] // groups if transposed else w.shape[1]) * _prod(w.shape[2:]) + (b is not None)
    return OpModel("convolution", f"conv: sum of K={k} products (Cin/g*k*k), magnitude = conv(|x|, |w|)",
                   [_sum_bound(mag, 2, k)], matmul=True)


def _convolution_backward(a: list, outs: list) -> OpModel:
    g, x, w = a[0], a[1], a[2]
    bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask = a[3:11]
    mags = aten.convolution_backward.default(g.abs(), x.abs(), w.abs(), bias_sizes, stride, padding, dilation,
                                             transposed, output_padding, groups, mask)
    kernel = _prod(w.shape[2:])
    k_in = (w.shape[0] // int(groups) if not transposed else w.shape[1]) * kernel
    k_w = g.shape[0] * max(_prod(g.shape[2:]), _prod(x.shape[2:]) if transposed else 1)
    ks = [k_in, k_w, g.shape[0] * _prod(g.shape[2:])]
    bounds = [None if m is None or m.numel() == 0 else _sum_bound(m, 2 if i < 2 else 1, k)
              for i, (m, k) in enumerate(zip(mags, ks))]
    return OpModel("convolution_backward",
                   f"conv backward: sums of K={ks[0]} (grad_input, Cout/g*k*k), {ks[1]} (grad_weight, N*H*W), "
                   f"{ks[2]} (grad_bias) products; magnitudes = convolution_backward(|g|, |x|, |w|)", bounds,
                   matmul=True)


def _mm(a: list, outs: list) -> OpModel:
    m1, m2 = a[0], a[1]
    mag = torch.matmul(m1.abs(), m2.abs())
    k = m1.shape[-1]
    return OpModel("mm", f"matmul: sum of K={k} products, magnitude = |a| @ |b|", [_sum_bound(mag, 2, k)],
                   matmul=True)


def _addmm(a: list, outs: list) -> OpModel:
    bias, m1, m2 = a[0], a[1], a[2]
    beta = abs(float(a[3])) if len(a) > 3 and a[3] is not None else 1.0
    alpha = abs(float(a[4])) if len(a) > 4 and a[4] is not None else 1.0
    mag = alpha * (m1.abs() @ m2.abs()) + beta * bias.abs()
    k = m1.shape[-1] + 1
    return OpModel("addmm", f"addmm: sum of K={k} terms (the bias one of them), magnitude = |b| + |a1| @ |a2|",
                   [_sum_bound(mag, 2, k)], matmul=True)


def _avg_pool2d(a: list, outs: list) -> OpModel:
    x, kernel = a[0], a[1]
    mag = aten.avg_pool2d.default(x.abs(), *a[1:])
    k = _prod(kernel) if isinstance(kernel, (list, tuple)) and len(kernel) > 1 else _prod(kernel) ** 2
    return OpModel("avg_pool2d", f"average pool: sum of K={k} terms and a division, magnitude = pool(|x|)",
                   [_sum_bound(mag, 1, k, cmp=1)])


def _windows_per_element(kernel: object, stride: object) -> int:
    ks = list(kernel) if isinstance(kernel, (list, tuple)) else [kernel]
    st = list(stride) if isinstance(stride, (list, tuple)) and len(stride) else ks
    if len(ks) == 1:
        ks = ks * 2
    if len(st) == 1:
        st = st * 2
    return math.prod(math.ceil(int(k) / max(int(s), 1)) for k, s in zip(ks, st))


def _avg_pool2d_backward(a: list, outs: list) -> OpModel:
    g = a[0]
    mag = aten.avg_pool2d_backward.default(g.abs(), *a[1:])
    k = _windows_per_element(a[2], a[3])
    return OpModel("avg_pool2d_backward", f"average pool backward: up to K={k} windows per element, magnitude = "
                   "avg_pool2d_backward(|g|)", [_sum_bound(mag, 1, k, cmp=1)])


def _adaptive_avg_pool2d(a: list, outs: list) -> OpModel:
    x = a[0]
    mag = aten._adaptive_avg_pool2d.default(x.abs(), a[1])
    out = list(a[1])
    k = math.prod(math.ceil(s / max(o, 1)) + 1 for s, o in zip(x.shape[-2:], out))
    return OpModel("adaptive_avg_pool2d", f"adaptive average pool: windows of at most K={k}",
                   [_sum_bound(mag, 1, k, cmp=1)])


def _adaptive_avg_pool2d_backward(a: list, outs: list) -> OpModel:
    g, x = a[0], a[1]
    mag = aten._adaptive_avg_pool2d_backward.default(g.abs(), x)
    k = math.prod(math.ceil(o / max(s, 1)) + 1 for s, o in zip(x.shape[-2:], g.shape[-2:]))
    return OpModel("adaptive_avg_pool2d_backward", f"adaptive average pool backward: K={k}",
                   [_sum_bound(mag, 1, k, cmp=1)])


def _reduced(x: Tensor, dims: object) -> int:
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return x.numel()
    dims = [dims] if isinstance(dims, int) else list(dims)
    return math.prod(x.shape[d] for d in dims) if x.dim() else 1


def _sum(a: list, outs: list) -> OpModel:
    x = a[0]
    dims = a[1] if len(a) > 1 else None
    k = _reduced(x, dims)
    mag = x.abs().sum(dim=dims, keepdim=bool(a[2])) if dims not in (None, [], ()) and len(a) > 2 else x.abs().sum()
    if outs and outs[0] is not None and mag.shape != outs[0].shape:
        mag = mag.reshape(outs[0].shape)
    return OpModel("sum", f"sum of K={k} terms, magnitude = sum |x|", [_sum_bound(mag, 1, k)])


def _mean(a: list, outs: list) -> OpModel:
    x = a[0]
    dims = a[1] if len(a) > 1 else None
    k = _reduced(x, dims)
    keep = bool(a[2]) if len(a) > 2 else False
    mag = x.abs().mean(dim=dims, keepdim=keep) if dims not in (None, [], ()) else x.abs().mean()
    if outs and outs[0] is not None and mag.shape != outs[0].shape:
        mag = mag.reshape(outs[0].shape)
    return OpModel("mean", f"mean of K={k} terms, magnitude = mean |x|", [_sum_bound(mag, 1, k, cmp=1)])


# -- elementwise ---------------------------------------------------------------------------------------------
def _add(a: list, outs: list, sign: float = 1.0) -> OpModel:
    x, other = a[0], a[1]
    alpha = abs(float(a[2])) if len(a) > 2 and a[2] is not None else 1.0
    mag = _abs(x) + alpha * (other.abs() if isinstance(other, Tensor) else abs(float(other)))
    o = outs[0].abs()
    mag = torch.broadcast_to(mag, o.shape) if isinstance(mag, Tensor) else torch.full_like(o, float(mag))

    def bound(p: Precision) -> Tensor:  # two operands and the result may underflow: eta apiece
        second = 1 + 2 * (p.u_op + p.u_out)  # the rounded sum of rounded operands: second-order terms
        return (mag * p.u_op + o * p.u_out) * second + 3 * p.eta
    return OpModel("add", "elementwise add: each operand rounded (u_op (|a| + |alpha b|)), one result rounding",
                   [bound])


def _mul(a: list, outs: list) -> OpModel:
    o = outs[0].abs()
    return OpModel("mul", "elementwise product: two operand roundings and one of the result",
                   [_scaled(o, 2, 0, 1)])


def _div(a: list, outs: list) -> OpModel:
    o = outs[0].abs()
    return OpModel("div", "elementwise quotient: two operand roundings and one of the result",
                   [_scaled(o, 2, 0, 1)])


# -- batch norm ------------------------------------------------------------------------------------------
def _bn_shape(x: Tensor) -> tuple[list[int], list[int], int]:
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    return dims, shape, max(x.numel() // max(x.shape[1], 1), 1)


def _native_batch_norm(a: list, outs: list) -> OpModel:
    x, weight, bias, rm, rv = a[0], a[1], a[2], a[3], a[4]
    training, eps = bool(a[5]), float(a[7])
    dims, shape, R = _bn_shape(x)
    C = x.shape[1]
    gamma = (weight if weight is not None else torch.ones(C, dtype=x.dtype)).abs().view(shape)
    beta = (bias if bias is not None else torch.zeros(C, dtype=x.dtype)).abs().view(shape)
    ax = x.abs()
    if training:
        mu = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        m1, q = ax.mean(dims, keepdim=True), var + mu * mu  # mean |x| and E[x^2]
    else:
        mu, var = rm.view(shape), rv.view(shape)
    inv_sigma = torch.rsqrt(var + eps)
    xhat = (x - mu) * inv_sigma
    y = outs[0].abs()

    def stats(p: Precision) -> tuple[Tensor, Tensor, Tensor]:
        c = p.cmp
        if training:
            r = p.lam * p.u_acc * math.sqrt(R)
            e_mu = (p.u_op + r) * m1 + c * mu.abs()
            e_var = (2 * p.u_op + r + 3 * c) * q + 2 * mu.abs() * e_mu
        else:
            e_mu, e_var = p.u_op * mu.abs(), p.u_op * var.abs()
        return e_mu, e_var, e_var / (2 * (var + eps)) + 2 * c

    def out(p: Precision) -> Tensor:
        e_mu, _, rel = stats(p)
        c = p.cmp
        return (gamma * (p.u_op * ax + e_mu) * inv_sigma + (gamma * xhat.abs()) * (rel + 4 * c + p.u_op)
                + (p.u_op + c) * beta + p.u_out * y + p.eta)

    def mean(p: Precision) -> Tensor:
        e_mu, _, _ = stats(p)
        return (e_mu + p.u_out * mu.abs()).reshape(-1) + p.eta

    def invstd(p: Precision) -> Tensor:
        _, _, rel = stats(p)
        return ((rel + p.u_out) * inv_sigma).reshape(-1) + p.eta

    bounds = [out, mean if training else None, invstd if training else None]
    return OpModel("native_batch_norm", f"batch norm forward ({'batch' if training else 'running'} statistics, "
                   f"R={R} per channel), first-order model of tolerance.py", bounds)


def _native_batch_norm_backward(a: list, outs: list) -> OpModel:
    g, x, weight, rm, rv, save_mean, save_invstd = a[:7]
    train, eps = bool(a[7]), float(a[8])
    dims, shape, R = _bn_shape(x)
    C = x.shape[1]
    gamma = (weight if weight is not None else torch.ones(C, dtype=x.dtype)).abs().view(shape)
    if train:
        mu, inv_sigma = save_mean.view(shape), save_invstd.view(shape)
    else:
        mu, inv_sigma = rm.view(shape), torch.rsqrt(rv.view(shape) + eps)
    ag, ax = g.abs(), x.abs()
    xhat = (x - mu) * inv_sigma
    axhat = xhat.abs()
    centred = (x - mu).abs()
    sum_ag = ag.sum(dims, keepdim=True)
    s_g = g.sum(dims, keepdim=True)
    s_gx = (g * xhat).sum(dims, keepdim=True)
    a1 = (ag * axhat).sum(dims, keepdim=True)
    t = (g - s_g / R - xhat * s_gx / R).abs()
    gx = outs[0].abs() if outs and outs[0] is not None else None

    def r_of(p: Precision) -> float:
        return p.lam * p.u_acc * math.sqrt(R)

    k_eff = repeated_addend_count(g)  # sum g: equal addends round alike (tolerance.repeated_addend_count)

    def r_g(p: Precision) -> Tensor:
        return p.u_acc * sum_accumulation_factor(p.lam, k_eff, R).view(shape)

    def e_xhat_sum(p: Precision) -> Tensor:  # sum |g| e_xhat, per channel
        c = p.cmp
        return ((ag * (p.u_op * (ax + mu.abs()) + c * centred)).sum(dims, keepdim=True) * inv_sigma
                + (p.u_op + c) * a1)

    def e_sgx(p: Precision) -> Tensor:
        return (p.u_op + r_of(p) + p.cmp) * a1 + e_xhat_sum(p)

    def grad_input(p: Precision) -> Tensor:
        c, uo = p.cmp, p.u_op
        a_ = gamma * inv_sigma
        if not train:
            return gx * (3 * uo + 3 * c + p.u_out) + p.eta
        e_sg = (uo + r_g(p)) * sum_ag
        e_xhat = (uo * (ax + mu.abs()) + c * centred) * inv_sigma + (uo + c) * axhat
        e_t = ((uo + 2 * c) * ag + e_sg / R + axhat * (e_sgx(p) / R) + e_xhat * (s_gx.abs() / R)
               + 2 * c * (s_g.abs() + axhat * s_gx.abs()) / R)
        return a_ * (e_t + (2 * uo + 2 * c) * t) + p.u_out * gx + p.eta

    def grad_weight(p: Precision) -> Tensor:
        return (e_sgx(p) + p.u_out * s_gx.abs()).reshape(-1) + p.eta

    def grad_bias(p: Precision) -> Tensor:
        return ((p.u_op + r_g(p)) * sum_ag + p.u_out * s_g.abs()).reshape(-1) + p.eta

    bounds = [grad_input if gx is not None else None, grad_weight, grad_bias]
    return OpModel("native_batch_norm_backward", f"batch norm backward (R={R} per channel, mean and invstd "
                   "as rounded operands), first-order model", bounds)


# -- log_softmax and nll_loss --------------------------------------------------------------------------------
def _log_softmax(a: list, outs: list) -> OpModel:
    x, dim = a[0], int(a[1])
    k = x.shape[dim] if x.dim() else 1
    m = x.amax(dim, keepdim=True)
    log_s = (x - m).exp().sum(dim, keepdim=True).log()
    ax = x.abs()
    spread = (x - m).abs().amax(dim, keepdim=True)
    y = outs[0].abs()

    def bound(p: Precision) -> Tensor:
        c = p.cmp
        return (p.u_op * (ax + ax.amax(dim, keepdim=True)) + c * (1 + spread) + p.lam * p.u_acc * math.sqrt(k)
                + c * log_s.abs() + 2 * c * (ax + m.abs() + log_s.abs()) + p.u_out * y + p.eta)
    return OpModel("log_softmax", f"log_softmax over K={k}: operand shift, exp, a sum of K, log, two subtractions",
                   [bound])


def _log_softmax_backward(a: list, outs: list) -> OpModel:
    g, y, dim = a[0], a[1], int(a[2])
    k = g.shape[dim] if g.dim() else 1
    p_ = y.exp()
    sum_ag = g.abs().sum(dim, keepdim=True)
    s = g.sum(dim, keepdim=True).abs()
    ag, ay = g.abs(), y.abs()
    gx = outs[0].abs()

    def bound(p: Precision) -> Tensor:
        c = p.cmp
        return (p.u_op * ag + p_ * ((p.u_op + p.lam * p.u_acc * math.sqrt(k)) * sum_ag + s * (p.u_op * ay + 2 * c))
                + (c + p.u_out) * gx + p.eta)
    return OpModel("log_softmax_backward", f"log_softmax backward g - exp(y) sum(g) over K={k}", [bound])


def _nll_loss_forward(a: list, outs: list) -> OpModel:
    x, target, weight, reduction, ignore_index = a[:5]
    mag = aten.nll_loss_forward.default(-x.abs(), target, None if weight is None else weight.abs(), reduction,
                                        ignore_index)[0].abs()
    n = x.shape[0] if x.dim() > 1 else 1
    return OpModel("nll_loss", f"nll_loss: a sum of N={n} selected terms and a division",
                   [_sum_bound(mag, 2, n, cmp=1), EXACT])


def _nll_loss_backward(a: list, outs: list) -> OpModel:
    gx = outs[0].abs()
    return OpModel("nll_loss_backward", "nll_loss backward: one product and one division per element",
                   [_scaled(gx, 2, 2, 1)])


# -- exact and generic ---------------------------------------------------------------------------------------
def _exact(name: str, n_outputs: int) -> OpModel:
    return OpModel(name, "exact: selects, moves or creates elements; rounding commutes with it",
                   [EXACT] * n_outputs)


def _max_pool_backward(a: list, outs: list) -> OpModel:
    g = a[0]
    k = _windows_per_element(a[2], a[3])
    if k <= 1:
        return _exact("max_pool2d_with_indices_backward", 1)
    mag = aten.max_pool2d_with_indices_backward.default(g.abs(), *a[1:])
    return OpModel("max_pool2d_with_indices_backward", f"max pool backward: overlapping windows, sums of up to "
                   f"K={k} routed gradients", [_sum_bound(mag, 1, k)])


def _generic(func: torch._ops.OpOverload, a: list, kw: dict, outs: list) -> OpModel:
    k = max(sum(t.numel() for t in a if isinstance(t, Tensor)), 1)
    try:
        with MagnitudeMode():
            mag = func(*a, **kw)
        mags = [m if isinstance(m, Tensor) else None for m in torch.utils._pytree.tree_leaves(mag)]
    except Exception:  # noqa: BLE001 - an op the magnitude mode cannot evaluate: the outputs' own size
        mags = [None] * len(outs)
    bounds: list[object] = []
    for m, o in zip(mags + [None] * len(outs), outs):
        if o is None or not o.is_floating_point():
            bounds.append(EXACT if o is not None else None)
            continue
        mag = o.abs() if m is None or m.shape != o.shape else torch.maximum(m.abs(), o.abs())
        bounds.append(_sum_bound(mag, 2, k, cmp=1))
    return OpModel("generic", f"generic bound (no error model for {func}): the op on |operands|, K = {k} "
                   "(all input elements)", bounds, generic=True)


_MODELS: dict[str, Callable[[list, list], OpModel]] = {
    "convolution": _convolution, "convolution_backward": _convolution_backward, "mm": _mm, "bmm": _mm,
    "matmul": _mm, "addmm": _addmm, "avg_pool2d": _avg_pool2d, "avg_pool2d_backward": _avg_pool2d_backward,
    "_adaptive_avg_pool2d": _adaptive_avg_pool2d, "_adaptive_avg_pool2d_backward": _adaptive_avg_pool2d_backward,
    "sum": _sum, "mean": _mean, "add": _add, "sub": _add, "mul": _mul, "div": _div,
    "native_batch_norm": _native_batch_norm, "native_batch_norm_backward": _native_batch_norm_backward,
    "_log_softmax": _log_softmax, "_log_softmax_backward_data": _log_softmax_backward,
    "nll_loss_forward": _nll_loss_forward, "nll_loss_backward": _nll_loss_backward,
    "max_pool2d_with_indices_backward": _max_pool_backward,
}


def op_model(func: torch._ops.OpOverload, args: list, kwargs: dict, outs: list[Tensor | None]) -> OpModel:
    """The error model of ``func`` called on ``args`` (the oracle's float64 inputs) with outputs ``outs``."""
    name = _strip(func.overloadpacket.__name__)
    if name in EXACT_OPS:
        return _exact(name, len(outs))
    model = _MODELS.get(name)
    if model is not None:
        try:
            return model(args, outs)
        except (TypeError, IndexError, ValueError, RuntimeError, AttributeError):
            pass  # arguments in an unexpected form (another overload): the generic bound, which says so
    return _generic(func, [a.clone() if isinstance(a, Tensor) else a for a in args], kwargs, outs)
