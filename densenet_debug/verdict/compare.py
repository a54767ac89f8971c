"""Comparing one side's tensor with the oracle's under an elementwise bound, and the scale errors are read on.

**The scale of the terms.** Every quantity a unit produces is a sum of terms (a conv output sums Cin*k*k
products, a bias gradient sums N*H*W grad_output elements, BN's grad_input is ``g - mean(g) - xhat *
mean(g xhat)``). Rounding errs in proportion to ``M = sum |terms|`` (:mod:`densenet_debug.verdict.tolerance`
derives every bound as ``c * M + eta``), not in proportion to the result, which may cancel: the gradient of a
conv bias feeding a batch norm is ``sum g`` over a ``g`` whose per-channel sum BN makes zero, so the truth is
1e-17 while its terms are O(1). An error divided by ``max |truth|`` there reads 1e+8 and its tolerance 1e+10;
both are rounding on O(1) terms. So errors and tolerances are read on ``S = max(max M, max |truth|)`` over the
tensor (:func:`oracle_scale`, with the error model's ``max M`` given as ``terms``): ``error = max |side -
truth| / S`` and ``tolerance`` is the bound at the worst element over the same ``S``. A local row is
judged elementwise (``ratio = max |side - truth| / bound``), which ``S`` cannot move: it cancels from
``error / tolerance``. ``S >= max |truth|`` (``|sum t| <= sum |t|``; the max also covers error models that
are heuristics), so a figure never reads worse than a relative one. A quantity without an error model
(exact data movement, integer buffers) has no cancellation and keeps ``max |truth|`` (1 for an all-zero
truth: the error is then absolute).

Scalars are judged where tolerances are summed: a composite's tolerance adds its descendants', and a
propagated row's error is compared with the first-order sum of the local tolerances upstream. On ``S``
each local tolerance is u-sized (``c * M / max M``); on ``max |truth|`` one cancelled quantity's 1e+10
would swamp every sum it enters and mask every row those sums cover. Propagated rows read a side's
end-to-end error on the same ``S`` the unit's local rows used (the memo ``cache`` keyed by the oracle
tensor carries it from :func:`compare` to :func:`relative_error`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Comparison:
    """One side's tensor against the oracle's, under an elementwise bound."""

    error: float  # max |side - oracle| / S, S the scale of the terms (module docstring)
    tolerance: float  # the scalar tolerance the elementwise bound implies at the worst element
    ratio: float  # max over elements of |side - oracle| / bound (> 1 fails)
    worst: tuple[int, ...]  # index of the element with the largest ratio
    excluded: int = 0  # elements left out (kinks)
    nonfinite: bool = False  # the side holds NaN/Inf where the oracle is finite (set by the caller)
    scale: float = 1.0  # S: what error and tolerance are relative to

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0


def abs_difference(side: Tensor, o: Tensor) -> Tensor:
    """|side - o| in fp64 on the CPU, never writing into ``side`` (a fp64 CPU side converts to itself)."""
    side = side.detach()
    if side.dtype == torch.float64 and side.device.type == "cpu":
        return (side - o).abs_()
    return side.to("cpu", torch.float64).sub_(o).abs_()


class _Scratch(threading.local):
    """One float64 buffer per thread, grown to the largest tensor compared, that :func:`_scratch_difference`
    writes into. A fresh float64 tensor per comparison cost more than the comparison: its pages are faulted in
    anew on every call (measured on a 1.8M-element feature map, one thread: 3.3 ms for ``to(float64)`` against
    0.9 ms for ``copy_`` into memory already mapped; a BC-100 diff compares ~12,000 tensors). It holds at most
    one float64 copy of the largest quantity (14 MB for BC-100 at batch 8)."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.float64)

    def take(self, shape: torch.Size) -> Tensor:
        n = math.prod(shape)
        if self.buffer.numel() < n:
            self.buffer = torch.empty(n, dtype=torch.float64)
        return self.buffer[:n].view(shape)


_SCRATCH = _Scratch()


def _widened(side: Tensor, o: Tensor) -> Tensor | None:
    """``side`` widened to float64 in the thread's scratch buffer, shaped as ``o`` (a float64 CPU tensor of the
    same shape); None where that does not apply (another device or dtype: the caller takes the long way). Valid
    until this thread's next call, so only for a caller that reduces it at once."""
    if side.device.type != "cpu" or o.device.type != "cpu" or o.dtype != torch.float64 or not side.is_floating_point():
        return None
    return _SCRATCH.take(o.shape).copy_(side.detach())


def _scratch_difference(side: Tensor, o: Tensor) -> Tensor:
    """:func:`abs_difference` written into the thread's scratch buffer (see :func:`_widened`)."""
    w = _widened(side, o)
    return abs_difference(side, o) if w is None else w.sub_(o).abs_()


def _max_abs_difference(side: Tensor, o: Tensor) -> float:
    """max |side - o| (NaN when a difference is NaN), by the extremes of the signed difference: one pass fewer
    than ``|.|`` then max (measured ~25 % less on a 1.8M-element feature map)."""
    w = _widened(side, o)
    if w is None:
        return float(abs_difference(side, o).max())
    lo, hi = torch.aminmax(w.sub_(o))
    lo, hi = float(lo), float(hi)
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def oracle_scale(oracle: Tensor, cache: dict | None = None, terms: float | None = None) -> float:
    """S, the scale errors of ``oracle`` are read on: ``max(terms, max |oracle|)`` over finite elements (1 if
    zero), ``terms`` being the error model's ``max sum |terms|`` when it has one (module docstring).

    Memoised by tensor identity in ``cache``: the first call that knows ``terms`` (a local row) sets S for every
    later one that does not (the propagated row of the same quantity).
    """
    origin = getattr(oracle, "_dd_origin", None)  # a spilled record read back (a fresh tensor): its stable key
    key = origin if origin is not None else id(oracle)
    known = cache is not None and key in cache and (origin is not None or cache[key][0] is oracle)
    if known and (terms is None or cache[key][2]):
        return cache[key][1]
    o = oracle.detach()
    scale = _abs_max(o) if o.numel() else 0.0
    if not math.isfinite(scale):
        scale = float(o.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max())
    if terms is not None and math.isfinite(terms):
        scale = max(scale, terms)
    scale = scale if scale > 0 else 1.0
    if cache is not None:
        cache[key] = (oracle if origin is None else None, scale, terms is not None)
    return scale


def _abs_max(t: Tensor) -> float:
    """max |t| in one pass without a temporary (``|t|`` of a 1.6M-element float64 tensor costs as much again);
    NaN when ``t`` holds one, as ``t.abs().max()`` would be."""
    if t.dtype == torch.bool:
        return float(t.any())
    if t.is_complex():
        return float(t.abs().max())
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi)) if not (torch.isnan(lo) or torch.isnan(hi)) else math.nan


def terms_scale(cache: dict | None, oracle: Tensor | None) -> float | None:
    """The scale of the terms a local row recorded for ``oracle`` in ``cache`` (None when none did)."""
    hit = cache.get(id(oracle)) if cache is not None and oracle is not None else None
    return hit[1] if hit is not None and hit[0] is oracle and hit[2] else None


def relative_error(side: Tensor | None, truth: Tensor | None, cache: dict | None = None, *,
                   zero_truth_exact: bool = False, terms: float | None = None) -> float:
    """max |side - truth| / S in fp64; a missing or misshapen tensor, or a NaN, is infinitely wrong.

    S is :func:`oracle_scale`: the scale of the terms (``terms``, or what a local row left in ``cache`` for
    this truth), else max |truth| (1 for an all-zero truth, so the error is then absolute). With
    ``zero_truth_exact`` and no scale of the terms, an all-zero truth must be met exactly (any difference is
    infinitely wrong): a stored float64 truth reproduced by float64 has no rounding room at zero unless its
    terms cancelled. The one relative error for torch tensors; the NumPy oracle keeps its own for arrays
    (:func:`densenet_debug.numpy_oracle.compare.relative_error`).
    """
    if truth is None and side is None:
        return 0.0
    if truth is None or side is None or tuple(side.shape) != tuple(truth.shape):
        return math.inf
    if truth.numel() == 0:
        return 0.0
    key, truth = truth, truth.detach()  # the memo is keyed by the caller's tensor, not this detached view
    err = _max_abs_difference(side, truth)
    if math.isnan(err):
        return math.inf
    if zero_truth_exact and terms is None:
        scale = float(truth.abs().max())
        if math.isnan(scale):
            return math.inf
        return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    return err / oracle_scale(key, cache, terms)


def compare(side: Tensor | None, oracle: Tensor | None, bound: Tensor | None,
            exclude: Tensor | None = None, cache: dict | None = None, terms: float | None = None, *,
            scaled: bool = True) -> Comparison:
    """Elementwise check ``|side - oracle| <= bound``; a missing or misshapen tensor fails outright.

    ``terms``: the error model's ``max sum |terms|`` for this quantity; error and tolerance are read on
    :func:`oracle_scale` with it (module docstring). NaN against NaN and equal infinities count as equal;
    any other non-finite difference fails. ``scaled=False``: a caller that reads no scale (the between
    check's bit-exact checks, thousands per diff) leaves S at 1 where the tensors are equal, a pass saved.
    """
    if oracle is None and side is None:
        return Comparison(0.0, 0.0, 0.0, ())
    if oracle is None or side is None or tuple(side.shape) != tuple(oracle.shape):
        return Comparison(math.inf, 0.0, math.inf, ())
    if oracle.numel() == 0:
        return Comparison(0.0, 0.0, 0.0, ())
    if bound is None and _bit_equal(side, oracle):
        # must be exact, and is, bit for bit (NaN never equals: it takes the path below): two passes, no widening
        return Comparison(0.0, 0.0, 0.0, (), int(exclude.sum()) if exclude is not None else 0,
                          scale=oracle_scale(oracle, cache, terms) if scaled else 1.0)
    o = oracle.detach().to("cpu", torch.float64)
    d = _scratch_difference(side, o)
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
    scale = oracle_scale(oracle, cache, terms)
    error = dmax / scale
    excluded = int(exclude.sum()) if exclude is not None else 0
    if bound is None:  # must be exact: any difference is infinitely many tolerances away
        if dmax == 0:
            return Comparison(0.0, 0.0, 0.0, (), excluded, scale=scale)
        return Comparison(error, 0.0, math.inf, _unravel(int(torch.argmax(d.reshape(-1))), d.shape), excluded,
                          scale=scale)
    b = bound.to("cpu", torch.float64)
    if dmax == 0:
        return Comparison(0.0, float(b.max()) / scale, 0.0, (), excluded, scale=scale)
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
    return Comparison(error, tolerance, worst_ratio, _unravel(worst_flat, d.shape), excluded, scale=scale)


def _bit_equal(side: Tensor, oracle: Tensor) -> bool:
    """``side`` equals ``oracle`` exactly (NaN never does): two passes, where the full comparison takes six
    (widen, subtract, abs, max, and max |oracle| for the scale). A narrower CPU side is widened into the
    scratch buffer: every float dtype embeds exactly in float64, so equality there is equality of values."""
    if side.dtype == oracle.dtype and side.device == oracle.device:
        return torch.equal(side, oracle)
    w = _widened(side, oracle)
    return w is not None and torch.equal(w, oracle.detach())  # None: the full comparison decides


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    index = []
    for n in reversed(tuple(shape)):
        flat, i = divmod(flat, n) if n else (flat, 0)
        index.append(i)
    return tuple(reversed(index))
