"""Full mode of the gradient checker: a unit's whole Jacobian for one tensor, element by element.

The same central differences and error model as fast mode (:mod:`densenet_debug.gradcheck.numerics`), one
input element at a time instead of along random directions: a step ``h`` that is a power of two (so t ± h and
t ± 2h are exact), Richardson's two step sizes for the truncation estimate, and the forward's and backward's
rounding bounds; outputs whose second difference shows a kink are masked.
"""

from __future__ import annotations

import math

import torch

from densenet_debug.gradcheck.function import CHUNK_BYTES, UnitFunction
from densenet_debug.gradcheck.numerics import EPS, ETA, FULL_LIMIT, KINK_MAX_FRACTION, LAMBDA, Outcome, rms


def check_full(unit: UnitFunction, slot: int, limit: int = FULL_LIMIT) -> Outcome | None:
    """Whole Jacobian of one slot, element by element; None when n_in x n_out exceeds ``limit``."""
    base = unit.slots[slot].base
    n_in, n_out = base.numel(), sum(unit.out_numel)
    if n_in * n_out > limit or max(n_in, n_out) > math.isqrt(limit) * 4:
        return None  # work grows as (n_in + n_out) x the unit's size: bound both
    h = 2.0 ** math.floor(math.log2(ETA * rms(base)))  # a power of two: t ± h, t ± 2h are exact
    analytic = unit.jacobian(slot).T.contiguous()  # (n_in, n_out)
    m = torch.cat([x.reshape(-1) for x in unit.magnitude(unit.base_outputs())])
    unit_err = LAMBDA * math.sqrt(unit.n_forward) * EPS
    back_err = LAMBDA * math.sqrt(unit.n_reduce) * EPS
    per_col = 8 * (base.numel() + n_out) * 5
    cols = max(1, min(n_in, CHUNK_BYTES // per_col))
    worst, kinks = (0.0, 0.0, 0.0, {}), 0
    failed = False
    flat = base.reshape(-1)
    for start in range(0, n_in, cols):
        idx = torch.arange(start, min(n_in, start + cols), device=base.device)
        c = len(idx)
        pts = flat.repeat(1 + 4 * c, 1)
        for j, coef in enumerate((1.0, -1.0, 2.0, -2.0)):
            rows = 1 + j + 4 * torch.arange(c, device=base.device)
            pts[rows, idx] = flat[idx] + coef * h
        d = (pts[1 + torch.arange(4 * c, device=base.device), idx.repeat_interleave(4)]
             - flat[idx].repeat_interleave(4)).view(c, 4)
        F = unit.evaluate([slot], [pts.view(1 + 4 * c, *base.shape)])
        Fm = torch.cat([x.reshape(1 + 4 * c, -1) for x in F], dim=1)
        f0, Fp = Fm[0], Fm[1:].view(c, 4, n_out)
        d1 = (Fp[:, 0] - Fp[:, 1]) / (d[:, 0] - d[:, 1])[:, None]
        d2 = (Fp[:, 2] - Fp[:, 3]) / (d[:, 2] - d[:, 3])[:, None]
        numeric = (4 * d1 - d2) / 3
        nu = ((Fp[:, 2] + Fp[:, 3] - 2 * f0) - 4 * (Fp[:, 0] + Fp[:, 1] - 2 * f0)).abs()
        kink = nu > (16 * unit_err + (h / rms(base)) ** 2) * m
        an = analytic[idx]
        tol = 2 * ((d1 - d2).abs() / 3 + 1.5 * unit_err * m / h + back_err * an.abs())
        err = (an - numeric).abs()
        ratio = torch.where(tol > 0, err / tol, torch.where(err > 0, math.inf, 0.0)).masked_fill(kink, 0.0)
        kinks += int(kink.sum())
        failed |= bool((ratio > 1).any())
        r = float(ratio.max())
        if r >= worst[0]:
            i = int(ratio.argmax())
            parts = {"truncation": 2 * float(((d1 - d2).abs() / 3).reshape(-1)[i]),
                     "roundoff": 2 * float((1.5 * unit_err * m / h).repeat(c)[i]),
                     "analytic": 2 * float((back_err * an.abs()).reshape(-1)[i])}
            worst = (r, float(err.reshape(-1)[i]), float(tol.reshape(-1)[i]), parts)
    scale = float(analytic.abs().max()) or 1.0
    fraction = kinks / (n_in * n_out)
    status = "kink" if fraction > KINK_MAX_FRACTION else ("fail" if failed else "pass")
    return Outcome(status, worst[1] / scale, worst[2] / scale, scale, None, h / rms(base), n_in, kinks, fraction,
                   {k: v / scale for k, v in worst[3].items()})
