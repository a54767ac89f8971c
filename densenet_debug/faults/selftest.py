"""Self-test: plant every fault of the registry, and check that the toolkit catches it where it was planted.

For each fault a fresh small DenseNet-BC is built from ``seed``, the fault is planted at an eligible unit
drawn from ``seed``, and :func:`densenet_debug.verdict.engine.diff` compares the faulty backend with the same
backend clean (both against the fp64 oracle), in the harness mode the fault needs (``steps``, ``eval``,
``memory_efficient``, pools with padding). A fault in the math (a backward inconsistent with its forward)
is also given to :func:`densenet_debug.gradcheck.engine.gradcheck_model`, in fp64. A bug must be detected and
should be localised to its unit and pass; a precision control must never be flagged.

With ``ops=True`` each planted model is also judged by the op engine
(:func:`densenet_debug.verdict.ops.judge.judge_ops`, ``diff --ops``), in the same harness mode. What it must
find is :func:`densenet_debug.faults.registry.op_sight`: a failing row at the planted unit (or inside it) at
one of the named aten ops (any op where none is named); a fault it cannot see by design is reported as
``blind`` with the reason, never counted as caught. A fault that shows from the second step on is judged on
that step: the side runs one step first, and the fault's state after it (``Fault.carried``) is where the
judged step's planting starts. The controls run as kernels below the capture
(:mod:`densenet_debug.faults.kernels`) and must be agreed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from densenet_debug.errors import UsageError
from densenet_debug.faults.registry import BUGS, CONTROLS, FAULTS, Fault, make_fault, op_sight
from densenet_debug.models import BUILDERS, build_model
from densenet_debug.verdict.report import FirstDivergence, to_json_or_none

SCHEMA = "densenet-debug/selftest/1"
DEFAULT_MODEL = "densenet-bc-16"
FULL_MODEL = "densenet-bc-100"


@dataclass
class FaultResult:
    """One planted fault and what diff (and gradcheck) made of it."""

    name: str
    control: bool
    layer: str
    passes: str
    needs: dict
    detected: bool
    localized: bool
    error: float | None
    tolerance: float | None
    verdict: str
    first_divergence: FirstDivergence | None
    gradcheck: str | None = None  # "pass" | "fail" | "nonfinite" | None (not run)
    gradcheck_layer: str | None = None
    seconds: float = 0.0
    ops: OpResult | None = None  # the op engine's verdict on the same planting (``ops=True``)

    @property
    def ok(self) -> bool:
        """A bug: diff detects it (and gradcheck fails it where it ran). A control: diff stays quiet. With the op
        engine run, its result must be as expected too (:attr:`OpResult.ok`)."""
        if self.ops is not None and not self.ops.ok:
            return False
        if self.control:
            return not self.detected
        return self.detected and self.gradcheck in (None, "fail", "nonfinite")

    def to_json(self) -> dict:
        return {
            "name": self.name, "control": self.control, "layer": self.layer, "detected": self.detected,
            "localized": self.localized, "error": _num(self.error), "tolerance": _num(self.tolerance),
            "ok": self.ok, "pass": self.passes, "needs": self.needs, "verdict": self.verdict,
            "first_divergence": to_json_or_none(self.first_divergence), "gradcheck": self.gradcheck,
            "gradcheck_layer": self.gradcheck_layer, "seconds": round(self.seconds, 3),
            "ops": self.ops.to_json() if self.ops is not None else None,
        }


@dataclass
class OpResult:
    """What the op engine made of one planting.

    ``expected``: ``"finding"`` (a bug it must find at ``want_ops``), ``"agree"`` (a control) or ``"blind"``
    (a bug it cannot see by design; ``note`` says why). ``found``: its verdict is mismatch. ``localized``: a
    failing row lies at the planted unit (or inside it) at one of ``want_ops`` (any op if empty). ``op``,
    ``kind``, ``pass_``, ``error``, ``tolerance``: that row (the first failing row when none lies there; for a
    control, its planted unit's row closest to its tolerance). ``kind``: ``value`` (the replay of an op both sides
    run differs), ``shape`` (it has another shape), ``side-only`` (an op only the side runs changes values),
    ``missing`` (an output the oracle's op has is absent) or ``nonfinite``.
    """

    expected: str
    found: bool
    localized: bool
    want_ops: tuple[str, ...]
    note: str
    op: str | None = None
    kind: str | None = None
    pass_: str | None = None
    error: float | None = None
    tolerance: float | None = None
    failing: int = 0
    steps: int = 1
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        if self.expected == "agree":
            return not self.found
        if self.expected == "blind":
            return True
        return self.found and self.localized

    def to_json(self) -> dict:
        return {"expected": self.expected, "found": self.found, "localized": self.localized, "ok": self.ok,
                "want_ops": list(self.want_ops), "op": self.op, "kind": self.kind, "pass": self.pass_,
                "error": _num(self.error), "tolerance": _num(self.tolerance), "failing": self.failing,
                "steps": self.steps, "note": self.note, "seconds": round(self.seconds, 3)}


@dataclass
class SelftestReport:
    model: str
    seed: int
    batch: int
    backend: str
    results: list[FaultResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def missed(self) -> list[str]:
        return [r.name for r in self.results if not r.control and not r.ok]

    @property
    def flagged_controls(self) -> list[str]:
        return [r.name for r in self.results if r.control and not r.ok]

    @property
    def not_localized(self) -> list[str]:
        return [r.name for r in self.results if not r.control and not r.localized]

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "passed": self.passed, "model": self.model, "seed": self.seed,
                "batch": self.batch, "backend": self.backend, "seconds": round(self.seconds, 3),
                "faults": [r.to_json() for r in self.results]}


def _num(v: float | None) -> float | str | None:
    if v is None:
        return None
    return v if v == v and abs(v) != float("inf") else str(v)


def resolve_faults(names: Sequence[str] | None) -> list[str]:
    """``None`` or ``["all"]``: every fault and control; otherwise the ``NAME[=MAG]`` given, checked."""
    if not names or list(names) == ["all"]:
        return BUGS + CONTROLS
    unknown = [n for n in names if n.partition("=")[0] not in FAULTS]
    if unknown:
        raise UsageError(f"unknown fault(s) {', '.join(unknown)}; known: all, {', '.join(FAULTS)}")
    placed = [n for n in names if "@" in n]
    if placed:
        raise UsageError(f"the self-test draws the layer itself (from --seed); drop '@...' from {placed[0]}")
    for n in names:
        make_fault(n)  # a bad magnitude fails here, before any work
    return list(dict.fromkeys(names))


def padded_pools(model: nn.Module) -> nn.Module:
    """Every 2x2/2 average pool becomes 3x3/2 with padding 1: the same output shapes, padding exercised.

    ``pool_pad_offset`` (pytorch#188344) is invisible at padding 0, and DenseNet-BC's pools have none,
    so the self-test runs it on this variant, as a user model with padded pools would run.
    """
    for parent in list(model.modules()):
        for child, m in list(parent.named_children()):
            if isinstance(m, nn.AvgPool2d) and not m.padding:
                setattr(parent, child, nn.AvgPool2d(3, m.stride or 2, padding=1))
    return model


def harness_model(name: str, fault: Fault, seed: int, in_channels: int = 3) -> nn.Module:
    """The model a fault is planted in: the builder's, in the configuration the fault needs."""
    if name not in BUILDERS:
        raise UsageError(f"unknown model {name!r} for the self-test; choose from {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    model = build_model(name, memory_efficient=bool(fault.needs.get("memory_efficient")), in_channels=in_channels)
    return padded_pools(model) if fault.needs.get("pool_padding") else model


def harness_batch(n: int, seed: int, shape: tuple[int, ...] = (3, 32, 32), classes: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def is_localized(fault: Fault, first: FirstDivergence | dict | None) -> bool:
    """The first divergence is at a planted unit (or inside a planted composite), in the fault's pass."""
    if not first:
        return False
    layer = first.get("layer") or ""
    at_unit = any(layer == u or layer.startswith(f"{u}.") for u in fault.units)
    return at_unit and first.get("pass") == fault.passes


def _control_margin(report: object, units: list[str]) -> tuple[float | None, float | None]:
    """For a control: the planted units' local row closest to its tolerance (how near a false alarm came)."""
    best = None
    for r in report.rows:
        if r.layer in units and r.mode == "local" and r.ratio_a is not None:
            if best is None or not r.ratio_a <= best.ratio_a:  # a NaN ratio is the closest call, never hidden
                best = r
    return (best.error_a, best.tolerance_a) if best is not None else (None, None)


def run_fault(
    name: str, *, model: str = DEFAULT_MODEL, seed: int = 0, batch: int = 4, backend: str = "native",
    device: str | None = None, layer: str | None = None, gradcheck: bool = True, ops: bool = False,
) -> FaultResult:
    """Plant one fault ``NAME[=MAG]`` (at ``layer``, or a unit drawn from ``seed``); run diff (and gradcheck,
    and with ``ops`` the op engine)."""
    from densenet_debug.verdict.engine import diff

    start = time.perf_counter()
    base, _, mag = name.partition("=")
    fault = make_fault(f"{base}@{layer}" if layer else base, seed=seed)
    net = harness_model(model, fault, seed)
    unit = fault.choose(net)[0]
    fault.units = [unit]
    batch = max(batch, int(fault.needs.get("min_batch", 1)))
    x, y = harness_batch(batch, seed)
    spec = f"{base}@{unit}" + (f"={mag}" if mag else "")
    report = diff(net, x, y, f"{backend}+fault:{spec}", backend, device=device)
    first = report.first_divergence
    detected = report.verdict == "mismatch"
    if first is not None:
        error, tolerance = first.get("error"), first.get("tolerance")
    else:
        error, tolerance = _control_margin(report, [unit])
    result = FaultResult(
        name, fault.control, unit, fault.passes, dict(fault.needs), detected,
        (not fault.control) and is_localized(fault, first), _float(error), _float(tolerance), report.verdict,
        first,
    )
    if gradcheck and fault.in_math:
        result.gradcheck, result.gradcheck_layer = _gradcheck(net, spec, unit, x, y, seed, fault)
    if ops:
        result.ops = run_fault_ops(net, spec, unit, x, y, seed=seed, backend=backend, device=device)
    result.seconds = time.perf_counter() - start
    return result


def run_fault_ops(net: nn.Module, spec: str, unit: str, x: Tensor, y: Tensor, *, seed: int = 0,
                  backend: str = "native", device: str | None = None) -> OpResult:
    """Judge ``net`` with fault ``spec`` (``NAME@UNIT[=MAG]``) planted, op by op; see the module docstring."""
    from densenet_debug.backends import parse_backend
    from densenet_debug.verdict.ops.judge import judge_ops

    start = time.perf_counter()
    be = parse_backend(f"{backend}+fault:{spec}", device)
    fault = be.faults[-1]
    sight = op_sight(fault.name, dict(net.named_modules())[unit])
    eval_mode = bool(fault.needs.get("eval"))
    steps = max(sight.steps, 1)
    for _ in range(steps - 1):
        _carry_one_step(net, x, y, be, eval_mode)
    report = judge_ops(net, x, y, be, eval_mode=eval_mode)
    expected = "agree" if fault.control else "blind" if sight.blind else "finding"
    failing = report.failures
    at_unit = [r for r in failing if _at(r, fault.units)]
    wanted = [r for r in at_unit if not sight.ops or _op_base(r) in sight.ops]
    wanted.sort(key=lambda r: r.pass_ != fault.passes)  # name a row in the fault's own pass where there is one
    row = (wanted or failing or [None])[0]
    if fault.control:
        row = _closest(report.rows, fault.units)
    result = OpResult(expected, report.verdict == "mismatch", bool(wanted), sight.ops, sight.blind or sight.how,
                      failing=len(failing), steps=steps)
    if row is not None:
        result.op, result.kind, result.pass_ = row.layer, _kind(row), row.pass_
        result.error, result.tolerance = _float(row.error_a), _float(row.tolerance_a)
    result.seconds = time.perf_counter() - start
    return result


def _carry_one_step(net: nn.Module, x: Tensor, y: Tensor, be: object, eval_mode: bool) -> None:
    """Run the faulty side one step and keep the fault's state: the judged step's planting starts from it."""
    import torch.nn.functional as F

    from densenet_debug.models.copies import judging_mode

    fault = be.faults[-1]
    side = judging_mode(be.prepare_model(net), eval_mode)
    with be.active():
        F.cross_entropy(side(be.prepare_input(x)), y.to(be.device)).backward()
    modules = dict(side.named_modules())
    fault.carried = {u: dict(modules[u]._fault.state) for u in fault.units}


def _at(row: object, units: list[str]) -> bool:
    """An op row of a planted unit, or of a module inside one."""
    from densenet_debug.verdict.ops.judge import module_of

    module = module_of(row)
    return any(module == u or module.startswith(f"{u}.") for u in units)


def _op_base(row: object) -> str:
    """``"block1.cat · aten.slice.Tensor"`` -> ``"slice"`` (from the row's ``op``: its label may carry `` #2`` or
    `` (this side only)``)."""
    op = getattr(row, "op", None) or (row.layer.split(" · ", 1)[1] if " · " in row.layer else "")
    return op.removeprefix("aten.").split(".")[0].split(" ")[0]


def _kind(row: object) -> str:
    if row.status == "nonfinite":
        return "nonfinite"
    if row.origin == "runs on this side only":
        return "side-only"
    if row.note.startswith("no output") or "; no output" in row.note:
        return "missing"
    return "shape" if "vs oracle (" in row.note else "value"


def _closest(rows: list, units: list[str]) -> object | None:
    """A control's op row at its planted units closest to its tolerance (a NaN ratio is the closest call)."""
    best = None
    for r in rows:
        if r.ratio_a is not None and _at(r, units):
            if best is None or not r.ratio_a <= best.ratio_a:
                best = r
    return best


def _float(v: object) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _gradcheck(net: nn.Module, spec: str, unit: str, x: Tensor, y: Tensor, seed: int,
               fault: Fault) -> tuple[str, str | None]:
    """The faulty model's planted unit, numerically, in fp64 (the check copies the model)."""
    from densenet_debug.gradcheck.engine import gradcheck_model
    from densenet_debug.verdict.nonfinite import NonFiniteOracle

    faulty = make_fault(spec, seed=seed)
    model = copy.deepcopy(net)
    faulty.apply(model)
    try:
        report = gradcheck_model(model, x.double(), y, layers=[unit], seed=seed,
                                 eval_mode=bool(fault.needs.get("eval")))
    except NonFiniteOracle:  # the fault turns the float64 step itself into NaN/Inf: never a pass
        return "nonfinite", unit
    first = report.first_failure
    return report.verdict, first.get("layer") if first else None


ProgressFn = Callable[[int, int, str], None]


def run_selftest(
    faults: Sequence[str] | None = None, model: str = DEFAULT_MODEL, seed: int = 0, *, batch: int = 4,
    backend: str | None = None, device: str | None = None, gradcheck: bool = True, ops: bool = False,
    progress: ProgressFn | None = None,
) -> SelftestReport:
    """Plant each fault (default: all, controls included) and report detection and localisation (by diff's module
    engine; with ``ops`` by the op engine too)."""
    names = resolve_faults(faults)
    if batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = backend or ("cudnn" if dev.type == "cuda" else "native")
    report = SelftestReport(model, seed, batch, backend)
    start = time.perf_counter()
    for i, name in enumerate(names):
        if progress is not None:
            progress(i, len(names), name)
        report.results.append(run_fault(name, model=model, seed=seed, batch=batch, backend=backend,
                                        device=str(dev), gradcheck=gradcheck, ops=ops))
    if progress is not None:
        progress(len(names), len(names), "")
    report.seconds = time.perf_counter() - start
    return report
