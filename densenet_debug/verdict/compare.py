"""Comparing one side's tensor with the oracle's under an elementwise bound, and relative errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Comparison:
    """One side's tensor against the oracle's, under an elementwise bound."""

    error: float  # max |side - oracle| / max |oracle|
    tolerance: float  # the scalar tolerance the elementwise bound implies at the worst element
    ratio: float  # max over elements of |side - oracle| / bound (> 1 fails)
    worst: tuple[int, ...]  # index of the element with the largest ratio
    excluded: int = 0  # elements left out (kinks)
    nonfinite: bool = False  # the side holds NaN/Inf where the oracle is finite (set by the caller)

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0


def abs_difference(side: Tensor, o: Tensor) -> Tensor:
    """|side - o| in fp64 on the CPU, never writing into ``side`` (a fp64 CPU side converts to itself)."""
    side = side.detach()
    if side.dtype == torch.float64 and side.device.type == "cpu":
        return (side - o).abs_()
    return side.to("cpu", torch.float64).sub_(o).abs_()


def oracle_scale(oracle: Tensor, cache: dict | None = None) -> float:
    """max |oracle| over finite elements (1 if zero); memoised by tensor identity in ``cache``."""
    key = id(oracle)
    if cache is not None and key in cache and cache[key][0] is oracle:
        return cache[key][1]
    o = oracle.detach()
    scale = float(o.abs().max()) if o.numel() else 0.0
    if not math.isfinite(scale):
        scale = float(o.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max())
    scale = scale if scale > 0 else 1.0
    if cache is not None:
        cache[key] = (oracle, scale)
    return scale


def relative_error(side: Tensor | None, truth: Tensor | None, cache: dict | None = None, *,
                   zero_truth_exact: bool = False) -> float:
    """max |side - truth| / max |truth| in fp64; a missing or misshapen tensor, or a NaN, is infinitely wrong.

    The scale is :func:`oracle_scale` (1 for an all-zero truth, so the error is then absolute), or, with
    ``zero_truth_exact``, an all-zero truth must be met exactly (any difference is infinitely wrong): a
    stored float64 truth reproduced by float64 has no rounding room at zero. The one relative error for torch
    tensors; the NumPy oracle keeps its own for arrays (:func:`densenet_debug.numpy_oracle.compare.relative_error`).
    """
    if truth is None and side is None:
        return 0.0
    if truth is None or side is None or tuple(side.shape) != tuple(truth.shape):
        return math.inf
    if truth.numel() == 0:
        return 0.0
    truth = truth.detach()
    err = float(abs_difference(side, truth).max())
    if math.isnan(err):
        return math.inf
    if zero_truth_exact:
        scale = float(truth.abs().max())
        if math.isnan(scale):
            return math.inf
        return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    return err / oracle_scale(truth, cache)


def compare(side: Tensor | None, oracle: Tensor | None, bound: Tensor | None,
            exclude: Tensor | None = None, cache: dict | None = None) -> Comparison:
    """Elementwise check ``|side - oracle| <= bound``; a missing or misshapen tensor fails outright.

    NaN against NaN and equal infinities count as equal; any other non-finite difference fails.
    """
    if oracle is None and side is None:
        return Comparison(0.0, 0.0, 0.0, ())
    if oracle is None or side is None or tuple(side.shape) != tuple(oracle.shape):
        return Comparison(math.inf, 0.0, math.inf, ())
    if oracle.numel() == 0:
        return Comparison(0.0, 0.0, 0.0, ())
    o = oracle.detach().to("cpu", torch.float64)
    d = abs_difference(side, o)
    if exclude is not None:
        d.masked_fill_(exclude.to("cpu").reshape(d.shape), 0.0)
    dmax = float(d.max())
    if not math.isfinite(dmax):
        s = side.detach().to("cpu", torch.float64)
        equal = (torch.isnan(s) & torch.isnan(o)) | (s == o)
        d = torch.where(equal, torch.zeros_like(d), d.nan_to_num(nan=math.inf))
        if exclude is not None:
            d.masked_fill_(exclude.to("cpu").reshape(d.shape), 0.0)
        dmax = float(d.max())
    scale = oracle_scale(oracle, cache)
    error = dmax / scale
    excluded = int(exclude.sum()) if exclude is not None else 0
    if bound is None:  # must be exact: any difference is infinitely many tolerances away
        if dmax == 0:
            return Comparison(0.0, 0.0, 0.0, (), excluded)
        return Comparison(error, 0.0, math.inf, _unravel(int(torch.argmax(d.reshape(-1))), d.shape), excluded)
    b = bound.to("cpu", torch.float64)
    if dmax == 0:
        return Comparison(0.0, float(b.max()) / scale, 0.0, (), excluded)
    value, index = torch.max(d.div_(b).reshape(-1), 0)
    worst_ratio, worst_flat = float(value), int(index)
    if math.isnan(worst_ratio):  # 0/0 where the bound is zero and the values agree: not an error
        value, index = torch.max(d.nan_to_num_(nan=0.0, posinf=math.inf).reshape(-1), 0)
        worst_ratio, worst_flat = float(value), int(index)
    if worst_ratio > 0 and math.isfinite(worst_ratio):
        tolerance = error / worst_ratio
    else:
        full_b = torch.broadcast_to(b, d.shape).reshape(-1)
        tolerance = float(full_b[worst_flat] if worst_ratio > 0 else full_b.max()) / scale
    return Comparison(error, tolerance, worst_ratio, _unravel(worst_flat, d.shape), excluded)


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    index = []
    for n in reversed(tuple(shape)):
        flat, i = divmod(flat, n) if n else (flat, 0)
        index.append(i)
    return tuple(reversed(index))
