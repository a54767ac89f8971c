"""Kinks: a non-smooth op whose input lies within precision noise of a branch boundary.

ReLU-like ops and max pooling are continuous, so taking the other branch at such an element changes the
forward values by no more than the distance to the boundary; but the *gradient* through that element jumps
(ReLU passes it or not, max pooling routes it to another pixel). A backend that is right to the last bit
can therefore show large propagated gradient differences. This module finds the elements where a side took
a different branch than the fp64 oracle and builds the *counterfactual* oracle: the same fp64 values, with
the side's branch choices at exactly those elements, so a divergence can be shown to be caused by the kinks
and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Threshold)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def is_kinky(module: nn.Module) -> bool:
    """True for the ops whose branches this module can tell apart and force."""
    return isinstance(module, ELEMENTWISE + POOLS)


@dataclass
class KinkSite:
    """Where one side left the oracle's branch at one unit in one step."""

    layer: str
    step: int
    count: int
    min_margin: float  # smallest distance of the oracle's input to the boundary, at a flipped element
    relative_margin: float  # min_margin / max |oracle input|
    mask: Tensor  # flipped elements, in the op's output space
    side_branch: Tensor  # elementwise: the side's derivative; pools: the side's argmax indices


def boundaries(module: nn.Module) -> list[float]:
    if isinstance(module, nn.ReLU6):
        return [0.0, 6.0]
    if isinstance(module, nn.Hardtanh):
        return [float(module.min_val), float(module.max_val)]
    if isinstance(module, nn.Threshold):
        return [float(module.threshold)]
    return [0.0]


def derivative(module: nn.Module, x: Tensor) -> Tensor:
    """d module(x) / dx elementwise, in float64: the branch an elementwise piecewise op takes at x."""
    x = x.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        y = _call_fp64(module, x.clone())  # a clone: an in-place module (ReLU(inplace=True)) may not write a leaf
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return g


def _call_fp64(module: nn.Module, x: Tensor) -> Tensor:
    # The class's forward, not module(x): no hooks (tracing, forcing) and no planted replacement forward.
    return type(module).forward(module, x)


def _pool_args(module: nn.Module) -> dict:
    return dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                dilation=module.dilation, ceil_mode=module.ceil_mode)


def _pool_fn(module: nn.Module) -> Callable:
    return {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}[type(module)]


def pool_indices(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    out, idx = _pool_fn(module)(x.detach().to(torch.float64), return_indices=True, **_pool_args(module))
    return out, idx


def find(layer: str, step: int, module: nn.Module, oracle_x: Tensor, side_x: Tensor) -> KinkSite | None:
    """The elements where ``side_x`` falls on another branch than ``oracle_x``; None if there are none."""
    xo = oracle_x.detach().to("cpu", torch.float64)
    if tuple(xo.shape) != tuple(side_x.shape):
        return None
    if type(module) is nn.ReLU:
        # The common case, without autograd or a float64 copy of the side: the branch is the sign, and a cast to
        # float64 keeps every sign (and NaN's "not > 0"), so the side's own dtype gives the same answer.
        ds = side_x.detach().to("cpu") > 0
        mask = torch.ne(xo > 0, ds)
    else:
        xs = side_x.detach().to("cpu", torch.float64)
        if isinstance(module, POOLS):
            _, io = pool_indices(module, xo)
            _, ds = pool_indices(module, xs)
        else:
            io, ds = derivative(module, xo), derivative(module, xs)
        mask = io != ds
    if not bool(mask.any()):  # most units, most steps: one pass over each input and no more
        return None
    if isinstance(module, POOLS):
        flat = xo.flatten(2)
        top = flat.gather(2, io.flatten(2)).view_as(io)
        other = flat.gather(2, ds.flatten(2)).view_as(ds)
        margins = (top - other)[mask]
        branch = ds
    else:  # distances to the nearest boundary, at the flipped elements only
        flipped = xo[mask]
        margins = torch.stack([(flipped - b).abs() for b in boundaries(module)]).amin(0)
        branch = ds.to(torch.float64)
    m = float(margins.min())
    scale = float(xo.abs().max())
    return KinkSite(layer, step, int(mask.sum()), m, m / scale if scale > 0 else 0.0, mask, branch)


def local_mask(module: nn.Module, oracle_x: Tensor, replay_x: Tensor) -> Tensor | None:
    """Flipped elements in a teacher-forced replay (the oracle input only rounded: underflow or pool ties)."""
    site = find("", 0, module, oracle_x, replay_x)
    return None if site is None else site.mask


def forcing_hook(site: KinkSite) -> Callable:
    """A forward hook that keeps a unit's output values but routes its gradient the side's way at the kinks.

    Installed on the fp64 oracle's unit, it turns the oracle into the counterfactual oracle: every forward
    value bit-identical, the backward taking the side's branch exactly at ``site.mask``.
    """

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        mask = site.mask.to(output.device)
        if isinstance(module, POOLS):
            _, own = _pool_fn(module)(x.detach(), return_indices=True, **_pool_args(module))
            flat = x.flatten(2)
            theirs = flat.gather(2, site.side_branch.to(x.device).flatten(2)).view_as(output)[mask]
            ours = flat.gather(2, own.flatten(2)).view_as(output)[mask]
            delta = (theirs - theirs.detach()) - (ours - ours.detach())
        else:  # only the flipped elements: x - x.detach() is zero in value, one in gradient
            xm = x[mask]
            own = derivative(module, xm).to(x.dtype)
            delta = (site.side_branch.to(x.device, x.dtype)[mask] - own) * (xm - xm.detach())
        forced = output.clone()
        forced[mask] = output[mask] + delta
        return forced

    return hook
