"""Check the current PyTorch against a reference fixture, with the verdict engine's tolerances and statuses.

:func:`check_reference` loads a fixture (every integrity check of :mod:`densenet_debug.reference.format`),
rebuilds the exact model from its stored weights, rebuilds the float64 oracle (one
:class:`~densenet_debug.trace.Trace` per step) from the stored arrays and hands it to
:func:`densenet_debug.verdict.engine.judge` with the chosen backend: every unit local (teacher-forced) and
propagated, the same rows, tolerances and statuses as ``diff``. Each custom autograd Function call a fixture
stores (schema 3) is a unit too (:func:`bind_functions`; rows of mode ``function`` from
:func:`densenet_debug.verdict.functions.function_rows`, blamed before the module it ran in and before a failing
between-units row of the stored truth, :func:`explain_between_by_functions`).

With ``ops=True`` (a fixture recorded with ``record --ops``, schema 4) every aten op of the backend's first step is
judged too, teacher-forced on the fixture's stored float64 op capture (:func:`add_op_rows`, the op engine of
``diff --ops`` with the stored capture as its oracle).

A fixture stored with the ``checkpoints`` policy holds the parameter gradients, buffers, logits, loss and the
tensors between dense layers, not every intermediate tensor (see :mod:`densenet_debug.reference.record`). Its
oracle is the float64 step recomputed by this PyTorch from the stored inputs and weights, kept whole, so every
teacher-forced row compares a side's replay with the float64 result of the *same* teacher inputs. The stored
tensors are the truth that recomputation must reproduce ("reproduction" rows).

Fixtures cross machines, and float64 is not bit-exact across them (thread count, CPU kernels, oneDNN/MKL,
FMA, PyTorch release). Every bound below is derived, never tuned:

* Local rows carry the teacher's own uncertainty. The teacher (a unit's stored or recomputed record) is one
  float64 evaluation of that unit on those inputs; with ``B_side`` the side's bound and ``B_64`` the same
  error model at u = 2^-53 over the same sum|terms| magnitudes, ``|side - teacher| <= |side - exact| +
  |teacher - exact| <= B_side + B_64`` (:func:`densenet_debug.verdict.local.with_teacher`).
* Reproduction rows: the stored truth and this recomputation are two float64 runs of the same step, each
  within the verdict's propagated rule at u = 2^-53 of the exact step (the first-order sum of the float64
  local bounds upstream, :func:`_accumulated_fp64`; a later step starts from everything the earlier steps
  accumulated, since their gradients moved its weights and BN buffers), so they differ by at most twice that
  (``REPRODUCERS``). The loss adds its own rounding (:func:`_loss_tolerance`).

A float64 that rounds differently within that error model agrees; one that drifts beyond it (a changed
kernel that is wrong, a stored tensor edited by 1e-9) fails by name, as does a non-finite value anywhere.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from densenet_debug.backends import Backend, default_pair, environment, one_thread, parse_backend
from densenet_debug.capture.records import Capture
from densenet_debug.errors import UsageError
from densenet_debug.models import BUILDERS, build_model, resolve_model
from densenet_debug.models.copies import dropout_off
from densenet_debug.reference.format import Fixture, read_fixture
from densenet_debug.reference.meta import FixtureError
from densenet_debug.reference.record import model_identity, one_thread_oracle
from densenet_debug.trace import Trace
from densenet_debug.verdict.compare import relative_error, terms_scale
from densenet_debug.verdict.nonfinite import NonFiniteOracle, check_oracle, finite, where
from densenet_debug.verdict.propagated import propagated_tolerance, running_sums
from densenet_debug.verdict.replay import oracle_values
from densenet_debug.verdict.report import (
    FAILING,
    STATUS_ORDER,
    FirstDivergence,
    Row,
    Status,
    UnitKink,
    failing_ops,
    first_divergence,
    fmt,
    sortable,
    to_json_or_none,
    with_op,
)
from densenet_debug.verdict.tolerance import U64, Precision, fp64_precision

if TYPE_CHECKING:
    from densenet_debug.verdict.engine import JudgeCache

SCHEMA = "densenet-debug/check-reference/1"
REPRODUCERS = 2  # the stored truth and this recomputation: two float64 evaluations, each within the bound
REPRODUCTION_ORIGIN = ("reproduction: this PyTorch's float64 recomputation vs the stored truth; tolerance = 2 x the "
                       "verdict's propagated rule at u=2^-53 (sum of the float64 local bounds upstream, over the "
                       "same sum|terms| magnitudes): two float64s that round differently, each within it of the "
                       "exact result")


@dataclass
class ReferenceResult:
    """One backend checked against one fixture: judged rows, kinks, and the oracle's reproduction rows."""

    path: Path
    name: str
    backend: str
    verdict: str  # "agree" | "mismatch"
    first_divergence: FirstDivergence | None
    rows: list[Row]
    kinks: list[UnitKink]
    reproduction: list[Row] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    summary: str = ""
    nonfinite: list[dict] = field(default_factory=list)  # per step: where the side's first NaN/Inf was produced

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.reproduction + self.rows if r.status in FAILING]

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "fixture": str(self.path), "name": self.name, "backend": self.backend,
                "verdict": self.verdict, "first_divergence": to_json_or_none(self.first_divergence),
                "rows": [r.to_json() for r in self.rows], "kinks": [k.to_json() for k in self.kinks],
                "reproduction": [r.to_json() for r in self.reproduction], "environment": self.environment,
                "settings": self.settings, "summary": self.summary}

    def table(self, limit: int = 12) -> str:
        """Plain-text table: failing rows first, then those closest to their tolerance."""
        rows = sorted(self.reproduction + self.rows, key=lambda r: (-STATUS_ORDER.get(r.status, 0),
                                                                    -sortable(r.ratio_a)))[:limit]
        head = f"{'layer':34} {'pass':8} {'quantity':24} {'mode':12} {'error':>10} {'tolerance':>10} status"
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r.layer[:34]:34} {r.pass_:8} {r.quantity[:24]:24} {r.mode:12} {fmt(r.error_a):>10} "
                         f"{fmt(r.tolerance):>10} {r.status}")
        return "\n".join(lines)

    def message(self) -> str:
        """What a failing test prints: the first divergent layer, then the table."""
        return "\n".join([self.summary, self.table(), *self.explained()])

    def explained(self, limit: int = 4) -> list[str]:
        """One line per failing unit that a smaller failing unit explains (a module by the custom Function it
        ran, a between-units row of the stored truth by a Function in that code): what the table cannot say."""
        lines: list[str] = []
        for r in self.reproduction + self.rows:
            if r.status in FAILING and r.explained_by is not None and " · " in r.explained_by:
                line = f"{r.layer or '(model)'} ({r.pass_}, {r.mode}): {r.note or 'explained by ' + r.explained_by}"
                if line not in lines:
                    lines.append(line)
        return lines[:limit]


def default_backend(device: str | torch.device | None = None) -> str:
    """PyTorch's own default configuration on the device: ``mkldnn`` on CPU, ``cudnn`` on CUDA."""
    return default_pair(torch.device(device) if device is not None else None)[0]


# -- loading -------------------------------------------------------------------------------------------------
def load_reference(path: str | Path | Fixture, model: nn.Module | None = None, *,
                   spec: str | None = None) -> tuple[Fixture, nn.Module]:
    """The fixture and a model holding its stored weights. Nothing a fixture names is ever imported or run.

    ``model``: the caller's model (Python). ``spec``: the model a user names (``--model``): a builder name,
    ``file.py:factory`` or ``package.module:factory``, called the way the fixture records (``factory_kwargs``:
    with or without ``num_classes``). Neither: the fixture must be of one of our builders, rebuilt from
    :data:`densenet_debug.models.BUILDERS` and meta.json; a fixture of a user's model asks for ``--model``.
    Whatever the source, the model must have the recorded structure hash (and configuration, for ours), else
    :class:`FixtureError`.
    """
    fixture = path if isinstance(path, Fixture) else read_fixture(path)
    recorded = fixture.meta["model"]  # validated by read_fixture: kind, spec and factory_kwargs fit together
    where = fixture.path / "meta.json"
    kind, kwargs = recorded["kind"], recorded["factory_kwargs"]
    if model is not None:
        given = "the model given"
    elif spec is not None:
        if kind == "builder" and spec in BUILDERS and spec != recorded["spec"]:
            raise FixtureError(where, f"a fixture of model {recorded['spec']} (config {_short(recorded['config'])}), "
                                      f"not of {spec} as asked")
        model = resolve_model(spec, **(kwargs or {}))  # code the user named, never code the fixture names
        given = spec
    elif kind == "builder":
        model = build_model(recorded["spec"], **kwargs)
        given = recorded["spec"]
    else:
        raise FixtureError(where, f"a fixture of a user's model ({_described(recorded)}); a fixture never runs "
                                  f"code: pass --model {_spec_hint(recorded)} to rebuild it (its structure must "
                                  f"match the recorded one)")
    ident = model_identity(model)
    if recorded["config"] is not None and ident["config"] is not None and recorded["config"] != ident["config"]:
        diffs = {k: (recorded["config"].get(k), v) for k, v in ident["config"].items()
                 if recorded["config"].get(k) != v}
        raise FixtureError(where, f"a fixture of another configuration: recorded vs given {_short(diffs)}")
    if recorded["structure_sha256"] != ident["structure_sha256"]:
        counts = (f"; {recorded.get('num_parameters')} recorded vs {ident['num_parameters']} parameters"
                  if recorded.get("num_parameters") != ident["num_parameters"] else "")
        raise FixtureError(where, f"a fixture of another model: the structure of {given} "
                                  f"({_qualname(ident['class'])}: module names and types, parameter and buffer "
                                  f"names, shapes, dtypes) differs from the recorded {_described(recorded)}{counts}")
    model = copy.deepcopy(model).cpu()
    own = model.state_dict()
    for key, stored in fixture.state.items():  # load_state_dict would cast silently
        if key in own and stored.dtype != own[key].dtype:
            raise FixtureError(fixture.path / "state.npz", f"array {key!r} has dtype {stored.dtype}, the model's is "
                                                           f"{own[key].dtype}")
    try:
        model.load_state_dict(fixture.state)
    except RuntimeError as exc:
        raise FixtureError(fixture.path / "state.npz", f"does not fit the model: {str(exc).splitlines()[0]}") from None
    return fixture, model


def _qualname(cls: str) -> str:
    return cls.rsplit(".", 1)[-1]


def _described(recorded: dict) -> str:
    source = recorded["spec"] or "recorded from Python"
    return f"{source}, class {_qualname(recorded['class'])}"


def _spec_hint(recorded: dict) -> str:
    if recorded["kind"] == "file":
        return f"path/to/{recorded['spec']}"
    return recorded["spec"] or "FILE.py:FACTORY (a function or class returning the model, called without arguments)"


def _short(data: object, limit: int = 160) -> str:
    text = str(data)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the oracle ----------------------------------------------------------------------------------------------
def reference_oracle(fixture: Fixture, model: nn.Module) -> tuple[list[Trace], list[dict]]:
    """The fixture's float64 oracle (every quantity of every unit), and the stored tensors to reproduce.

    ``full`` fixtures hold the oracle whole (nothing is recomputed): one float64 run, self-consistent.
    Otherwise the oracle is the float64 step recomputed *by this PyTorch* from the stored inputs and weights
    (``model`` must hold them, see :func:`load_reference`), kept whole: every unit's outputs and gradients
    are then this machine's float64 result of that unit's own teacher inputs, so a teacher-forced row never
    compares a replay on recomputed inputs with outputs stored by another float64. The stored tensors are
    the truth that recomputation must reproduce: the second item maps, per step, ``(unit, quantity)`` (and
    ``("", "logits")``, ``("", "loss")``) to the stored value, for :func:`reproduction_rows`.
    """
    if fixture.complete:
        check_oracle(fixture.traces, f"the stored truth of {fixture.path}")
        bind_functions(fixture, model)
        return fixture.traces, [{} for _ in fixture.traces]
    step = fixture.meta.get("step", {})
    fresh = one_thread_oracle(model, fixture.inputs, fixture.targets, steps=int(step.get("steps", len(fixture.traces))),
                          eval_mode=step.get("bn_mode") == "eval", units=fixture.traces[0].forward_order)
    stored_values: list[dict] = []
    for stored, new, kept in zip(fixture.traces, fresh, fixture.stored):
        missing = [u for u in stored.units if u not in new.units]
        if missing:
            raise FixtureError(fixture.path / "index.json", f"unit {missing[0]} is not in the rebuilt model's trace")
        # sorted: ``kept`` holds sets, whose order changes with the string hash seed from run to run
        values = {(name, q): getattr(stored.units[name], q) for name, quantities in kept.items()
                  for q in sorted(quantities)}
        values[("", "logits")], values[("", "loss")] = stored.output, stored.loss
        _check_stored(fixture, values, len(stored_values))
        stored_values.append(values)
    return fresh, stored_values


def bind_functions(fixture: Fixture, model: nn.Module) -> None:
    """Bind the model's own custom Function classes to the calls the fixture stores (schema 3), by name.

    A fixture names each call (module path, class ``__qualname__``, occurrence) and never imports a class. One
    float64 forward of a copy of ``model`` on the stored inputs, with its Function calls recorded
    (:func:`densenet_debug.verdict.functions.recording`, no values), gives the class and the non-tensor
    arguments today's code applies under each name; the stored call then replays *that* Function on its
    stored float64 inputs and is judged against its stored outputs and gradients (mode ``function``). A stored
    call the model no longer makes under that name (or with another number of tensor inputs) stays unbound:
    its replay raises, and its row is a note saying so, never dropped. Nothing runs when the fixture stores
    no call (our DenseNets)."""
    from densenet_debug.reference.format import Unbound, calls_of
    from densenet_debug.verdict import functions
    from densenet_debug.verdict.engine import _fp64

    stored = [c for t in fixture.traces for c in calls_of(t)]
    if not stored:
        return
    ref = _fp64(model, fixture.meta["step"]["bn_mode"] == "eval")
    x = fixture.inputs.to(torch.float64) if fixture.inputs.is_floating_point() else fixture.inputs
    try:
        # (fork_rng: a dropout in the forward draws nothing from the caller's generator)
        with one_thread(), torch.random.fork_rng(devices=[]), functions.recording(ref, values=False) as recorder:
            ref(x)
        today = {c.key: c for c in recorder.calls}
    except Exception as exc:  # noqa: BLE001 - the user's forward: its calls stay unbound, each a note row
        today, raised = {}, f"the model's float64 forward raised ({type(exc).__name__}: {exc}) when binding it"
    else:
        raised = ""
    for call in stored:
        if not issubclass(call.cls, Unbound):
            continue
        found = today.get(call.key)
        if found is not None and len(found.inputs) == len(call.inputs):
            call.cls, call.template, call.kwargs = found.cls, found.template, dict(found.kwargs)
        else:
            why = ("with another number of tensor inputs" if found is not None else "under this name")
            call.cls.why = raised or f"the model's code today applies no such call {why} (module, class, occurrence)"


def explain_between_by_functions(repro: list[Row], rows: list[Row], oracle: list[Trace]) -> None:
    """A failing between-units row of the stored truth (the model's code between its units does not give the
    stored tensors) is explained by a failing custom Function that ran in that code: applied in the model's
    own forward or in a composite unit's (not inside a leaf unit, which the between check cuts out), in the
    same step, forward explaining both passes, backward the backward. The Function, the smaller unit whose
    replay on the stored inputs fails, is then the first divergence."""
    from densenet_debug.verdict import functions

    failing = [r for r in rows if r.mode == functions.MODE and r.status in FAILING]
    for r in repro:
        if r.mode != "between" or r.status not in FAILING or r.explained_by is not None:
            continue
        names = oracle[r.step].units if r.step < len(oracle) else {}
        leaves = {n for n in names if not any(o != n and (not n or o.startswith(f"{n}.")) for o in names)}
        culprits = [f for f in failing if f.step == r.step and (f.pass_ == "forward" or r.pass_ == "backward")
                    and functions.module_of(f.layer) not in leaves]
        if culprits:
            first = min(culprits, key=lambda f: (f.pass_ != "forward", f.order))
            r.explained_by = first.layer
            r.note = "; ".join(filter(None, [r.note, f"explained by failing {functions.describe(first.layer)} "
                                                     f"({first.pass_} {first.quantity})"]))


def _check_stored(fixture: Fixture, values: dict, step: int) -> None:
    """A stored tensor with a NaN/Inf is no truth: refused in one line naming it (exit 2)."""
    for (name, q), value in values.items():
        tensors = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        if not all(finite(t) for t in tensors):
            raise NonFiniteOracle(f"the stored truth of {fixture.path} is non-finite (NaN/Inf) at "
                                  f"{name or q} ({q}, step {step}): there is no finite truth to judge against")


def reproduction_rows(fixture: Fixture, oracle: list[Trace], stored: list[dict], shared: JudgeCache) -> list[Row]:
    """Stored truth vs this PyTorch's float64 recomputation, for a ``checkpoints`` fixture (else ``[]``).

    ``stored``: the second item of :func:`reference_oracle`. ``shared`` is the cache
    :func:`densenet_debug.verdict.engine.judge` filled: its per-unit error-model bounds give the float64 local
    tolerances that the propagated rule sums (see the module docstring for the bound).
    """
    if fixture.complete:
        return []
    prec = fp64_precision(shared.lam if shared.lam is not None else 8.0)
    rows, carried = [], 0.0
    for step, trace in enumerate(oracle):
        cum = _accumulated_fp64(trace, step, shared, prec, carried)
        carried = max([cum[2], *cum[0].values(), *cum[1].values()])
        for (name, q), stored_value in stored[step].items():
            if not name:
                continue
            rec = trace.units[name]
            for key, (stored_t, new_t) in _pairs(q, stored_value, getattr(rec, q)).items():
                pass_ = "forward" if q in ("outputs", "inputs", "buffers_before", "buffers_after") else "backward"
                order = rec.forward_index if pass_ == "forward" else (rec.backward_index or 0)
                tol = REPRODUCERS * propagated_tolerance(cum, pass_, order)
                rows.append(_reproduction_row(tol, step, name, pass_, key, order, stored_t, new_t,
                                              terms_scale(shared.scales, new_t)))
        if trace.units:
            last = trace.forward_order[-1]
            order = trace.units[last].forward_index
            tol_logits = REPRODUCERS * propagated_tolerance(cum, "forward", order)
            logits, loss = stored[step][("", "logits")], stored[step][("", "loss")]
            rows.append(_reproduction_row(tol_logits, step, last, "forward", "logits", order, logits, trace.output))
            rows.append(_reproduction_row(_loss_tolerance(tol_logits, logits, loss), step, "loss", "forward", "loss",
                                          order, loss, trace.loss))
    return rows


def _between_truth(fixture: Fixture, model: nn.Module, oracle: list[Trace], steps: int, eval_mode: bool) -> list[Row]:
    """The between-units check of the stored truth itself (a ``full`` fixture): the model's code between its
    units, run in float64 on the stored unit outputs and grad_inputs, must give the stored inputs and
    grad_outputs (:mod:`densenet_debug.verdict.between`; two float64s: u_side = 2^-53). A side replays today's
    code, so a change to that code in every dtype (a custom Function's backward) agrees with itself; the
    stored truth does not. A ``checkpoints`` fixture's oracle is recomputed by today's code: its reproduction
    rows see such a change instead."""
    from densenet_debug.verdict.between import between_rows
    from densenet_debug.verdict.engine import _Reference

    if not fixture.complete:
        return []
    ref = _Reference(model, eval_mode, oracle)
    rows = []
    for step in range(min(steps, len(oracle))):
        trace = oracle[step]
        rows += between_rows(step, trace.forward_order, trace, ref.module(step), fixture.inputs, fixture.targets,
                             None, torch.nn.functional.cross_entropy, who="stored truth vs the model's code")
    for r in rows:
        r.side = "reference"
    return rows


def _loss_tolerance(tol_logits: float, logits: Tensor | None, loss: Tensor | None) -> float:
    """Relative bound of the loss (cross-entropy, mean over N) from the logits' bound and its own rounding.

    d loss / d z has l1 norm <= 2 per sample (softmax - onehot) and the mean divides by N, so
    |d loss| <= 2 max |d z| = 2 tol_logits max|z|; each float64 rounds log-sum-exp over C classes, the
    subtraction and the mean with at most (C + N + 3) u (|lse| <= max|z| + log C); two float64s: twice that.
    """
    if logits is None or loss is None or loss.numel() != 1 or logits.numel() == 0:
        return tol_logits
    scale = abs(float(loss)) or 1.0
    zmax = float(logits.detach().abs().max())
    classes, batch = logits.shape[-1], logits.numel() // logits.shape[-1]
    own = REPRODUCERS * U64 * (classes + batch + 3) * (zmax + math.log(classes) + 1)
    return (2 * tol_logits * zmax + own) / scale


def _reproduction_row(tol: float, step: int, layer: str, pass_: str, quantity: str, order: int,
                      stored: Tensor | None, new: Tensor | None, terms: float | None = None) -> Row:
    """``terms``: the quantity's scale of the terms, as its local rows read it (a gradient that cancels to ~0
    is judged on its sum |terms|, like the tolerance summed for it in :func:`_accumulated_fp64`)."""
    err = relative_error(new, stored, zero_truth_exact=True, terms=terms)
    ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
    return Row(layer=layer, pass_=pass_, quantity=quantity, error_a=err, error_b=None, tolerance=tol,
               status=Status.OK if err <= tol else Status.MISMATCH, origin=REPRODUCTION_ORIGIN, step=step,
               mode="reproduction", tolerance_a=tol, ratio_a=ratio, order=order, scale=terms)


def _pairs(q: str, stored: object, recomputed: object) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """Quantity label -> (stored, recomputed): ``output``, ``grad_output``, ``grad_weight``, ``running_mean``..."""
    if isinstance(stored, dict):
        prefix = {"param_grads": "grad_", "call_param_grads": "first call:grad_", "buffers_before": "before:",
                  "buffers_after": ""}[q]
        return {f"{prefix}{k}": (v, recomputed.get(k)) for k, v in stored.items()}  # type: ignore[union-attr]
    label = q.removesuffix("s")
    many = len(stored) > 1  # type: ignore[arg-type]
    return {f"{label}.{i}" if many else label: (t, recomputed[i] if i < len(recomputed) else None)  # type: ignore
            for i, t in enumerate(stored) if t is not None}  # type: ignore[arg-type]


def _accumulated_fp64(trace: Trace, step: int, shared: JudgeCache, prec: Precision,
                      carried: float = 0.0) -> tuple[dict, dict, float]:
    """The verdict's propagated rule (:func:`densenet_debug.verdict.propagated.accumulated`) with float64 local
    tolerances.

    ``carried``: what the earlier steps accumulated (their weights and BN buffers feed this one), added first.
    """
    fwd_tol: dict[int, float] = {}
    bwd_tol: dict[int, float] = {}
    for rec in trace:
        bounds = shared.bounds.get((step, rec.name))
        if bounds is None:
            raise RuntimeError(f"no error-model bounds for {rec.name} (step {step}): run judge() first")
        truth = oracle_values(rec)
        for key in bounds.fns:
            value, bound = truth.get(key), bounds.bound(key, prec)
            if value is None or bound is None or not value.is_floating_point() or value.numel() == 0:
                continue
            # on the scale of the terms, as the local rows read it (a truth may cancel to ~0, its terms do not)
            scale = max(bounds.scale(key) or 0.0, float(value.abs().max())) or 1.0
            tol = float(torch.broadcast_to(bound, value.shape).max()) / scale
            forward = key.split(".")[0] in ("output", "buffer")
            target, order = (fwd_tol, rec.forward_index) if forward else (bwd_tol, rec.backward_index or 0)
            target[order] = max(target.get(order, 0.0), tol)
    fwd_cum, bwd_cum, total_forward = running_sums(fwd_tol, bwd_tol)
    return ({k: v + carried for k, v in fwd_cum.items()}, {k: v + carried for k, v in bwd_cum.items()},
            total_forward + carried)


# -- checking ------------------------------------------------------------------------------------------------
def check_reference(
    path: str | Path | Fixture, backend: str | None = None, *, device: str | torch.device | None = None,
    model: nn.Module | None = None, spec: str | None = None, loaded: tuple | None = None,
    shared: JudgeCache | None = None, ops: bool = False,
) -> ReferenceResult:
    """Judge ``backend`` (default: PyTorch's default on the device) against the fixture at ``path``.

    ``ops``: also teacher-force every aten op of the backend's first step on the fixture's float64 op capture
    (schema 4, recorded with ``ops=True``; :func:`add_op_rows`). A fixture without one raises
    :class:`FixtureError` (one line, exit 2).

    ``model``: a user's model to check instead of the recorded spec (same structure required; the stored
    weights are loaded into a copy). ``loaded``: ``(fixture, model, *reference_oracle(...))``, to judge
    several backends on one load; ``shared``: the judge's cache, shared across those calls.
    """
    from densenet_debug.verdict.engine import JudgeCache, judge

    if loaded is None:
        fixture, model = load_reference(path, model, spec=spec)
        oracle, recomputed = reference_oracle(fixture, model)
    else:
        fixture, model, oracle, recomputed = loaded
    if ops:
        require_ops(fixture)
    name = backend or default_backend(device)
    side = parse_backend(name, device)
    step = fixture.meta.get("step", {})
    steps, eval_mode = int(step.get("steps", len(oracle))), step.get("bn_mode") == "eval"
    needs = side.needs
    if int(needs.get("steps", 1)) > steps or (needs.get("eval") and not eval_mode):
        raise UsageError(f"backend {side.name} needs {needs} but {fixture.path} was recorded with {steps} step(s), "
                         f"BN {step.get('bn_mode')}; record a fixture with --steps/--eval for it")
    shared = JudgeCache.of(shared)
    result = judge(model, fixture.inputs, fixture.targets, side, oracle, steps=steps, eval_mode=eval_mode,
                   _shared=shared)
    repro = shared.reproduction.get(id(oracle))
    if repro is None:
        with dropout_off(model):  # as the recording oracle ran (verdict.oracle_traces): functional ones too
            between = _between_truth(fixture, model, oracle, steps, eval_mode)
        repro = reproduction_rows(fixture, oracle, recomputed, shared) + between
        shared.reproduction[id(oracle)] = repro
    rows, kinks = result.rows, result.kinks
    for k in kinks:
        k.side = "a"
    repro = [copy.copy(r) for r in repro]  # (the cached rows are shared by every backend judged on this load)
    explain_between_by_functions(repro, rows, oracle)
    failing_repro = [r for r in repro if r.status in FAILING]
    verdict = "mismatch" if failing_repro or result.failures else "agree"
    unexplained = [r for r in failing_repro if r.explained_by is None]
    if unexplained or (failing_repro and not result.failures):
        failing_repro = unexplained or failing_repro
        r = min(failing_repro, key=lambda r: (r.step, r.pass_ != "forward", r.order))
        first = FirstDivergence(layer=r.layer, pass_=r.pass_, quantity=r.quantity, error=r.error_a,
                                tolerance=r.tolerance, side="reference", step=r.step, mode=r.mode,
                                status="mismatch")
    else:
        first = first_divergence(rows)
    env = environment()
    env["flags"], env["device"] = result.flags, str(side.device)
    out = ReferenceResult(fixture.path, fixture.name, side.name, verdict, first, rows, kinks, repro, env,
                          {"steps": steps, "eval": eval_mode, "policy": fixture.meta["storage"]["policy"],
                           "units": len(result.units), "recorded_with": fixture.meta.get("provenance", {})})
    out.nonfinite = result.nonfinite
    out.summary = _summarize(out)
    if ops:
        add_op_rows(out, fixture, model, side, eval_mode)
    return out


def require_ops(fixture: Fixture) -> Capture:
    """The fixture's op capture, or :class:`FixtureError` saying it was recorded without one."""
    if fixture.ops is None:
        raise FixtureError(fixture.path / "meta.json", "recorded without an op capture (schema "
                                                       f"{fixture.meta.get('schema')}), nothing to judge op by op "
                                                       "against; re-record it with `densenet-debug record --ops` "
                                                       "(Python: ops=True), or check without --ops")
    return fixture.ops


def add_op_rows(result: ReferenceResult, fixture: Fixture, model: nn.Module, side: Backend,
                eval_mode: bool) -> ReferenceResult:
    """``result`` with the op rows of ``side``'s first step judged against the fixture's op capture.

    :func:`densenet_debug.verdict.ops.judge_ops` with the stored capture as its oracle: every aten op the side
    runs is replayed on the stored float64 inputs of the op it aligns with (by key: module path, op, occurrence,
    the forward op that created its autograd node; nothing process-specific), under the op's derived bound at the
    side's precision plus the teacher's own float64 one (two float64s that round differently agree), and an op
    the oracle never ran that changes values is a finding. As ``diff --ops`` merges them
    (:mod:`densenet_debug.verdict.ops.merge`): the rows join the result's (mode ``op``, labelled
    ``module · aten.op``), a failing one makes the verdict ``mismatch``, each unit row holding a failing op names
    it, ``first_divergence`` gains ``op``, ``settings["ops"]`` keeps the rest (matched, one-side-only ops).
    """
    from densenet_debug.verdict.ops import judge_ops
    from densenet_debug.verdict.ops.merge import roll_up
    from densenet_debug.verdict.ops.render import to_settings

    report = judge_ops(model, fixture.inputs, fixture.targets, side, oracle_capture=require_ops(fixture),
                       eval_mode=eval_mode)
    rows = sorted(report.rows, key=lambda r: r.order)
    failing = failing_ops(rows)
    roll_up(result.rows, failing)
    result.rows += rows
    result.settings["ops"] = to_settings(report)
    before = result.verdict
    result.first_divergence = with_op(result.first_divergence, result.rows)
    judged = {r.layer for r in rows if r.origin != "not replayed"}
    tail = (f"; per-op check against the fixture's op capture: {len(judged)} op call(s) compared, "
            f"{len({r.layer for r in failing})} failing")
    if failing:
        result.verdict = "mismatch"
    if before == "mismatch" or not failing:
        result.summary += tail
    else:
        r = failing[0]
        what = "non-finite (NaN/Inf where the stored float64 is finite)" if r.status == Status.NONFINITE else "wrong"
        result.summary = (f"mismatch: {result.backend} {what} at op {r.layer} ({r.pass_} {r.quantity}, teacher-forced "
                          f"op, step {r.step}): error {fmt(r.error_a)} > tolerance {fmt(r.tolerance)}"
                          f"{'; ' + r.note if r.note else ''}{tail}; unit level: {before}")
    return result


def _summarize(r: ReferenceResult) -> str:
    n_kinks = sum(k.count for k in r.kinks)
    kink_text = f"; {n_kinks} kink element(s) explained" if n_kinks else ""
    if r.verdict == "agree":
        repro = f", float64 reproduction of {len(r.reproduction)} stored tensors ok" if r.reproduction else ""
        return (f"agree: {r.backend} matches reference {r.name} at every unit "
                f"({len(r.rows)} rows{repro}){kink_text}")
    f = r.first_divergence or {}
    what = {"reproduction": "this PyTorch's float64 recomputation drifted from the stored truth",
            "between": f"the model's code between units does not reproduce the stored truth of {r.name}"}.get(
        f.get("mode"), f"{r.backend} diverges from reference {r.name}") if f.get("side") == "reference" else (
        f"{r.backend} diverges from reference {r.name}")
    if f.get("status") == Status.NONFINITE:
        firsts = "; ".join(where(n) for n in r.nonfinite) or "none"
        return (f"mismatch: {r.backend} non-finite (NaN/Inf) where reference {r.name} is finite, first at "
                f"{f.get('layer')} ({f.get('pass')} {f.get('quantity')}, {f.get('mode')}, step {f.get('step')}); "
                f"first NaN/Inf produced end to end: {firsts}{kink_text}")
    layer = f.get("layer")
    if f.get("mode") == "function":  # "custom autograd Function _Gate in gate"
        from densenet_debug.verdict.functions import describe

        layer = describe(str(layer))
    return (f"mismatch: {what} first at {layer} ({f.get('pass')} {f.get('quantity')}, {f.get('mode')}, "
            f"step {f.get('step')}): error {fmt(f.get('error'))} > tolerance {fmt(f.get('tolerance'))}{kink_text}")


