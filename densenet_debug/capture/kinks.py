"""Kink sites at op level: elements of piecewise ops within a margin of a branch boundary.

A ReLU written as ``F.relu`` inside a composite, or a max-pool window with a near tie, can take the other
branch under a rounding difference; the gradient then differs by a whole term, which is a kink, not a
wrong backend. Module-level detection only sees kinky *modules*; at op level every piecewise op is visible
wherever it is written. This module only measures distances to the boundary from captured values (capture
with ``values=True``); deciding what a kink explains is the judge's job.

Distance to the boundary per op (``x`` the op's input as it was before any in-place write):

- relu, leaky_relu, abs and their backward: ``|x|``; threshold / threshold_backward: ``|x - threshold|``.
  ReLU's backward is ``threshold_backward(grad, result, 0)``: the result is 0 on the whole negative side, so
  its distance is taken from the forward op that created its node (the pre-activation) when captured.
- clamp / clamp_min / clamp_max / hardtanh (and backward), with scalar bounds: distance to the nearer bound
- hardsigmoid / hardswish (and backward): ``relu6(x + 3)`` inside, distance to the nearer of -3 and 3
- max_pool2d_with_indices (and backward): per window, the gap between its largest and second largest value
- comparisons (gt/lt/ge/le/eq/ne, the condition of a ``where``): ``|a - b|``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from densenet_debug.capture.records import Capture, Key, OpRecord


@dataclass(frozen=True)
class KinkSite:
    """The elements of one piecewise op call within ``margin`` of a branch boundary."""

    key: Key
    op: str
    module: str
    phase: str
    count: int
    total: int
    closest: float
    indices: Tensor  # flat indices into the distance tensor (input elements, or max-pool windows)


def _base(op: str) -> str:
    """``aten.relu_.default`` -> ``relu``: the op without overload and in-place suffix."""
    name = op.split(".")[1] if op.startswith("aten.") else op
    return name.rstrip("_")


def _input(r: OpRecord, i: int) -> Tensor | None:
    values = r.input_values or []
    return values[i] if i < len(values) else None


def _abs_of(i: int) -> Callable[[OpRecord], Tensor | None]:
    def distance(r: OpRecord) -> Tensor | None:
        x = _input(r, i)
        return None if x is None else x.abs()
    return distance


def _threshold(i: int) -> Callable[[OpRecord], Tensor | None]:
    def distance(r: OpRecord) -> Tensor | None:
        x = _input(r, i)
        return None if x is None else (x - float(r.argument("threshold", 0.0))).abs()  # type: ignore[arg-type]
    return distance


def _bounds(i: int, lo: str, hi: str) -> Callable[[OpRecord], Tensor | None]:
    def distance(r: OpRecord) -> Tensor | None:
        x = _input(r, i)
        if x is None:
            return None
        bounds = [b for b in (r.argument(lo), r.argument(hi)) if isinstance(b, (int, float))]
        if not bounds:
            return None
        return torch.stack([(x - float(b)).abs() for b in bounds]).amin(0)
    return distance


def _fixed(i: int, *bounds: float) -> Callable[[OpRecord], Tensor | None]:
    """Distance to the nearer of fixed boundaries (hardsigmoid and hardswish: ``relu6(x + 3)``, kinks at -3, 3)."""
    def distance(r: OpRecord) -> Tensor | None:
        x = _input(r, i)
        return None if x is None else torch.stack([(x - b).abs() for b in bounds]).amin(0)
    return distance


def _comparison(r: OpRecord) -> Tensor | None:
    a = _input(r, 0)
    if a is None:
        return None
    b = _input(r, 1)
    other = b if b is not None else r.argument("other")
    return None if not isinstance(other, (Tensor, int, float)) else (a - other).abs()


def _max_pool_gap(i: int) -> Callable[[OpRecord], Tensor | None]:
    def distance(r: OpRecord) -> Tensor | None:
        x = _input(r, i)
        if x is None or x.dim() != 4 or r.argument("ceil_mode", False):
            return None
        k = r.argument("kernel_size")
        s = r.argument("stride") or k
        p, d = r.argument("padding", (0, 0)), r.argument("dilation", (1, 1))
        pair = [v if isinstance(v, tuple) and len(v) == 2 else (v[0], v[0]) if isinstance(v, tuple) else (v, v)
                for v in (k, s, p, d)]
        (kh, kw), stride, (ph, pw), dil = pair
        if kh * kw < 2:
            return None
        n, c, h, w = x.shape
        padded = F.pad(x.reshape(n * c, 1, h, w), (pw, pw, ph, ph), value=-torch.inf)
        windows = F.unfold(padded, (kh, kw), dilation=dil, stride=stride)  # (n*c, kh*kw, L)
        top = windows.topk(2, dim=1).values
        return (top[:, 0] - top[:, 1]).reshape(-1)
    return distance


_DISTANCE: dict[str, Callable[[OpRecord], Tensor | None]] = {
    "relu": _abs_of(0), "abs": _abs_of(0), "leaky_relu": _abs_of(0), "leaky_relu_backward": _abs_of(1),
    "threshold": _threshold(0), "threshold_backward": _threshold(1),
    "clamp": _bounds(0, "min", "max"), "clamp_min": _bounds(0, "min", "min"), "clamp_max": _bounds(0, "max", "max"),
    "hardtanh": _bounds(0, "min_val", "max_val"), "hardtanh_backward": _bounds(1, "min_val", "max_val"),
    "max_pool2d_with_indices": _max_pool_gap(0), "max_pool2d_with_indices_backward": _max_pool_gap(1),
    "hardsigmoid": _fixed(0, -3.0, 3.0), "hardsigmoid_backward": _fixed(1, -3.0, 3.0),
    "hardswish": _fixed(0, -3.0, 3.0), "hardswish_backward": _fixed(1, -3.0, 3.0),
    **{cmp: _comparison for cmp in ("gt", "lt", "ge", "le", "eq", "ne")},
}

PIECEWISE = frozenset(_DISTANCE)


def distance_to_kink(record: OpRecord) -> Tensor | None:
    """Per element (or max-pool window), the distance of ``record``'s input to its op's branch boundary."""
    rule = _DISTANCE.get(_base(record.op))
    return None if rule is None else rule(record)


def kink_sites(capture: Capture, margin: float) -> list[KinkSite]:
    """Every piecewise op call with at least one element within ``margin`` of a boundary, in run order.

    Needs a capture with values. A site's ``indices`` index the flattened distance tensor.
    """
    sites = []
    forward = {r.key: r for r in capture.records if r.phase == "forward"}
    for r in capture.records:
        creator = forward.get(r.creator) if r.creator is not None else None
        use_creator = creator is not None and _base(r.op) == "threshold_backward" and _base(creator.op) in (
            "relu", "threshold")
        dist = distance_to_kink(creator if use_creator else r)
        if dist is None or dist.numel() == 0:
            continue
        flat = dist.detach().reshape(-1).double()
        near = torch.nonzero(flat <= margin).reshape(-1)
        if near.numel():
            sites.append(KinkSite(key=r.key, op=r.op, module=r.module, phase=r.phase, count=int(near.numel()),
                                  total=int(flat.numel()), closest=float(flat.min()), indices=near))
    return sites


def _signed_relu(r: OpRecord) -> Tensor | None:
    return _input(r, 0)


def _signed_threshold(r: OpRecord) -> Tensor | None:
    x = _input(r, 0)
    return None if x is None else x - float(r.argument("threshold", 0.0))  # type: ignore[arg-type]


def _signed_bounds(lo: str, hi: str) -> Callable[[OpRecord], Tensor | None]:
    def coordinate(r: OpRecord) -> Tensor | None:
        x = _input(r, 0)
        bounds = [b for b in (r.argument(lo), r.argument(hi)) if isinstance(b, (int, float))]
        return None if x is None or not bounds else torch.stack([x - float(b) for b in bounds])
    return coordinate


def _signed_fixed(*bounds: float) -> Callable[[OpRecord], Tensor | None]:
    def coordinate(r: OpRecord) -> Tensor | None:
        x = _input(r, 0)
        return None if x is None else torch.stack([x - b for b in bounds])
    return coordinate


def _signed_comparison(r: OpRecord) -> Tensor | None:
    a, b = _input(r, 0), _input(r, 1)
    other = b if b is not None else r.argument("other")
    return None if a is None or not isinstance(other, (Tensor, int, float)) else a - other


_SIGNED: dict[str, Callable[[OpRecord], Tensor | None]] = {
    "relu": _signed_relu, "abs": _signed_relu, "leaky_relu": _signed_relu, "threshold": _signed_threshold,
    "clamp": _signed_bounds("min", "max"), "clamp_min": _signed_bounds("min", "min"),
    "clamp_max": _signed_bounds("max", "max"), "hardtanh": _signed_bounds("min_val", "max_val"),
    "hardsigmoid": _signed_fixed(-3.0, 3.0), "hardswish": _signed_fixed(-3.0, 3.0),
    **{cmp: _signed_comparison for cmp in ("gt", "lt", "ge", "le", "eq", "ne")},
}


def signed_coordinate(record: OpRecord) -> Tensor | None:
    """For a forward piecewise op, a tensor whose elements' signs say which branch each input is on.

    Zero on a boundary, so a branch is crossed between two evaluations exactly where a sign differs, and
    ``distance_to_kink`` is its absolute value. Clamp-like ops stack one coordinate per bound. None for ops
    without one (max-pool: compare the argmax indices, ``output_values[1]``) or without captured values.
    """
    rule = _SIGNED.get(_base(record.op))
    return None if rule is None else rule(record)
