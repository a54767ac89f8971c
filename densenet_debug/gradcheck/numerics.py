"""Finite differences and their error model for :mod:`densenet_debug.gradcheck.engine`.

A unit is a function f(t_1 .. t_T) of its tensor inputs and parameters. Along a step parameter s the
point is t_j + s·Δ_j, with Δ_j = h_j·u_j, u_j ~ N(0, 1) elementwise, h_j = η·rms(t_j). With v the
grad_output and S(s) = <v, f(t + sΔ)>:

* D(1) = <v, f(+1) - f(-1)> / 2 and D(2) = <v, f(+2) - f(-2)> / 4 (differences first, then the
  projection: its rounding then acts on O(η) numbers). The value compared is Richardson's
  D_R = (4·D(1) - D(2)) / 3 (error O(η⁴)); the backward's side is A = Σ_j <a_j, Δ_j>.
* Tolerance of each comparison, 2·(truncation + roundoff + analytic), in S units:
  - truncation = |D(1) - D(2)| / 3, Richardson's estimate of D(1)'s O(η²) error, which bounds D_R's;
    factor 2 because it is an estimate.
  - roundoff = 1.5·σ, σ = λ·√n·ε·‖v ⊙ m‖₂: ε = 2⁻⁵³; m = max(|f|, |f(|t|)|) elementwise, the size of
    the summands (exact for sums of products: conv, linear, pool, cat), floored at its rms over the
    output (BN's outputs near 0 come from x - mean of large terms); n = the op's reduction length where
    its math is known (conv C·k·k, BN N·H·W, pools the window, ReLU / cat 1), else the unit's largest
    tensor, which bounds any; λ = 6 from the probabilistic rounding model of Higham & Mary (2019): a
    length-n sum errs by more than λ·√n·ε·Σ|terms| with probability ≤ 2n·exp(-λ²/2) ≈ 3e-8·n.
    Outputs' errors are independent, so <v, ·> adds them in quadrature; the projection's own rounding,
    λ·√N·ε·Σ|v·diff| over its N outputs, adds in quadrature too. 1.5 = (8 + 8 + 1 + 1) / 12, the
    coefficients of D_R (2 for the 3-point scheme of smooth units, see ``_joint_at``).
  - analytic = λ·ε·(√n·‖a‖·max|Δ| + 1.5·(‖a ⊙ t‖ + 2‖a‖·max|Δ|)): the fp64 backward's own rounding,
    and the rounding of t + sΔ (≤ ε·|t + sΔ| per element) seen through a. Negligible at η = 1e-4.
  Never a fixed rtol; each row carries these parts (``origin``).
* Power. A gradient error δ_j moves A by <δ_j, Δ_j> ~ N(0, h_j²‖δ_j‖²) for Gaussian u_j (a uniform
  [0, 1) u, as in torch's fast gradcheck, barely sees errors that sum to 0: permutations, offsets).
  One direction misses it with probability ≤ 0.8·2·tol / (h_j‖δ_j‖); K independent directions multiply.
  ``resolution`` is the relative error ‖δ_j‖/‖ā_j‖ missed with probability ≤ 1e-6 (worst tensor), ā_j
  below.
  Measured on BC-100 (batch 2): every tensor's resolution is ≤ 5.5e-6 (K = 3 on general and smooth
  units, K = 2 on affine ones, whose tolerances are ~100x tighter), so a 0.1 % error on one channel of
  400 (‖δ‖/‖a‖ ≈ 5e-5) is missed with probability below (5.5e-6/5e-5)^K·1e-6 < 2e-8. Tensors are checked one at a time,
  except in units with many (a concatenation of 17 features): those move together, and a tensor whose
  share of the joint signal is too small for the target is re-checked alone.
* Scale. Errors, tolerances and resolutions are read on the scale of the terms, never on a value that
  cancels: a_j = J_jᵀv sums terms v_i·J_ij, and its rounding, like a fault's visible size, lives on
  ā_j = ‖|J_j|ᵀ|v|‖ (the backward on magnitudes, :meth:`UnitFunction.term_norms`; exact sum |terms| for
  ops linear in each operand), floored at ‖a_j‖. A conv bias before a batch norm has a_j ≈ 1e-17 (BN's
  grad_input sums to 0 per channel) and ā_j = O(1): divided by ‖a_j‖ its rows read "error 1e+5,
  tolerance 1e+8, resolution 1e+10"; on ā_j they read like every other row. A row's ``scale`` is
  √Σ_j (h_j·ā_j)², the typical size of the compared directional derivative's terms; the verdict
  (err ≤ tol per direction) does not depend on it.
* Affine shortcuts. Where the unit's math makes it affine in the checked tensors (conv, linear, cat,
  pools, BN's γ and β: declared by :mod:`densenet_debug.gradcheck.batched`), truncation is zero: forward
  differences at a 100x larger step, with the claim verified on one direction (``_affine_at``).
  Piecewise-affine units (ReLU, max-pool) use central differences with an elementwise kink test.
* Kinks. Elementwise, A1 = f(+1) + f(-1) - 2f(0) and A2 = f(+2) + f(-2) - 2f(0) obey A2 = 4·A1 up to
  O(η⁴·m) and rounding (≤ 16σ_i) where f is smooth along the segment; a crossed kink breaks it by
  O(η·m). Outputs with |A2 - 4·A1| > 16σ_i + η²·m_i crossed a non-smooth point: they are masked out of v
  on both sides (the backward is replayed with the masked v) and counted. When more than half are
  masked the step shrinks 16x (up to 3 times). A unit non-smooth at every step is reported as ``kink``,
  not as a failure, unless it failed at every step. Kinks are looked for only when the plain
  comparison fails or is weaker than ``RESOLUTION_TARGET``: a crossing too small to matter is ignored.
* Op-level kinks. In units whose math is not known by type (composites, the whole model, functional or
  in-place ReLUs anywhere inside), a crossing diluted by what follows it escapes the output test above.
  Their forward is captured op by op at t and t + 2Δ_k (:mod:`densenet_debug.gradcheck.opkinks`): a
  crossed ReLU/threshold/clamp element gets a derived bound J·|g|·|z'|·(…) added to the tolerance (part
  ``kink``); a crossing without one shrinks the step below it (to ``ETA_MIN``); what remains is reported
  by op and module path, and the row is ``kink``, not ``fail``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from densenet_debug.backends import U64
from densenet_debug.gradcheck import opkinks
from densenet_debug.gradcheck.function import UnitFunction

EPS = U64                    # float64 unit roundoff
LAMBDA = 6.0                # probabilistic rounding bound, see module docstring
ETA = 1e-4                  # relative step: balances O(η²) truncation against O(ε√n/η) roundoff
ETA_SMOOTH = 3e-5           # units declared smooth (BN's input): no kinks to dodge, measured optimum
ETA_AFFINE = 1e-2           # relative step where the unit is affine in the tensor: no truncation at all
DIRECTIONS = 3              # independent Gaussian directions per check (fast mode), general path
AFFINE_DIRECTIONS = 2       # on (piecewise) affine paths, whose tolerances are 100x tighter
MISS_PROBABILITY = 1e-6     # what ``resolution`` is defined against
RESOLUTION_TARGET = 1e-5    # a weaker check looks for kinks / re-checks the weak tensor alone
JOINT_FROM = 4              # units with this many tensors (cat) move them together, else one at a time
KINK_MAX_FRACTION = 0.5     # masking more outputs than this leaves too little to compare
SHRINK, MAX_SHRINKS = 1.0 / 16.0, 3
ETA_MIN = ETA * 2.0 ** -12  # smallest step op-level kinks may force (see gradcheck.opkinks)
MAX_OP_PROBES = 4           # probes of the op-level crossings per check (each: K captured forwards)
FULL_LIMIT = 1 << 22        # Jacobian entries for full mode (32 MiB in float64)
FULL_LIMIT_NAMED = 1 << 24  # for a unit named with --layer


@dataclass
class Outcome:
    status: str
    error: float
    tolerance: float
    scale: float
    resolution: float | None
    eta: float
    directions: int
    kink_count: int = 0
    kink_fraction: float = 0.0
    origin: dict[str, float] = field(default_factory=dict)
    note: str = ""
    resolutions: list[float | None] = field(default_factory=list)  # per checked slot
    sites: dict[str, int] = field(default_factory=dict)  # op-level kinks the step crossed: label -> elements


class DirectionPool:
    """i.i.d. N(0, 1) numbers drawn once per run; every check takes fresh non-overlapping windows.

    Drawing per tensor costs more than the unit's evaluation on big activations. A window at a random
    offset is still i.i.d. Gaussian and independent of any fault, which is all the power argument uses.
    """

    def __init__(self, generator: torch.Generator, size: int = 1 << 20) -> None:
        self.gen = generator
        self._offsets = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        self._pools: dict[torch.device, Tensor] = {}
        self._size = size
        self.max_abs = 0.0

    def take(self, k: int, like: list[Tensor]) -> list[Tensor]:
        need = k * sum(t.numel() for t in like)
        device = like[0].device
        pool = self._pools.get(device)
        if pool is None or pool.numel() < 2 * need:
            self._size = max(self._size, 2 * need)
            pool = torch.randn(self._size, generator=self.gen, dtype=torch.float64).to(device)
            self._pools[device] = pool
            self.max_abs = max(self.max_abs, float(pool.abs().max()))
        start = self._offsets.randrange(pool.numel() - need + 1)
        out = []
        for t in like:
            out.append(pool[start:start + k * t.numel()].view(k, *t.shape))
            start += k * t.numel()
        return out


# -- fast mode --------------------------------------------------------------------------------------------
def check_joint(unit: UnitFunction, slots: list[int], pool: DirectionPool, directions: int = DIRECTIONS
                ) -> Outcome:
    """Fast check of ``slots`` moving together; shrinks the step while kinks spoil it (see module doc)."""
    kind = unit.affine_in(slots)
    if kind in ("affine", "piecewise"):
        k = min(directions, AFFINE_DIRECTIONS)
        o = _affine_at(unit, slots, pool, k, ETA_AFFINE if kind == "affine" else ETA, kind == "piecewise")
        if o is not None:
            return o
    eta, failed_everywhere, last = (ETA_SMOOTH if kind == "smooth" else ETA), True, None
    u = None
    if opkinks.applies(unit):
        u, eta, crossed, bounded = _avoid_op_kinks(unit, slots, pool, directions, eta)
        if crossed is not None or bounded is not None:
            return _with_op_kinks(unit, slots, pool, directions, eta, u, crossed, bounded)
    for _ in range(MAX_SHRINKS + 1):
        o = _joint_at(unit, slots, pool, directions, eta, look_for_kinks=kind != "smooth", u=u)
        if o.kink_count == 0:
            return o  # smooth along this segment: a smaller step cannot change the verdict
        if o.status == "pass" and (o.resolution is None or o.resolution <= RESOLUTION_TARGET):
            return o
        failed_everywhere &= o.status == "fail"
        last, eta = o, eta * SHRINK
    assert last is not None
    last.status = "fail" if failed_everywhere else "kink"
    last.note = "non-smooth at every step tried" + ("; fails at every step" if failed_everywhere else "")
    return last


def _avoid_op_kinks(unit: UnitFunction, slots: list[int], pool: DirectionPool, k: int, eta: float
                    ) -> tuple[list[Tensor], float, opkinks.Crossings | None, opkinks.Crossings | None]:
    """Directions, a step along them, and what it crosses among the unit's piecewise ops (gradcheck.opkinks).

    Crossings with a derived bound stay (returned 4th: their bound joins the tolerance); others shrink the
    step until none is left. Returns the crossings left when that fails (3rd: an input on a boundary, or
    a step below ``ETA_MIN``).
    """
    bases = [unit.slots[s].base for s in slots]
    u = pool.take(k, bases)
    found = None
    for _ in range(MAX_OP_PROBES):
        steps = [eta * rms(b, unit.output_scale) for b in bases]
        found = opkinks.probe(unit, slots, [ui * h for ui, h in zip(u, steps)])
        if not found.count:
            return u, eta, None, None
        if not found.unbounded:
            return u, eta, None, found
        smaller = max(eta * found.safe, ETA_MIN)
        if found.safe <= 0 or smaller >= eta:
            return u, eta, found, None
        eta = smaller
    return u, eta, found, None


def _with_op_kinks(unit: UnitFunction, slots: list[int], pool: DirectionPool, k: int, eta: float,
                   u: list[Tensor], crossed: opkinks.Crossings | None, bounded: opkinks.Crossings | None
                   ) -> Outcome:
    """The check at a step whose op-level crossings are bounded (or unavoidable).

    A bounded crossing's share of the tolerance, relative to the compared derivative, grows as the step
    (more elements cross, each by more); roundoff's share as 1/step. When the check at ``eta`` fails or is
    weaker than ``RESOLUTION_TARGET``, the step factor f = 2⁻ʲ (j ≤ 12, step ≥ ``ETA_MIN``) minimizing their
    sum is chosen and the check runs again there.
    """
    if crossed is not None:
        return _unavoidable(_joint_at(unit, slots, pool, k, eta, u=u, mask_outputs=False), crossed)
    assert bounded is not None
    o = _joint_at(unit, slots, pool, k, eta, u=u, op_bound=bounded.bound(1.0), mask_outputs=False)
    if o.scale > 0 and (o.status != "pass" or (o.resolution or 0.0) > RESOLUTION_TARGET):
        # Roundoff parts at f = 1 (relative); truncation is left out: crossed kinks pollute its estimate
        # at f = 1, and smooth truncation only shrinks (as f²) with the step.
        rest = o.origin.get("roundoff", 0.0) + o.origin.get("analytic", 0.0)
        best, best_cost = 1.0, o.tolerance
        for j in range(1, 13):
            f = 2.0 ** -j
            if eta * f < ETA_MIN:
                break
            cost = rest / f + 2 * max(bounded.bound(f)) / (o.scale * f)
            if cost < best_cost:
                best, best_cost = f, cost
        if best < 1.0:
            o = _joint_at(unit, slots, pool, k, eta * best, u=u, op_bound=bounded.bound(best), mask_outputs=False)
            count = sum(int((s < 2 * best).sum()) for terms in bounded.terms for s, _ in terms)
            o.kink_count = count
    if not o.kink_count:
        o.kink_count = bounded.count
    o.sites = dict(bounded.sites)
    names = ", ".join(f"{label} ({n})" for label, n in bounded.sites.items())
    o.note = "; ".join(filter(None, [o.note, f"op-level kinks crossed, bounded in the tolerance: {names}"]))
    return o


def _unavoidable(o: Outcome, crossed: opkinks.Crossings) -> Outcome:
    """A check whose step crosses op-level kinks it could not avoid: counted and named, never a failure."""
    o.kink_count += crossed.count
    o.sites = dict(crossed.sites)
    names = ", ".join(f"{label} ({n})" for label, n in crossed.sites.items())
    if o.status == "fail":
        o.status = "kink"
    o.note = "; ".join(filter(None, [o.note, f"step crosses op-level kinks: {names}"]))
    return o


# Central schemes: the step multiples evaluated per direction, and how the comparison combines them.
SYMMETRIC = (1.0, -1.0, 2.0, -2.0)  # general units: Richardson over h and 2h, and the kink test
ONE_SIDED = (1.0, -1.0, 2.0)        # smooth units: f(t) from the step stands in for f(t - 2h)


def _joint_at(unit: UnitFunction, slots: list[int], pool: DirectionPool, k: int, eta: float,
              look_for_kinks: bool = True, u: list[Tensor] | None = None,
              op_bound: list[float] | None = None, mask_outputs: bool = True) -> Outcome:
    """Richardson-extrapolated central differences along K directions (see the module docstring).

    Smooth units (no kinks to look for) use 3 points per direction: with f(t) known, D₁ = (S₊₁ - S₋₁)/2
    and D' = (-3S₀ + 4S₊₁ - S₊₂)/2 err by +h²S‴/6 and -h²S‴/3, so D_R = (2D₁ + D')/3 errs by O(h³)
    and |D₁ - D'|/3 estimates D₁'s error; the roundoff coefficient is 2 instead of 1.5.
    """
    scheme = SYMMETRIC if look_for_kinks else ONE_SIDED
    bases = [unit.slots[s].base for s in slots]
    steps = [eta * rms(b, unit.output_scale) for b in bases]
    deltas, stacks = [], []
    for s, b, h, ui in zip(slots, bases, steps, pool.take(k, bases) if u is None else u):
        d = ui * h  # Δ: the nominal perturbation (exact by definition; 2Δ is exact too)
        pts = unit.empty_points(s, (k, len(scheme)))
        for i, c in enumerate(scheme):
            torch.add(b, d, alpha=c, out=pts[:, i])
        deltas.append(d.reshape(k, -1))
        stacks.append(pts.flatten(0, 1))
    F = unit.evaluate(slots, stacks)
    m = unit.magnitude([f[0] for f in F])
    a_all = unit.analytic(unit.v)
    bound = [float(torch.linalg.vector_norm(a_all[s] * b)) for s, b in zip(slots, bases)]
    f0 = None if scheme is SYMMETRIC else unit.base_outputs()
    args = (F, f0, m, deltas, steps, bound, k, eta, unit.n_reduce, unit.n_forward, pool.max_abs, op_bound)
    terms = [unit.term_norms()[s] for s in slots]
    o = _compare(*args, [a_all[s] for s in slots], unit.v, terms)
    if not look_for_kinks or not mask_outputs or (
            o.status == "pass" and (o.resolution is None or o.resolution <= RESOLUTION_TARGET)):
        return o  # kinks, if any were crossed, did not matter (or were found at op level)
    mask = _kink_mask(F, unit.base_outputs(), m, unit.n_forward, eta)
    count = int(sum(int(x.sum()) for x in mask))
    if not count:
        return o
    fraction = count / max(1, sum(unit.out_numel))
    if fraction > KINK_MAX_FRACTION:
        o.status = "kink"
    else:
        vm = [None if v is None else v * ~x for v, x in zip(unit.v, mask)]
        am = unit.analytic(vm, mask)
        o = _compare(*args, [am[s] for s in slots], vm, terms)
    o.kink_count, o.kink_fraction = count, fraction
    return o


def _affine_at(unit: UnitFunction, slots: list[int], pool: DirectionPool, k: int, eta: float,
               piecewise: bool) -> Outcome | None:
    """Differences where the unit is (piecewise) affine in ``slots``; None if that fails its test.

    Affine: forward differences D_k = <v, f(t + Δ_k) - f(t)> against the shared f(t) (K + 1 points), exact
    up to rounding; the claim is tested on direction 1: <v, f(t + 2Δ₁) - f(t)> - 2·D₁ (the defect) must be
    rounding. Piecewise affine (ReLU, max-pool): central differences over t ± Δ_k (2K points); every
    output's second difference f(t + Δ_k) + f(t - Δ_k) - 2f(t) is 0 up to rounding unless the segment
    touches a kink (crossing it, or starting on it, as an input of exactly 0 does). Outputs above
    4σ_i + η²·m_i are masked out of v; the projected second difference is the defect.
    Tolerance 2·(defect/2 + √2·σ + analytic).

    Affine steps: with no truncation the only limit is rounding, so the step is at least η·rms(t) and
    large enough that the projected change h·‖a‖ is η of the projected output scale ‖v ⊙ m‖ (a zero
    bias, or a weight whose gradient cancels, would otherwise move the output by too little to measure).
    """
    bases = [unit.slots[s].base for s in slots]
    steps = [eta * rms(b, unit.output_scale) for b in bases]
    if not piecewise:
        a0 = unit.analytic(unit.v)
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(a0[s])) ** 2 for s in slots))
        if norm > 0:
            steps = [max(h, eta * unit.projected_magnitude() / norm) for h in steps]
    extra = k if piecewise else 1
    deltas, stacks = [], []
    for s, b, h, u in zip(slots, bases, steps, pool.take(k, bases)):
        d = u * h
        pts = unit.empty_points(s, (k + extra,))
        torch.add(b, d, out=pts[:k])
        torch.add(b, d[:extra], alpha=-1.0 if piecewise else 2.0, out=pts[k:])
        deltas.append(d.reshape(k, -1))
        stacks.append(pts)
    F = unit.evaluate(slots, stacks)
    f0 = unit.base_outputs()
    m = unit.magnitude([f[0] for f in F])
    unit_err = LAMBDA * math.sqrt(unit.n_forward) * EPS
    v, count = unit.v, 0
    if piecewise:
        mask = [((Fo[:k] + Fo[k:] - 2 * base).abs() > (4 * unit_err + eta * eta) * mo).any(0)
                for Fo, base, mo in zip(F, f0, m)]
        count = int(sum(int(x.sum()) for x in mask))
        if count > KINK_MAX_FRACTION * sum(unit.out_numel):
            return None
        if count:
            v = [None if g is None else g * ~x for g, x in zip(v, mask)]
        else:
            mask = None
    else:
        mask = None
    sums = torch.zeros(k + extra, dtype=torch.float64)
    vm, proj = (unit.projected_magnitude() ** 2 if v is unit.v else 0.0), 0.0
    for Fo, base, vo, mo, va in zip(F, f0, v, m, unit.abs_v()):
        if vo is None:
            continue
        vf = vo.reshape(-1)
        diff = torch.empty(Fo.shape, dtype=Fo.dtype, device=Fo.device)
        diff = torch.sub(Fo, base, out=diff).view(k + extra, -1)
        sums += (diff @ vf).cpu()
        if v is not unit.v:
            vm += float(torch.linalg.vector_norm(vf * mo.reshape(-1))) ** 2
        proj += _projection_error(diff, va) ** 2
    sigma = math.sqrt((unit_err ** 2) * vm + proj)
    if piecewise:  # S(+1) - S(0) = D + c/2, S(-1) - S(0) = -D + c/2
        numeric, defect = (sums[:k] - sums[k:]) / 2, (sums[:k] + sums[k:]).abs() / 2
    else:
        numeric, defect = sums[:k], (sums[k:] - 2 * sums[:1]).abs().expand(k) / 2
    if float(defect.max()) > 4 * sigma:  # √(4 + 1 + 1)·σ / 2 ≈ 1.2σ is what rounding alone gives
        return None
    a_all = unit.analytic(v, mask)
    a = [a_all[s] for s in slots]
    analytic = torch.zeros(k, dtype=torch.float64)
    an_sq, scale_sq, norms = 0.0, 0.0, []
    for d, aj, h, b in zip(deltas, a, steps, bases):
        af = aj.reshape(-1)
        analytic += (d @ af).cpu()
        norm = float(torch.linalg.vector_norm(af))
        norms.append(norm)
        reach = h * pool.max_abs * norm
        ax = float(torch.linalg.vector_norm(aj * b))
        an_sq += (LAMBDA * EPS * (math.sqrt(unit.n_reduce) * reach + ax + reach)) ** 2
        scale_sq += (h * norm) ** 2
    roundoff, an_err = math.sqrt(2) * sigma, math.sqrt(an_sq)
    tol = 2 * (defect + roundoff + an_err)
    o = _outcome(analytic, numeric, tol, {"truncation": 2 * defect, "roundoff": 2 * roundoff,
                                          "analytic": 2 * an_err}, scale_sq, norms, steps, k, eta,
                 [unit.term_norms()[s] for s in slots])
    o.kink_count, o.kink_fraction = count, count / max(1, sum(unit.out_numel))
    return o


def _outcome(analytic: Tensor, numeric: Tensor, tol: Tensor, parts: dict[str, float], scale_sq: float,
             norms: list[float], steps: list[float], k: int, eta: float, terms: list[float] | None = None
             ) -> Outcome:
    """Status, and error/tolerance/resolution read on the scale of the terms (module docstring, Scale).

    ``norms``: ‖a_j‖ per checked tensor; ``terms``: ‖|J_j|ᵀ|v|‖ (:meth:`UnitFunction.term_norms`), which
    replaces a norm below it, so a gradient that cancels to ~0 is measured against what it sums.
    """
    if terms:
        norms = [max(n, t) for n, t in zip(norms, terms)]
        scale_sq = sum((h * n) ** 2 for h, n in zip(steps, norms))
    err = (analytic - numeric).abs()
    ratio = torch.where(tol > 0, err / tol, torch.where(err > 0, math.inf, 0.0))
    w = int(ratio.argmax())
    scale = math.sqrt(scale_sq) or max(float(numeric.abs().max()), 1e-300)
    geo = math.exp(float(tol.clamp_min(1e-300).log().mean()))
    detect = 1.6 * geo * MISS_PROBABILITY ** (-1.0 / k)
    res = [detect / (h * n) if n > 0 else None for n, h in zip(norms, steps)]
    known = [r for r in res if r is not None]
    origin = {key: (float(v[w]) if isinstance(v, Tensor) else v) / scale for key, v in parts.items()}
    return Outcome(status="pass" if bool((ratio <= 1).all()) else "fail", error=float(err[w]) / scale,
                   tolerance=float(tol[w]) / scale, scale=scale, resolution=max(known) if known else None,
                   eta=eta, directions=k, origin=origin, resolutions=res)


def _compare(F: list[Tensor], f0: list[Tensor] | None, m: list[Tensor], deltas: list[Tensor], steps: list[float],
             bound: list[float], k: int, eta: float, n_reduce: int, n_forward: int, max_u: float,
             op_bound: list[float] | None, a: list[Tensor], v: list[Tensor | None],
             terms: list[float] | None = None) -> Outcome:
    """The K comparisons of a central scheme: SYMMETRIC when ``f0`` is None, else ONE_SIDED.

    ``op_bound``: per direction, the bound on D_R's error from crossed op-level kinks (gradcheck.opkinks);
    ``terms``: ‖|J_j|ᵀ|v|‖ per tensor, the scale the figures are read on (:func:`_outcome`).
    """
    d1 = torch.zeros(k, dtype=torch.float64)
    d2 = torch.zeros(k, dtype=torch.float64)
    vm, proj = 0.0, 0.0
    for o, (Fo, vo, mo) in enumerate(zip(F, v, m)):
        if vo is None:
            continue
        vf, va = vo.reshape(-1), vo.abs().reshape(-1)
        fk = Fo.unflatten(0, (k, -1))
        # Differences first, elementwise, then the projection: its rounding then acts on O(η) numbers.
        # Written into contiguous buffers: the points may be laid out batch-major (BN's input).
        first, second = (torch.empty((k, *Fo.shape[1:]), dtype=Fo.dtype, device=Fo.device) for _ in range(2))
        torch.sub(fk[:, 0], fk[:, 1], out=first)
        if f0 is None:
            torch.sub(fk[:, 2], fk[:, 3], out=second)
        else:
            torch.mul(fk[:, 0], 4.0, out=second)
            second.sub_(fk[:, 2]).sub_(f0[o], alpha=3.0)
        first, second = first.view(k, -1), second.view(k, -1)
        for diff, acc in ((first, d1), (second, d2)):
            acc += (diff @ vf).cpu()
            proj += _projection_error(diff, va) ** 2
        vm += float(torch.linalg.vector_norm(vf * mo.reshape(-1))) ** 2
    d1 = d1 / 2
    if f0 is None:  # D(1), D(2): Richardson (4·D(1) - D(2)) / 3; roundoff coefficients (8+8+1+1)/12
        d2, coeff = d2 / 4, 1.5
        numeric = (4 * d1 - d2) / 3
    else:  # D₁, D': (2·D₁ + D') / 3; roundoff coefficients 1/2 + 1 + 1/3 + 1/6
        d2, coeff = d2 / 2, 2.0
        numeric = (2 * d1 + d2) / 3
    unit_err = LAMBDA * math.sqrt(n_forward) * EPS
    analytic = torch.zeros(k, dtype=torch.float64)
    an_sq, scale_sq, norms = 0.0, 0.0, []
    for d, aj, h, ax in zip(deltas, a, steps, bound):
        af = aj.reshape(-1)
        analytic += (d @ af).cpu()
        norm = float(torch.linalg.vector_norm(af))
        norms.append(norm)
        reach = h * max_u * norm
        an_sq += (LAMBDA * EPS * (math.sqrt(n_reduce) * reach + 1.5 * (ax + 2 * reach))) ** 2
        scale_sq += (h * norm) ** 2
    trunc = (d1 - d2).abs() / 3
    roundoff = coeff * math.sqrt(unit_err ** 2 * vm + proj)
    an_err = math.sqrt(an_sq)
    kink = torch.tensor(op_bound if op_bound else [0.0] * k, dtype=torch.float64)
    tol = 2 * (trunc + roundoff + an_err + kink)
    parts = {"truncation": 2 * trunc, "roundoff": 2 * roundoff, "analytic": 2 * an_err}
    if op_bound:
        parts["kink"] = 2 * kink
    return _outcome(analytic, numeric, tol, parts, scale_sq, norms, steps, k, eta, terms)


def _kink_mask(F: list[Tensor], f0: list[Tensor], m: list[Tensor], n_reduce: int, eta: float) -> list[Tensor]:
    """Outputs whose second differences break A2 = 4·A1 by more than rounding (16σ) plus η²·m.

    Smooth outputs give |A2 - 4·A1| = O(η⁴·m); a crossed kink gives O(η·m), so η²·m separates the two
    with room on both sides, and rounding outliers (BN's outputs near 0) stay below it.
    """
    unit_err = LAMBDA * math.sqrt(n_reduce) * EPS
    masks = []
    for Fo, base, mo in zip(F, f0, m):
        f4 = Fo.unflatten(0, (Fo.shape[0] // 4, 4))
        a1 = f4[:, 0] + f4[:, 1] - 2 * base
        a2 = f4[:, 2] + f4[:, 3] - 2 * base
        masks.append(((a2 - 4 * a1).abs() > (16 * unit_err + eta * eta) * mo).any(0))
    return masks


# -- helpers ----------------------------------------------------------------------------------------------
def _projection_error(diff: Tensor, v_abs: Tensor) -> float:
    """Rounding of the length-n dot products <v, diff_k>: λ·√n·ε·Σ|v·diff_k|, worst k (``v_abs`` = |v|).

    Takes |diff| in place: call it last on a buffer of differences.
    """
    return LAMBDA * math.sqrt(v_abs.numel()) * EPS * float((diff.abs_() @ v_abs).max())



def rms(t: Tensor, fallback: Callable[[], float] | None = None) -> float:
    """rms(t), or ``fallback()`` (the unit's output scale) for an all-zero tensor such as a fresh bias."""
    r = float(torch.linalg.vector_norm(t)) / math.sqrt(t.numel()) if t.numel() else 0.0
    return r if r > 0 and math.isfinite(r) else (fallback() if fallback is not None else 1.0)
