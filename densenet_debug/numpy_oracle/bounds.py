"""Rounding-error bounds of each DenseNet op in float64, elementwise, for comparing two implementations.

Both sides compute the same math with their own summation orders, so an element may differ by at most
twice one side's error bound. Bounds are deterministic (Higham's γ_n = nε/(1 - nε), ε = 2⁻⁵³) for sums
of products, evaluated on absolute values ("the op on |inputs|"), and follow the op's formula for
BatchNorm and the softmax. Every function returns ``{quantity: (numpy value, bound)}``; no torch here.
"""

from __future__ import annotations

import numpy as np

from densenet_debug.backends import U64
from densenet_debug.numpy_oracle import ops
from densenet_debug.numpy_oracle.model import BN_EPS, BN_MOMENTUM

Array = np.ndarray
EPS = U64  # float64's unit roundoff (a constant from the backends' table; the math here stays NumPy)


def gamma(n: int) -> float:
    """Higham's γ_n: the relative error bound of a length-n sum or dot product."""
    return n * EPS / (1 - n * EPS)


def conv(x: Array, w: Array, gy: Array, stride: int, padding: int) -> dict[str, tuple[Array, Array]]:
    y, cache = ops.conv2d_forward(x, w, stride, padding)
    gx, gw = ops.conv2d_backward(gy, cache)
    ya, cache_a = ops.conv2d_forward(np.abs(x), np.abs(w), stride, padding)
    gxa, gwa = ops.conv2d_backward(np.abs(gy), cache_a)
    o, c, kh, kw = w.shape
    n_w = gy.shape[0] * gy.shape[2] * gy.shape[3]
    return {"output": (y, 2 * gamma(c * kh * kw) * ya), "grad_input": (gx, 2 * gamma(o * kh * kw) * gxa),
            "grad_weight": (gw, 2 * gamma(n_w) * gwa)}


def linear(x: Array, w: Array, b: Array, gy: Array) -> dict[str, tuple[Array, Array]]:
    y, cache = ops.linear_forward(x, w, b)
    gx, gw, gb = ops.linear_backward(gy, cache)
    ya = np.abs(x) @ np.abs(w).T + np.abs(b)
    ga = np.abs(gy)
    n, k = x.shape[0], x.shape[1]
    return {"output": (y, 2 * gamma(k + 1) * ya), "grad_input": (gx, 2 * gamma(w.shape[0]) * (ga @ np.abs(w))),
            "grad_weight": (gw, 2 * gamma(n) * (ga.T @ np.abs(x))), "grad_bias": (gb, 2 * gamma(n) * ga.sum(0))}


def batch_norm(x: Array, g: Array, b: Array, rm: Array, rv: Array, gy: Array, train: bool
               ) -> dict[str, tuple[Array, Array]]:
    """Bounds by propagating each intermediate's error through y = γ·(x - μ)/s + β and its backward.

    μ: γ_M·mean|x|; d = x - μ: ε|d| + δμ; var = mean d²: γ_{M+2}·var + 2·mean(|d|·δd); s = √(var + eps):
    relative δvar / (2(var + eps)) + 2ε; x̂ = d/s: δd/s + |x̂|·(rel s + 2ε). Implementations that fold
    the affine part into x·(γ/s) + (β - μγ/s) add 4ε·(|x| + |μ|)·|γ|/s. The backward's sums (Σg, Σg·x̂) err by
    γ_{M+1} of their absolute sums plus what x̂'s error carries.
    """
    y, cache, new_rm, new_rv = ops.batch_norm_forward(x, g, b, rm, rv, train, BN_MOMENTUM, BN_EPS)
    gx, gg, gb = ops.batch_norm_backward(gy, cache)
    xhat, _, invstd, _, axes, shape = cache
    m = x.size // x.shape[1]
    r = (lambda a: a.reshape(shape))  # noqa: E731
    if train:
        mu = x.mean(axis=axes)
        d = x - r(mu)
        var = (d ** 2).mean(axis=axes)
        d_mu = gamma(m) * np.abs(x).mean(axis=axes)
        dd = EPS * np.abs(d) + r(d_mu)
        d_var = gamma(m + 2) * var + 2 * (np.abs(d) * dd).mean(axis=axes)
    else:
        mu, var = rm, rv
        d_mu, d_var = np.zeros_like(mu), np.zeros_like(var)
        dd = EPS * (np.abs(x) + r(np.abs(mu)))
    rel_s = d_var / (2 * (var + BN_EPS)) + 2 * EPS
    d_xhat = dd * r(invstd) + np.abs(xhat) * r(rel_s + 2 * EPS)
    ag, scale = np.abs(g), np.abs(g) * invstd
    d_y = r(ag) * d_xhat + 4 * EPS * (np.abs(xhat) * r(ag) + r(np.abs(b))) \
        + 4 * EPS * (np.abs(x) + r(np.abs(mu))) * r(scale)
    out = {"output": (y, 2 * d_y)}
    agy = np.abs(gy)
    d_gb = gamma(m) * agy.sum(axis=axes)
    d_gg = gamma(m + 1) * (agy * np.abs(xhat)).sum(axis=axes) + (agy * d_xhat).sum(axis=axes)
    if train:
        d_gx = r(scale) * (3 * EPS * (agy + r(np.abs(gb)) / m + np.abs(xhat) * r(np.abs(gg)) / m)
                           + r(d_gb) / m + d_xhat * r(np.abs(gg)) / m + np.abs(xhat) * r(d_gg) / m) \
            + np.abs(gx) * r(rel_s + 3 * EPS)
    else:
        d_gx = np.abs(gx) * r(rel_s + 3 * EPS)
    out.update(grad_input=(gx, 2 * d_gx), grad_weight=(gg, 2 * d_gg), grad_bias=(gb, 2 * d_gb))
    if train:
        unbias = m / max(m - 1, 1)
        out["running_mean"] = (new_rm, 2 * (3 * EPS * (np.abs((1 - BN_MOMENTUM) * rm) + np.abs(BN_MOMENTUM * mu))
                                            + BN_MOMENTUM * d_mu))
        out["running_var"] = (new_rv, 2 * (3 * EPS * (np.abs((1 - BN_MOMENTUM) * rv) + BN_MOMENTUM * var * unbias)
                                           + BN_MOMENTUM * unbias * d_var))
    return out


def relu(x: Array, gy: Array) -> dict[str, tuple[Array, Array]]:
    y, cache = ops.relu_forward(x)
    return {"output": (y, np.zeros_like(y)), "grad_input": (ops.relu_backward(gy, cache), np.zeros_like(gy))}


def concat(xs: list[Array], gy: Array) -> dict[str, tuple[Array, Array]]:
    y, sizes = ops.concat_forward(xs, 1)
    out = {"output": (y, np.zeros_like(y))}
    for i, g in enumerate(ops.concat_backward(gy, sizes, 1)):
        out[f"grad_input{i}"] = (g, np.zeros_like(g))
    return out


def avg_pool(x: Array, k: int, gy: Array) -> dict[str, tuple[Array, Array]]:
    y, cache = ops.avg_pool2d_forward(x, k)
    gx = ops.avg_pool2d_backward(gy, cache)
    ya, _ = ops.avg_pool2d_forward(np.abs(x), k)
    return {"output": (y, 2 * gamma(k * k + 1) * ya), "grad_input": (gx, 2 * gamma(2) * np.abs(gx))}


def global_avg_pool(x: Array, gy: Array) -> dict[str, tuple[Array, Array]]:
    y, shape = ops.global_avg_pool_forward(x)
    gx = ops.global_avg_pool_backward(gy, shape)
    ya, _ = ops.global_avg_pool_forward(np.abs(x))
    return {"output": (y, 2 * gamma(shape[2] * shape[3] + 1) * ya), "grad_input": (gx, 2 * gamma(2) * np.abs(gx))}


def flatten(x: Array, gy: Array) -> dict[str, tuple[Array, Array]]:
    y, shape = ops.flatten_forward(x)
    gx = ops.flatten_backward(gy, shape)
    return {"output": (y, np.zeros_like(y)), "grad_input": (gx, np.zeros_like(gx))}


def cross_entropy(logits: Array, target: Array) -> dict[str, tuple[Array, Array]]:
    """Loss and grad w.r.t. logits; exp turns an absolute error δ of its argument into a relative one.

    The argument z - max - lse errs by ε·(|z| + |max|) + δlse with δlse ≤ (γ_C + 2ε)·(1 + |lse|).
    """
    loss, cache = ops.cross_entropy_forward(logits, target)
    grad = ops.cross_entropy_backward(cache)
    z, lse, _ = cache
    n, c = logits.shape
    top = np.abs(logits).max(axis=1, keepdims=True)
    d_lse = (gamma(c) + 2 * EPS) * (1 + np.abs(lse))[:, None]
    d_arg = EPS * (np.abs(logits) + top) + d_lse
    p = np.exp(z - lse[:, None])
    d_grad = (p * (d_arg + 4 * EPS) + EPS * np.abs(grad) * n) / n
    d_loss = float((d_arg.max(axis=1) + EPS * np.abs(lse)).mean() + gamma(n) * abs(loss))
    return {"loss": (np.array(loss), np.array(2 * d_loss)), "grad_logits": (grad, 2 * d_grad)}
