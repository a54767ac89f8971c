"""Op-level kinks for the finite differences of :mod:`densenet_debug.gradcheck.numerics`.

A unit whose math this package does not know (a composite whose ``forward`` calls ``F.relu``, a module that
runs in-place ReLUs, the whole model) may hold piecewise ops anywhere inside it. The output-side kink test
(A2 = 4·A1) misses a crossing that is diluted by what follows it (one ReLU input of thousands, then a mean
and a linear layer): its O(η·m) signature sinks under η²·m, yet it moves <v, f> by more than the
tolerance. So the unit's forward is captured at op level (:func:`densenet_debug.capture.capture` with
values) at the unperturbed point and at the end t + 2Δ_k of every direction (both ends t ± 2Δ_k where a
max-pool is inside), and every piecewise op is compared branch by branch
(:func:`densenet_debug.capture.kinks.signed_coordinate`, max-pool's argmax indices):

- with z the signed coordinate, z(s) = z(0) + s·z' + O(s²η²), z' = (z(2) - z(0))/2 from one capture at
  t + 2Δ_k, the branch is crossed at |s*| = |z(0)|/|z'|, within the step's points iff |s*| < 2 (the
  segment is straight up to O(η²), so its ends see every crossing in between); max-pool's argmax indices
  are compared at both ends t ± 2Δ_k;
- where a crossing cannot be bounded (below), the step scaled by f = |s*|_min / 2 / 2 (a factor 2 for the
  neglected curvature) crosses none. Max-pool ties have no coordinate: the step shrinks by
  ``INDEX_SHRINK`` and the probe is repeated.

A crossing is then bounded, not avoided, where the unit's own float64 backward (for the step's v, captured
once) names g_i = ∂<v, f>/∂y_i, the gradient at the op's output y (``threshold_backward``'s and
``hardtanh_backward``'s incoming gradient). Across its boundary the op's slope jumps by J (1 for ReLU,
threshold, clamp), so S(s) leaves its smooth extension by at most J·|g_i|·|z'_i|·(|s| - |s*_i|)₊ (to first
order: downstream of y the unit is smooth along the segment). D(1) halves that at s = ±1, D(2) quarters it
at ±2, and D_R = (4·D(1) - D(2))/3 errs by at most
Σ_i J·|g_i|·|z'_i|·(2·(1 - |s*_i|)₊ + (2 - |s*_i|)₊/4)/3 per direction, which joins the tolerance (part
``kink``, doubled like the others). A planted error larger than that bound is still caught at the unit's step.

Crossings without a bound (a max-pool argmax, an op without a gradient rule here, an op whose key the
probe does not find) shrink the step until none crosses, down to ``ETA_MIN`` (below it the O(ε√n/η)
roundoff alone exceeds ~1e-5 of the compared derivative on the largest units). What cannot be avoided
(an input exactly on a boundary that the step moves) is reported: the unit's row becomes ``kink`` if it
fails, never ``fail``, and names the ops (``dense.1 · aten.relu``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from densenet_debug.capture import capture
from densenet_debug.capture.kinks import PIECEWISE, signed_coordinate
from densenet_debug.capture.records import Key, OpRecord
from densenet_debug.gradcheck.batched import known
from densenet_debug.gradcheck.function import UnitFunction

MULTIPLES = (2.0, -2.0)  # the extreme points of the central schemes (SYMMETRIC, ONE_SIDED: ±2 covers both)
INDEX_SHRINK = 1.0 / 16.0  # a max-pool argmax that changed: the next step to probe


@dataclass
class Crossings:
    """Elements of the unit's piecewise ops whose branch differs somewhere along the step."""

    sites: dict[str, int] = field(default_factory=dict)  # "module · aten.op" -> elements crossed
    safe: float = 1.0  # step factor under which no unbounded crossing is left (0: none helps)
    terms: list[list[tuple[Tensor, Tensor]]] = field(default_factory=list)  # per direction: (|s*|, J·|g|·|z'|)
    unbounded: int = 0  # crossed elements without a bound (no gradient rule, a max-pool argmax)

    def bound(self, f: float = 1.0) -> list[float]:
        """Per direction, the bound on D_R's error (S units) at the step scaled by ``f`` ≤ 1.

        At factor f, z' scales by f and an element crosses at |s*|/f: f·Σ w·share(|s*|/f) (module docstring).
        """
        return [f * sum(float((w * _share(s / f)).sum()) for s, w in terms) for terms in self.terms]

    @property
    def count(self) -> int:
        return sum(self.sites.values())


def applies(unit: UnitFunction) -> bool:
    """Units whose ops the checker does not know by type: their piecewise ops are found by capture."""
    return bool(unit.kwargs) or not known(unit.module)


def _branch(r: OpRecord) -> tuple[str, Tensor] | None:
    """("signed", z) or ("index", argmax) for a forward piecewise op record with values."""
    z = signed_coordinate(r)
    if z is not None:
        return "signed", z.detach().double()
    if r.op.startswith("aten.max_pool") and r.output_values and len(r.output_values) > 1:
        idx = r.output_values[1]
        return None if idx is None else ("index", idx)
    return None


def _is_piecewise(op: str) -> bool:
    """``aten.relu_.default`` -> relu is piecewise: only such ops' values are kept (a branch reads its own)."""
    return op.split(".")[1].rstrip("_") in PIECEWISE


def _piecewise(unit: UnitFunction, tensors: list[Tensor]) -> dict[Key, tuple[str, str, Tensor]]:
    """Key -> (label, kind, branch tensor) of every piecewise forward op of the unit at ``tensors``."""
    with torch.no_grad(), unit._rng(), capture(unit.module, values=_is_piecewise) as cap:
        unit.call(tensors, functional=False)
    out = {}
    for r in cap.records:
        if r.phase != "forward" or not _is_piecewise(r.op):
            continue
        b = _branch(r)
        if b is not None:
            module = ".".join(p for p in (unit.name, r.module) if p)
            out[r.key] = (f"{module or '(model)'} · {r.op.rsplit('.', 1)[0]}", *b)
    return out


def base_sites(unit: UnitFunction) -> dict[Key, tuple[str, str, Tensor]]:
    """The unit's piecewise ops at the unperturbed point (captured once per unit)."""
    cached = getattr(unit, "_op_kinks_base", None)
    if cached is None:
        cached = _piecewise(unit, [s.base for s in unit.slots])
        unit._op_kinks_base = cached  # type: ignore[attr-defined]
    return cached


# Backward ops that hand the gradient of a piecewise op's output through: (input index of that gradient,
# the jump of the op's slope across its boundary).
_GRAD_OF_OUTPUT = {"threshold_backward": (0, 1.0), "hardtanh_backward": (0, 1.0)}


def output_grads(unit: UnitFunction) -> dict[Key, tuple[Tensor, float]]:
    """Forward key -> (g, J): the gradient of <v, f> with respect to the piecewise op's output, and its slope
    jump, from the unit's own float64 backward for v (captured once per unit; ops without a rule absent)."""
    cached = getattr(unit, "_op_kinks_grads", None)
    if cached is not None:
        return cached
    cached = {}
    if base_sites(unit):
        with capture(unit.module, values=True) as cap:
            leaves, outs = unit._replay_forward()
            pairs = [(o, g) for o, g in zip(outs, unit.v) if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        for r in cap.records:
            rule = _GRAD_OF_OUTPUT.get(r.op.split(".")[1] if r.op.startswith("aten.") else "")
            if r.phase == "backward" and rule is not None and r.creator is not None and r.input_values:
                g = r.input_values[rule[0]]
                if g is not None:
                    cached[r.creator] = (g.detach().double(), rule[1])
    unit._op_kinks_grads = cached  # type: ignore[attr-defined]
    return cached


def probe(unit: UnitFunction, slots: list[int], deltas: list[Tensor]) -> Crossings:
    """Crossings of the unit's piecewise ops along t + sΔ_k, |s| ≤ 2 (``deltas[i]``: (K, *shape)).

    Signed coordinates are captured at s = +2 only: z' = (z(2) - z(0))/2, and the element crosses within
    |s| ≤ 2 iff |z(0)| < 2·|z'| (1 % margin for the O(η²) curvature). Argmax indices need both ends.
    """
    base = base_sites(unit)
    found = Crossings()
    if not base:
        return found
    k = deltas[0].shape[0]
    grads = output_grads(unit)
    found.terms = [[] for _ in range(k)]
    ends = MULTIPLES if any(kind == "index" for _, kind, _ in base.values()) else MULTIPLES[:1]
    for j in range(k):
        for c in ends:
            tensors = [s.base for s in unit.slots]
            for s, d in zip(slots, deltas):
                tensors[s] = unit.slots[s].base + c * d[j].view_as(unit.slots[s].base)
            moved = _piecewise(unit, tensors)
            for key, (label, kind, b0) in base.items():
                m = moved.get(key)
                if m is None or m[1] != kind or m[2].shape != b0.shape or (kind == "signed" and c != ends[0]):
                    continue
                crossed = _crossed(kind, b0, m[2], c)
                n = int(crossed.sum())
                if n:
                    found.sites[label] = max(found.sites.get(label, 0), n)
                    g = grads.get(key)
                    if kind == "signed" and g is not None and g[0].numel() == b0.numel():
                        found.terms[j].append(_terms(b0, m[2], c, g[0], g[1], crossed))
                    else:  # only these shrink the step: bounded crossings may stay
                        found.unbounded += n
                        found.safe = min(found.safe, _safe(kind, b0, m[2], c, n))
    return found


def _terms(z0: Tensor, z1: Tensor, c: float, g: Tensor, jump: float, crossed: Tensor) -> tuple[Tensor, Tensor]:
    """(|s*|, J·|g|·|z'|) of the crossed elements of one op along one direction."""
    slope = ((z1 - z0) / c)[crossed].abs()
    return z0[crossed].abs() / slope, g.reshape(z0.shape)[crossed].abs() * jump * slope


def _share(s_star: Tensor) -> Tensor:
    """How much of a crossing at |s*| reaches D_R: (4·(1 - |s*|)₊/2 + (2 - |s*|)₊/4)/3."""
    return (2 * (1 - s_star).clamp_min(0) + (2 - s_star).clamp_min(0) / 4) / 3


def _crossed(kind: str, b0: Tensor, b1: Tensor, c: float) -> Tensor:
    if kind == "index":
        return b0 != b1
    reach = max(abs(m) for m in MULTIPLES) * (b1 - b0).abs() / abs(c)  # |z'|·max|s|
    return b0.abs() < 1.01 * reach


def _safe(kind: str, z0: Tensor, z1: Tensor, c: float, crossed: int) -> float:
    """Step factor under which no element of this op crosses (see the module docstring)."""
    if kind == "index":  # no coordinate to extrapolate: shrink by a fixed factor and probe again
        return 1.0 if not crossed else INDEX_SHRINK
    slope = (z1 - z0).abs() / abs(c)
    moving = slope > 0
    if not bool(moving.any()):
        return 1.0
    s_star = float((z0.abs()[moving] / slope[moving]).min())
    return min(1.0, s_star / max(abs(m) for m in MULTIPLES) / 2)
