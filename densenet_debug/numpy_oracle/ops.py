"""NumPy float64 forward and backward of every op DenseNet uses. No torch anywhere in here.

Each op is a pair: ``*_forward`` returns the output and what its backward needs; ``*_backward`` returns
the input gradients. Convolution goes through im2col built with ``sliding_window_view`` (no Python loop
over pixels). Layouts are NCHW, as in PyTorch.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Array = np.ndarray


# -- convolution (groups = 1, no bias: DenseNet's convs) ---------------------------------------------------
def conv2d_forward(x: Array, w: Array, stride: int = 1, padding: int = 0) -> tuple[Array, tuple]:
    kh, kw = w.shape[2:]
    if kh == kw == 1 and padding == 0:
        xs = x[:, :, ::stride, ::stride]
        y = np.tensordot(w[:, :, 0, 0], xs, axes=([1], [1]))  # (O, N, H, W)
        return y.transpose(1, 0, 2, 3), (x, w, stride, padding)
    cols = _windows(_pad(x, padding), kh, kw, stride)  # (N, C, Ho, Wo, kh, kw), a view
    y = np.tensordot(cols, w, axes=([1, 4, 5], [1, 2, 3]))  # (N, Ho, Wo, O)
    return y.transpose(0, 3, 1, 2), (x, w, stride, padding)


def conv2d_backward(gy: Array, cache: tuple) -> tuple[Array, Array]:
    """Gradients w.r.t. the input and the weight."""
    x, w, stride, padding = cache
    kh, kw = w.shape[2:]
    if kh == kw == 1 and padding == 0:
        xs = x[:, :, ::stride, ::stride]
        gw = np.tensordot(gy, xs, axes=([0, 2, 3], [0, 2, 3]))[:, :, None, None]
        gxs = np.tensordot(gy, w[:, :, 0, 0], axes=([1], [0])).transpose(0, 3, 1, 2)
        if stride == 1:
            return gxs, gw
        gx = np.zeros_like(x)
        gx[:, :, ::stride, ::stride] = gxs
        return gx, gw
    cols = _windows(_pad(x, padding), kh, kw, stride)
    gw = np.tensordot(gy, cols, axes=([0, 2, 3], [0, 2, 3]))  # (O, C, kh, kw)
    gcols = np.tensordot(gy, w, axes=([1], [0]))  # (N, Ho, Wo, C, kh, kw)
    n, c, h, wd = x.shape
    gxp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding))
    ho, wo = gy.shape[2:]
    for i in range(kh):  # col2im: each kernel offset adds one strided slice
        for j in range(kw):
            gxp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += gcols[..., i, j].transpose(0, 3, 1, 2)
    return gxp[:, :, padding:padding + h, padding:padding + wd], gw


def _pad(x: Array, p: int) -> Array:
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x


def _windows(xp: Array, kh: int, kw: int, stride: int) -> Array:
    return sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]


# -- batch normalization -----------------------------------------------------------------------------------
def batch_norm_forward(
    x: Array, gamma: Array, beta: Array, running_mean: Array, running_var: Array, train: bool,
    momentum: float = 0.1, eps: float = 1e-5,
) -> tuple[Array, tuple, Array, Array]:
    """Output, cache, and the running statistics after this call (PyTorch's update: unbiased variance)."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if train:
        m = x.size // x.shape[1]
        mean = x.mean(axis=axes)
        var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
        new_mean = (1 - momentum) * running_mean + momentum * mean
        new_var = (1 - momentum) * running_var + momentum * var * (m / max(m - 1, 1))
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    y = xhat * gamma.reshape(shape) + beta.reshape(shape)
    return y, (xhat, gamma, invstd, train, axes, shape), new_mean, new_var


def batch_norm_backward(gy: Array, cache: tuple) -> tuple[Array, Array, Array]:
    """Gradients w.r.t. the input, gamma and beta."""
    xhat, gamma, invstd, train, axes, shape = cache
    gbeta = gy.sum(axis=axes)
    ggamma = (gy * xhat).sum(axis=axes)
    scale = (gamma * invstd).reshape(shape)
    if not train:
        return gy * scale, ggamma, gbeta
    m = gy.size // gy.shape[1]
    gx = scale * (gy - (gbeta / m).reshape(shape) - xhat * (ggamma / m).reshape(shape))
    return gx, ggamma, gbeta


# -- elementwise, pooling, concatenation, linear -----------------------------------------------------------
def relu_forward(x: Array) -> tuple[Array, Array]:
    y = np.maximum(x, 0.0)
    return y, y


def relu_backward(gy: Array, y: Array) -> Array:
    return np.where(y > 0, gy, 0.0)  # PyTorch's convention: zero gradient at 0


def concat_forward(xs: list[Array], axis: int = 1) -> tuple[Array, list[int]]:
    return np.concatenate(xs, axis=axis), [x.shape[axis] for x in xs]


def concat_backward(gy: Array, sizes: list[int], axis: int = 1) -> list[Array]:
    return np.split(gy, np.cumsum(sizes)[:-1], axis=axis)


def avg_pool2d_forward(x: Array, k: int, stride: int | None = None) -> tuple[Array, tuple]:
    """Average pooling without padding (DenseNet's transitions use k = stride = 2)."""
    s = stride or k
    y = _windows(x, k, k, s).mean(axis=(4, 5))
    return y, (x.shape, k, s)


def avg_pool2d_backward(gy: Array, cache: tuple) -> Array:
    shape, k, s = cache
    gx = np.zeros(shape)
    ho, wo = gy.shape[2:]
    part = gy / (k * k)
    for i in range(k):
        for j in range(k):
            gx[:, :, i:i + s * ho:s, j:j + s * wo:s] += part
    return gx


def global_avg_pool_forward(x: Array) -> tuple[Array, tuple]:
    return x.mean(axis=(2, 3), keepdims=True), x.shape


def global_avg_pool_backward(gy: Array, shape: tuple) -> Array:
    return np.broadcast_to(gy / (shape[2] * shape[3]), shape).copy()


def flatten_forward(x: Array) -> tuple[Array, tuple]:
    return x.reshape(x.shape[0], -1), x.shape


def flatten_backward(gy: Array, shape: tuple) -> Array:
    return gy.reshape(shape)


def linear_forward(x: Array, w: Array, b: Array | None) -> tuple[Array, tuple]:
    y = x @ w.T
    return (y if b is None else y + b), (x, w)


def linear_backward(gy: Array, cache: tuple) -> tuple[Array, Array, Array]:
    """Gradients w.r.t. the input, the weight and the bias."""
    x, w = cache
    return gy @ w, gy.T @ x, gy.sum(axis=0)


def cross_entropy_forward(logits: Array, target: Array) -> tuple[float, tuple]:
    """Mean cross-entropy over the batch, from logits (log-sum-exp shifted by the row maximum)."""
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    n = logits.shape[0]
    loss = float((lse - z[np.arange(n), target]).mean())
    return loss, (z, lse, target)


def cross_entropy_backward(cache: tuple) -> Array:
    z, lse, target = cache
    p = np.exp(z - lse[:, None])
    p[np.arange(len(target)), target] -= 1.0
    return p / len(target)
