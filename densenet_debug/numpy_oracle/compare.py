"""PyTorch float64 vs the NumPy oracle, layer by layer: ``compare_with_torch`` and its report.

Verdict rows are *local*: each unit's NumPy op is fed the inputs (and grad_outputs) PyTorch's unit saw,
so a difference is charged to the unit that makes it, and the tolerance is that op's derived rounding
bound (:mod:`densenet_debug.numpy_oracle.bounds`) — exact ops (ReLU, cat, flatten) must agree bit for bit.
The *propagated* comparison (the NumPy network run end to end on its own) is reported as a summary:
its differences accumulate along depth and can flip a ReLU near 0, so it informs but does not judge.

Any other model goes through the op-level interpreter (:mod:`densenet_debug.numpy_oracle.interpreter`,
``compare_ops``): every aten op's output teacher-forced, every parameter and input gradient end to end
against a bound carried through the NumPy reverse sweep (derived there); rows name the module and the op.
``op_level=True`` sends our DenseNets through it too. Non-finite numbers never pass (status ``nonfinite``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from densenet_debug import progress
from densenet_debug.errors import UsageError
from densenet_debug.numpy_oracle import bounds
from densenet_debug.numpy_oracle.model import NumpyTrace, UnitSpec, build_specs, numpy_forward_backward
from densenet_debug.trace import trace_step

SCHEMA = "densenet-debug/oracle/1"
FAILING = ("mismatch", "nonfinite")


@dataclass
class OracleRow:
    """One quantity of one unit: ``error`` and ``tolerance`` (relative to max|NumPy|) of its worst element."""

    layer: str
    pass_: str
    quantity: str
    error: float
    tolerance: float
    status: str
    ratio: float = 0.0
    op: str = ""  # the aten op (op-level rows); "" for unit rows and gradients of leaves
    note: str = ""  # op-level module-output gradients: the ops their gradient comes from

    def to_json(self) -> dict:
        out = asdict(self)
        out["pass"] = out.pop("pass_")
        if not np.isfinite(out["ratio"]):
            out["ratio"] = "inf"
        for k in ("error", "tolerance"):
            if not np.isfinite(out[k]):
                out[k] = None  # a non-finite value has no finite error (status says nonfinite)
        return out


@dataclass
class OracleReport:
    rows: list[OracleRow]
    propagated: dict
    environment: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        return "mismatch" if any(r.status in FAILING for r in self.rows) else "agree"

    @property
    def first_divergence(self) -> dict | None:
        """The first failing row: forward rows in forward order come before backward rows in backward order."""
        for r in self.rows:
            if r.status in FAILING:
                out = {"layer": r.layer, "pass": r.pass_, "quantity": r.quantity, "error": r.error,
                       "tolerance": r.tolerance}
                extra = {"op": r.op, "status": r.status} if r.op or r.status != "mismatch" else {}
                return {**out, **extra, **({"note": r.note} if r.note else {})}
        return None

    @property
    def modules(self) -> dict[str, dict]:
        """Rows rolled up by module path: how many, how many fail, and the worst error/tolerance."""
        out: dict[str, dict] = {}
        for r in self.rows:
            m = out.setdefault(r.layer, {"rows": 0, "failing": 0, "worst_ratio": 0.0})
            m["rows"] += 1
            m["failing"] += r.status in FAILING
            m["worst_ratio"] = max(m["worst_ratio"], r.ratio) if r.ratio == r.ratio else float("inf")
        return out

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "verdict": self.verdict, "first_divergence": self.first_divergence,
                "rows": [r.to_json() for r in self.rows], "kinks": self.propagated.get("kinks", []),
                "propagated": self.propagated, "environment": self.environment,
                "modules": {k: {**v, "worst_ratio": v["worst_ratio"] if np.isfinite(v["worst_ratio"]) else "inf"}
                            for k, v in self.modules.items()},
                "seconds": round(self.seconds, 3)}


@progress.stage("oracle: PyTorch float64 vs NumPy float64")
def compare_with_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, train: bool | None = None,
                       op_level: bool | None = None) -> OracleReport:
    """One float64 step of ``model`` in PyTorch and in NumPy, compared unit by unit (our DenseNets) or op by op.

    ``train`` defaults to the model's mode. ``op_level`` (default: any model but our DenseNets) runs the
    op-level interpreter. Raises UsageError for models the oracle cannot run (an op without a NumPy rule).
    """
    if op_level or (op_level is None and not _is_our_densenet(model)):
        return compare_ops(model, x, y, train=train)
    config = _config_of(model)
    start = time.perf_counter()
    train = model.training if train is None else train
    specs = build_specs(config)
    model64 = copy.deepcopy(model).to(torch.float64).train(train)
    state = {k: v.detach().cpu().numpy().copy() for k, v in model64.state_dict().items()}
    device = next(model64.parameters()).device
    x64 = x.to(device=device, dtype=torch.float64)
    trace = trace_step(model64, x64, y.to(device), to_cpu=True)
    missing = [s.name for s in specs if s.name not in trace]
    if missing:
        raise UsageError(f"model does not have the DenseNet structure its config describes (no unit {missing[0]})")
    xn, yn = x64.cpu().numpy(), y.cpu().numpy()
    rows_f, rows_b = [], []
    for spec in specs:
        f, b = _local_rows(spec, trace[spec.name], state, train)
        rows_f += f
        rows_b.append((trace[spec.name].backward_index, b))
    logits = trace["head.fc"].outputs[0].numpy()
    loss = bounds.cross_entropy(logits, yn)
    torch_loss = {"loss": np.array(float(trace.loss)), "grad_logits": trace["head.fc"].grad_outputs[0].numpy()}
    rows_f.append(_row("(loss)", "forward", "loss", torch_loss["loss"], *loss["loss"]))
    rows = rows_f + [_row("(loss)", "backward", "grad_logits", torch_loss["grad_logits"], *loss["grad_logits"])]
    rows += [r for _, b in sorted(rows_b, key=lambda t: (t[0] is None, t[0] or 0)) for r in b]
    ours = numpy_forward_backward(state, config, xn, yn, train=train)
    env = {"torch": torch.__version__, "numpy": np.__version__, "device": str(device), "train": train,
           "batch": int(x.shape[0])}
    return OracleReport(rows, _propagated(specs, trace, ours), env, time.perf_counter() - start)


def compare_ops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, train: bool | None = None) -> OracleReport:
    """PyTorch float64 (CPU) vs the NumPy op-level interpreter: every op's output, every gradient."""
    from densenet_debug.numpy_oracle.interpreter import interpret

    start = time.perf_counter()
    train = model.training if train is None else train
    got = interpret(model, x, y, train=train)
    rows_f = sorted((c for c in got.comparisons if c.pass_ == "forward"), key=lambda c: c.index)
    rows_b = sorted((c for c in got.comparisons if c.pass_ == "backward"), key=lambda c: c.index)
    rows = []
    for c in rows_f + rows_b:
        row = _row(c.layer, c.pass_, c.quantity, c.theirs, c.ours, c.bound, c.scale)
        row.op, row.note = c.op, c.note
        rows.append(row)
    rel = abs(got.loss_numpy_own - got.loss_torch) / max(abs(got.loss_torch), np.finfo(float).tiny)
    propagated = {"max_relative_forward": rel, "worst_forward": "(loss) NumPy's own end-to-end forward",
                  "max_relative_backward": None, "worst_backward": None, "kinks": [],
                  "ops": dict(sorted(got.ops.items())), "modules": got.modules, "notes": got.notes}
    env = {"torch": torch.__version__, "numpy": np.__version__, "device": "cpu", "train": train,
           "batch": int(x.shape[0]), "engine": "op-level interpreter"}
    return OracleReport(rows, propagated, env, time.perf_counter() - start)


def _is_our_densenet(model: nn.Module) -> bool:
    from densenet_debug.models import DenseNet

    return isinstance(model, DenseNet) and isinstance(getattr(model, "config", None), dict)


def _config_of(model: nn.Module) -> dict:
    from densenet_debug.models import DenseNet

    if not isinstance(model, DenseNet) or not isinstance(getattr(model, "config", None), dict):
        raise UsageError(f"the NumPy oracle runs only densenet_debug's DenseNet family, not {type(model).__name__}")
    return model.config


def _local_rows(spec: UnitSpec, rec, state: dict[str, np.ndarray], train: bool
                ) -> tuple[list[OracleRow], list[OracleRow]]:
    xs = [t.numpy() for t in rec.inputs]
    gy = rec.grad_outputs[0].numpy() if rec.grad_outputs and rec.grad_outputs[0] is not None else None
    gy = np.zeros_like(rec.outputs[0].numpy()) if gy is None else gy
    p = spec.name
    if spec.op == "conv":
        got = bounds.conv(xs[0], state[f"{p}.weight"], gy, spec.attrs["stride"], spec.attrs["padding"])
    elif spec.op == "linear":
        got = bounds.linear(xs[0], state[f"{p}.weight"], state[f"{p}.bias"], gy)
    elif spec.op == "bn":
        got = bounds.batch_norm(xs[0], state[f"{p}.weight"], state[f"{p}.bias"], state[f"{p}.running_mean"],
                                state[f"{p}.running_var"], gy, train)
    elif spec.op == "relu":
        got = bounds.relu(xs[0], gy)
    elif spec.op == "cat":
        got = bounds.concat(xs, gy)
    elif spec.op == "avgpool":
        got = bounds.avg_pool(xs[0], spec.attrs["k"], gy)
    elif spec.op == "gap":
        got = bounds.global_avg_pool(xs[0], gy)
    else:
        got = bounds.flatten(xs[0], gy)
    theirs: dict[str, np.ndarray | None] = {"output": rec.outputs[0].numpy()}
    for i, g in enumerate(rec.grad_inputs):
        theirs["grad_input" if spec.op != "cat" else f"grad_input{i}"] = None if g is None else g.numpy()
    for k, g in rec.param_grads.items():
        theirs[f"grad_{k}"] = g.numpy()
    for k, b in rec.buffers_after.items():
        if k in ("running_mean", "running_var"):
            theirs[k] = b.numpy()
    forward, backward = [], []
    for quantity, (value, bound) in got.items():
        if theirs.get(quantity) is None:
            continue  # not computed in the step (the image's gradient)
        pass_ = "forward" if quantity in ("output", "running_mean", "running_var") else "backward"
        (forward if pass_ == "forward" else backward).append(_row(p, pass_, quantity, theirs[quantity], value, bound))
    return forward, backward


def _row(layer: str, pass_: str, quantity: str, theirs: np.ndarray, ours: np.ndarray, bound: np.ndarray,
         scale: float | None = None) -> OracleRow:
    """The worst element's error and tolerance, relative to ``scale`` (default max|NumPy|; op-level gradients
    pass the size of their terms, Σ|terms|, so a gradient that cancels to ~0 reads like any other)."""
    theirs, ours, bound = (np.asarray(theirs, dtype=np.float64), np.asarray(ours, dtype=np.float64),
                           np.asarray(bound, dtype=np.float64))
    if not (np.isfinite(theirs).all() and np.isfinite(ours).all() and np.isfinite(bound).all()):
        return OracleRow(layer, pass_, quantity, float("nan"), float("nan"), "nonfinite", float("inf"))
    diff = np.abs(theirs - ours)
    ratio = np.where(bound > 0, diff / np.where(bound > 0, bound, 1.0), np.where(diff > 0, np.inf, 0.0))
    i = int(np.argmax(ratio)) if ratio.size else 0
    scale = max(scale or 0.0, float(np.abs(ours).max()) if ours.size else 0.0)
    scale = scale if scale > 0 else 1.0
    worst = float(ratio.reshape(-1)[i]) if ratio.size else 0.0
    # Error and tolerance of the same element, the one closest to (or furthest past) its bound.
    return OracleRow(layer, pass_, quantity, float(diff.reshape(-1)[i]) / scale if diff.size else 0.0,
                     float(np.asarray(bound).reshape(-1)[i]) / scale if ratio.size else 0.0,
                     "mismatch" if worst > 1 else "ok", worst)


def _propagated(specs: list[UnitSpec], trace, ours: NumpyTrace) -> dict:
    """Largest relative difference (max|Δ| / max|NumPy|) of every quantity, and ReLU inputs whose sign flipped."""
    worst = {"forward": (0.0, None), "backward": (0.0, None)}
    kinks = []
    for spec in specs:
        rec, mine = trace[spec.name], ours[spec.name]
        pairs = [("forward", "output", rec.outputs[0], mine.outputs[0])]
        pairs += [("backward", f"grad_input{i}", g, m) for i, (g, m) in enumerate(zip(rec.grad_inputs,
                                                                                       mine.grad_inputs))]
        pairs += [("backward", f"grad_{k}", g, mine.param_grads[k]) for k, g in rec.param_grads.items()]
        for pass_, q, t, m in pairs:
            if t is None:
                continue
            rel = relative_error(t.numpy(), m)
            if rel >= worst[pass_][0]:
                worst[pass_] = (rel, f"{spec.name} {q}")
        if spec.op == "relu":
            flips = int(((rec.inputs[0].numpy() > 0) != (mine.inputs[0] > 0)).sum())
            if flips:
                kinks.append({"layer": spec.name, "count": flips,
                              "min_margin": float(np.abs(mine.inputs[0][(rec.inputs[0].numpy() > 0)
                                                                        != (mine.inputs[0] > 0)]).min())})
    return {"max_relative_forward": worst["forward"][0], "worst_forward": worst["forward"][1],
            "max_relative_backward": worst["backward"][0], "worst_backward": worst["backward"][1],
            "loss": ours.loss, "kinks": kinks}


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (0 when both are 0)."""
    scale = float(np.abs(b).max()) if b.size else 0.0
    diff = float(np.abs(a - b).max()) if b.size else 0.0
    return diff / scale if scale > 0 else diff
