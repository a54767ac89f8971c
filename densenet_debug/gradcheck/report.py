"""Rows, kinks and the verdict of a numerical gradient check; the JSON contract ``densenet-debug/gradcheck/1``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

SCHEMA = "densenet-debug/gradcheck/1"
STATUSES = ("pass", "fail", "kink", "skip", "nonfinite")
FAILING = ("fail", "nonfinite")  # a NaN/Inf error or tolerance is never "within tolerance"


@dataclass
class GradRow:
    """One comparison of a unit's backward against finite differences.

    ``error`` and ``tolerance`` are relative to ``scale``, the typical size of the *terms* of the compared
    directional derivative (``h·‖|J|ᵀ|v|‖``, never a gradient that cancels to ~0: see
    :mod:`densenet_debug.gradcheck.numerics`, Scale), so rows of different units read alike; ``origin``
    splits the tolerance into its parts. ``resolution`` is the smallest gradient error, relative to the
    scale of that tensor's gradient terms (``‖delta‖ / ‖|J|ᵀ|v|‖``, at least ``‖grad‖``), that this row
    detects with probability at least 1 - 1e-6; None in full mode, where every element is compared.
    """

    layer: str
    tensor: str
    error: float
    tolerance: float
    status: str  # one of STATUSES
    mode: str = "fast"
    scale: float = 0.0
    resolution: float | None = None
    step: float = 0.0
    directions: int = 0
    kinks: int = 0
    culprit: bool = False
    origin: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("error", "tolerance", "scale", "resolution", "step"):
            if isinstance(out[key], float) and not math.isfinite(out[key]):
                out[key] = str(out[key])
        return out


@dataclass
class Kink:
    """Outputs (or, for ``ops``, elements of piecewise ops inside the unit) whose finite differences crossed a
    non-smooth point (ReLU at 0, a max-pool tie ...)."""

    layer: str
    tensor: str
    count: int
    fraction: float
    step: float
    resolved: bool
    ops: list[str] = field(default_factory=list)  # op-level kinks crossed, "module · aten.op": "dense.1 · aten.relu"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class GradcheckReport:
    """Every row of a check; ``verdict`` is ``fail`` when any unit fails, ``first_failure`` names the culprit."""

    rows: list[GradRow]
    kinks: list[Kink]
    mode: str
    units: list[str]
    seconds: float = 0.0
    environment: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "fail" if any(r.status in FAILING for r in self.rows) else "pass"

    @property
    def failures(self) -> list[GradRow]:
        return [r for r in self.rows if r.status in FAILING]

    @property
    def first_failure(self) -> dict | None:
        """The first culprit in row order (rows follow backward order): ``{"layer", "tensor"}``."""
        for row in self.rows:
            if row.status in FAILING and row.culprit:
                return {"layer": row.layer, "tensor": row.tensor}
        return None

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "verdict": self.verdict,
            "first_failure": self.first_failure,
            "mode": self.mode,
            "units": len(self.units),
            "seconds": round(self.seconds, 3),
            "rows": [r.to_json() for r in self.rows],
            "kinks": [k.to_json() for k in self.kinks],
            "environment": self.environment,
        }


def mark_culprits(rows: Sequence[GradRow]) -> None:
    """A failing unit is a culprit unless a unit inside it fails too (then the inner one explains it).

    Composites (modules with their own functional ops and children) are checked whole; when one fails while
    every unit inside it passes, the code in its own ``forward`` is to blame and it is the culprit. A custom
    Function called in a module's forward (row ``module · Function``) is inside that module.
    """
    failing = {r.layer for r in rows if r.status in FAILING}
    for row in rows:
        if row.status not in FAILING:
            row.culprit = False
            continue
        prefix = f"{row.layer}." if row.layer else ""
        inner = [u for u in failing if u != row.layer and (u.startswith(prefix) or u.startswith(f"{row.layer} · "))]
        row.culprit = not inner
        if inner and not row.note:
            row.note = f"explained by failing unit {sorted(inner)[0]}"
