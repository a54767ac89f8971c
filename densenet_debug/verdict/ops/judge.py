"""Per-op teacher forcing: every aten op a side ran, replayed on the fp64 oracle's inputs to that op.

One way, as the capture notes sketch it: **capture** (the oracle's float64 step and the side's step, every aten
op with layouts and values, :mod:`densenet_debug.capture`) -> **align** -> **judge** -> rows.

Align. :func:`densenet_debug.capture.align` joins the two streams by key. A custom ``autograd.Function`` on one
side only (a planted fault's conv) names its backward node differently, so what is left is joined a second
time by ``(phase, module, op, k-th such op among the unmatched)``. Ops that still match nothing are listed,
never dropped: an op only the oracle ran, and an op only the side ran, judged by what it does to values
(creating values, moving them unchanged or a view inside its input are glue; anything else is a finding).

Judge. For each matched pair the side's op overload runs, under the side's flags (:meth:`Backend.active`,
autocast off: the side's casts are ops of their own), on the oracle's inputs to the op, each cast to the dtype
the side's op received and placed in the side's exact layout (size, stride, storage offset) in a storage as
large as the side's, the rest NaN (:func:`~densenet_debug.verdict.ops.replay.in_layout`). A #708-style
non-contiguous gradient is thus exactly what the replayed backward op receives, and a kernel that reads outside
its view returns NaN. Side-only glue in the same autograd node (a same-shape ``as_strided`` before the
backward conv, as in the planted ``strided_read_as_contiguous``) is replayed in front of its consumer on the
oracle's input, so what it does to the values is charged to that op. Each output is compared with the oracle's
under the op's derived bound (:mod:`densenet_debug.verdict.ops.errors`) at the side's precision plus the
teacher's own float64 one; non-finite values never pass.

Kinks. Replayed on the oracle's own inputs, a piecewise op can only take another branch where rounding the
input to the side's dtype moves it across the boundary (a ReLU result that underflows, a tie made in a max-pool
window): exactly those elements are left out of the comparison and counted. Where the side's *own* run took
the other branch (its input and the oracle's straddle a boundary) is listed per op in ``OpReport.kinks`` for
the propagated stage to explain; it is no error of the op.

Rows. One per op output, ``mode="op"``, ``op`` the overload, ``layer`` ``module · op`` named after the oracle's
call (`` #k`` for its k-th call of that op in that module, forward and backward counted together) so both
sides' rows of one oracle op carry one label, ``order`` its place in the oracle's op stream (forward before
backward); an op run on one side only is labelled `` (this side only)`` and placed after the matched op the side
ran before it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from densenet_debug.backends import Backend, one_thread, parse_backend, running_unit, unit_roundoff
from densenet_debug.capture import Capture, OpRecord, align, capture
from densenet_debug.capture.kinks import signed_coordinate
from densenet_debug.capture.records import OUTSIDE, TensorLayout
from densenet_debug.errors import UsageError
from densenet_debug.models.copies import dropout_off_for, fp64_copy, judging_mode
from densenet_debug.verdict.compare import Comparison, compare
from densenet_debug.verdict.local import precision
from densenet_debug.verdict.ops.errors import EXACT, OpModel, base_name, op_model
from densenet_debug.verdict.ops.replay import Unreplayable, in_layout, rebuild_call, storage_numel
from densenet_debug.verdict.report import FAILING, STATUS_ORDER, Row, Status, sortable, unit_of
from densenet_debug.verdict.tolerance import UnitBounds, confidence, fp64_precision, underflow

SCHEMA = "densenet-debug/ops/1"
LossFn = Callable[[Tensor, Tensor], Tensor]
RANDOM = frozenset({"bernoulli", "bernoulli_", "native_dropout", "rand", "randn", "rand_like", "randn_like",
                    "normal", "normal_", "uniform_", "randint", "randperm", "multinomial", "exponential_"})
_QUANTITIES = {
    "convolution_backward": ("grad_input", "grad_weight", "grad_bias"),
    "native_batch_norm": ("output", "save_mean", "save_invstd"),
    "native_batch_norm_backward": ("grad_input", "grad_weight", "grad_bias"),
    "max_pool2d_with_indices": ("output", "indices"),
    "nll_loss_forward": ("output", "total_weight"),
}
_CREATION = frozenset({"empty", "zeros", "ones", "full", "new_zeros", "new_ones", "new_full", "new_empty",
                       "empty_like", "zeros_like", "ones_like", "full_like", "arange", "scalar_tensor", "empty_strided",
                       "new_empty_strided", "zero_", "fill_"})


@dataclass(frozen=True)
class OpKink:
    """Elements where the side's own run and the oracle put a piecewise op's input on different branches."""

    unit: str
    count: int
    total: int

    def to_json(self) -> dict:
        return {"unit": self.unit, "count": self.count, "total": self.total}


@dataclass(frozen=True)
class Unmatched:
    """An op that ran on one side only, and what it did (``verdict``: glue, folded, finding, not judged)."""

    unit: str
    side: str  # "oracle" | "side"
    phase: str
    verdict: str
    note: str = ""

    def to_json(self) -> dict:
        return {"unit": self.unit, "side": self.side, "phase": self.phase, "verdict": self.verdict, "note": self.note}


@dataclass
class OpReport:
    """What :func:`judge_ops` finds for one backend: a row per compared op output (``mode="op"``)."""

    backend: str
    rows: list[Row]
    unmatched: list[Unmatched]
    kinks: list[OpKink]
    matched: int
    second_pass_matched: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status in FAILING]

    @property
    def verdict(self) -> str:
        return "mismatch" if self.failures else "agree"

    def worst(self, n: int = 15) -> list[Row]:
        """Failing rows first, then the rows closest to their tolerance."""
        return sorted(self.rows, key=lambda r: (-STATUS_ORDER[r.status], -sortable(r.worst_ratio)))[:n]

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "backend": self.backend, "verdict": self.verdict, "matched": self.matched,
                "second_pass_matched": self.second_pass_matched, "rows": [r.to_json() for r in self.rows],
                "modules": [r.to_json() for r in rollup(self.rows)],
                "unmatched": [u.to_json() for u in self.unmatched], "kinks": [k.to_json() for k in self.kinks],
                "skipped": dict(self.skipped), "seconds": dict(self.seconds)}


def module_of(row: Row) -> str:
    """The module path of an op row (``"block1.layer01.conv2 · aten.convolution · output"`` -> its first part)."""
    return unit_of(row.layer)


def rollup(rows: list[Row]) -> list[Row]:
    """One row per (module, pass): the worst op row's figures, status the worst, the op named in ``note``."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((module_of(r), r.pass_), []).append(r)
    out = []
    for (module, pass_), members in groups.items():
        worst = max(members, key=lambda r: (STATUS_ORDER[r.status], sortable(r.worst_ratio)))
        failing = sum(r.status in FAILING for r in members)
        op = worst.layer.split(" · ", 1)[1] if " · " in worst.layer else worst.layer
        out.append(Row(layer=module, pass_=pass_, quantity="ops", error_a=worst.error_a, error_b=None,
                       tolerance=worst.tolerance, status=worst.status, origin=worst.origin, mode="module",
                       side=worst.side, tolerance_a=worst.tolerance_a, ratio_a=worst.ratio_a, worst_a=worst.worst_a,
                       order=min(r.order for r in members),
                       note=f"{len(members)} op outputs, {failing} failing; worst {op} · {worst.quantity}"))
    return sorted(out, key=lambda r: r.order)


# -- capture ------------------------------------------------------------------------------------------------
def _step(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Capture:
    model.zero_grad(set_to_none=True)  # an existing .grad turns AccumulateGrad's detach into add_
    x = x.detach().requires_grad_(False)
    with capture(model, values=True) as cap:
        loss_fn(model(x), y).backward()
    return cap


@dropout_off_for
def oracle_capture(model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: LossFn = F.cross_entropy,
                   eval_mode: bool = False) -> Capture:
    """The float64 CPU step with every op's values: the truth each side's ops are replayed against."""
    ref = judging_mode(fp64_copy(model, "cpu"), eval_mode)
    target = y.detach().to("cpu", torch.float64) if y.is_floating_point() else y.detach().cpu()
    with one_thread():
        return _step(ref, x.detach().to("cpu", torch.float64), target, loss_fn)


@dropout_off_for
def side_capture(model: nn.Module, x: Tensor, y: Tensor, backend: Backend, *, loss_fn: LossFn = F.cross_entropy,
                 eval_mode: bool = False, prepared: nn.Module | None = None) -> Capture:
    """The side's step (its conversion, faults and flags) with every op's values. ``prepared``: the side's
    model as ``backend.prepare_model`` made it at an earlier step and kept (its state carries over, as a
    training run's does); else it is prepared from ``model`` here."""
    side = judging_mode(prepared if prepared is not None else backend.prepare_model(model), eval_mode)
    target = y.detach().to(backend.device, backend.param_dtype) if y.is_floating_point() else y.to(backend.device)
    with backend.active():
        return _step(side, backend.prepare_input(x.detach()), target, loss_fn)


# -- align --------------------------------------------------------------------------------------------------
def _second_key(r: OpRecord, counts: dict) -> tuple:
    base = (r.phase, r.module, r.op, len(r.input_layouts))
    k = counts.get(base, 0)
    counts[base] = k + 1
    return (*base, k)


def match(oracle: Capture, side: Capture) -> tuple[list[tuple[OpRecord, OpRecord]], list[OpRecord], list[OpRecord],
                                                    int]:
    """Pairs (oracle, side) in the side's run order, the oracle-only and side-only ops, and how many pairs the
    second pass (by module, op and occurrence among the unmatched) found."""
    al = align(oracle, side)
    pairs = list(al.pairs)
    o_counts: dict = {}
    left = {_second_key(r, o_counts): r for r in al.only_a}
    s_counts: dict = {}
    only_side, second = [], 0
    for r in al.only_b:
        key = _second_key(r, s_counts)
        twin = left.pop(key, None)
        if twin is None:
            only_side.append(r)
        else:
            pairs.append((twin, r))
            second += 1
    matched_oracle = {id(o) for o, _ in pairs}
    only_oracle = [r for r in al.only_a if id(r) not in matched_oracle]
    pairs.sort(key=lambda p: p[1].index)
    return pairs, only_oracle, only_side, second


# -- judge --------------------------------------------------------------------------------------------------
def _op_label(op: str) -> str:
    return op.removesuffix(".default")


def _unit(r: OpRecord) -> str:
    return f"{r.module or '(model)'} · {_op_label(r.op)}"


def _labels(records: list[OpRecord], suffix: str = "") -> dict[int, str]:
    """Each record's row label: ``module · op``, then `` #2``, `` #3`` ... for the later calls of the same op in
    the same module (forward and backward counted together), so that a row names one call and both sides'
    rows of one oracle op share a label (how :func:`~densenet_debug.verdict.report.merge_sides` pairs them)."""
    seen: dict[str, int] = {}
    out = {}
    for r in records:
        base = _unit(r) + suffix
        k = seen[base] = seen.get(base, 0) + 1
        out[r.index] = base if k == 1 else f"{base} #{k}"
    return out


def _place(row: Row, label: str, order: int, op: str) -> Row:
    """An op row as the report keeps it: its call's label, its place in the oracle's op stream, its op."""
    row.layer, row.order, row.op = label, order, _op_label(op)
    return row


def _quantity(op: str, i: int, n: int) -> str:
    names = _QUANTITIES.get(base_name(op))
    if names and i < len(names):
        return names[i]
    return "output" if n == 1 else f"output.{i}"


def _pass(r: OpRecord) -> str:
    return "forward" if r.phase == "forward" else "backward"


def _finite(t: Tensor) -> bool:
    """No NaN/Inf in ``t``: one float64 sum (NaN or Inf propagate; a float64 sum of float32 values cannot
    overflow), cheaper than ``isfinite().all()`` on every op output."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return math.isfinite(float(t.sum(dtype=torch.float64)))


def _float(t: Tensor) -> Tensor:
    return t if t.is_floating_point() else t.to(torch.float64)


def _same_view(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and a.storage_offset() == b.storage_offset() and tuple(a.shape) == tuple(b.shape)
                and tuple(a.stride()) == tuple(b.stride()) and a.dtype == b.dtype)
    except (RuntimeError, NotImplementedError):
        return False


EMPTY = "uninitialised output (empty)"  # a skip with nothing to judge (an allocation), not a gap in the check


class _Judge:
    """Replays one side's ops; holds the side's flags, precision inputs and the run's confidence factor."""

    def __init__(self, backend: Backend, lam: float) -> None:
        self.backend, self.lam = backend, lam
        self.skipped: dict[str, int] = {}
        self.folded: dict[int, str] = {}  # side-only glue record index -> the consumer it was replayed in front of

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    # -- building the side's inputs from the oracle's ------------------------------------------------------
    def inputs(self, o: OpRecord, s: OpRecord, glue: dict[int, list[OpRecord]],
               fill: float = math.nan) -> tuple[list[Tensor], list[str], list[Tensor]]:
        """The oracle's inputs to ``o`` in ``s``'s dtypes and layouts (through side-only glue where it fed ``s``),
        notes, and the tensors each glue chain started from (a value that passed through bfloat16 carries
        bfloat16's rounding, whatever dtype the op received it in)."""
        if o.input_values is None or s.input_values is None:
            raise Unreplayable("captured without values")
        if len(o.input_values) != len(s.input_layouts):
            raise Unreplayable(f"{len(o.input_values)} oracle vs {len(s.input_layouts)} side tensor arguments")
        tensors, notes, starts = [], [], []
        for j, layout in enumerate(s.input_layouts):
            value = o.input_values[j]
            if value is None:
                raise Unreplayable(f"oracle input {j} has no value")
            chain = self._glue_chain(s, j, glue)
            if chain:
                start, through = self._through(value, chain, fill)
                tensors.append(through)
                starts.append(start)
                notes.append(f"input {j} through side-only {', '.join(_op_label(g.op) for g in chain)}")
                for g in chain:
                    self.folded[g.index] = _unit(s)
            else:
                tensors.append(in_layout(value, layout, storage_numel(s.input_values[j], layout), self.backend.device,
                                         fill))
        return tensors, notes, starts

    def _glue_chain(self, s: OpRecord, j: int, glue: dict[int, list[OpRecord]]) -> list[OpRecord]:
        """Side-only, same-shape, one-input ops of ``s``'s node (or forward module) that produced its input j."""
        group = glue.get(_group(s), [])
        chain: list[OpRecord] = []
        want = s.input_values[j] if s.input_values else None
        while want is not None:
            producer = next((g for g in reversed(group) if g.index < s.index and g.output_values
                             and _same_view(g.output_values[0], want)), None)
            if producer is None or any(producer is c for c in chain):
                break
            chain.insert(0, producer)
            want = producer.input_values[0] if producer.input_values else None
        return chain

    def _through(self, value: Tensor, chain: list[OpRecord], fill: float) -> tuple[Tensor, Tensor]:
        first = chain[0]
        layout = first.input_layouts[0]
        start = t = in_layout(value, layout, storage_numel(first.input_values[0], layout), self.backend.device, fill)
        for g in chain:
            t = tree_leaves(rebuild_call(g, [t]).run())[0]
        return start, t

    # -- one matched op ------------------------------------------------------------------------------------
    def pair(self, o: OpRecord, s: OpRecord, glue: dict[int, list[OpRecord]]) -> list[Row]:
        name = base_name(s.op)
        if name in RANDOM or name.rstrip("_") in RANDOM:
            self.skip("random op (a replay would draw new numbers)")
            return []
        if not any(v is not None for v in (o.output_values or [])):
            self.skip(EMPTY)
            return []
        try:
            tensors, notes, starts = self.inputs(o, s, glue)
            outs = self._run(s, tensors)
            if any(v is not None and not _finite(v) for v in outs) and all(
                    v is None or _finite(v) for v in o.output_values):
                # NaN where the oracle is finite: did it come from the NaN around the views? Zero there instead.
                again = self._run(s, self.inputs(o, s, glue, fill=0.0)[0])
                if all(v is None or _finite(v) for v in again):
                    notes.append("the op read memory outside the views it was given (NaN there in the replay): "
                                 "a #708-style read")
            o_call = rebuild_call(o, [v.clone() if v is not None and i in o.written else v
                                      for i, v in enumerate(o.input_values)])
            model = op_model(o_call.func, o_call.args, o_call.kwargs, list(o.output_values))
        except (Unreplayable, RuntimeError, TypeError, ValueError, IndexError) as exc:
            return [self._unreplayable(s, str(exc).splitlines()[0][:200])]
        rows = []
        n = len(o.output_values)
        for i, oracle_out in enumerate(o.output_values):
            if oracle_out is None or model.bounds[i:i + 1] == [None]:
                continue
            side_out = outs[i] if i < len(outs) else None
            rows.append(self._row(o, s, i, n, side_out, oracle_out, model, tensors, notes, tensors + starts))
        return rows

    def _run(self, s: OpRecord, tensors: list[Tensor]) -> list[Tensor | None]:
        # running_unit: the op is the unit's, so a fault planted there as a kernel computes it (faults.kernels)
        with torch.no_grad(), torch.autocast(self.backend.device.type, enabled=False), running_unit(s.module):
            return [t if isinstance(t, Tensor) else None for t in tree_leaves(rebuild_call(s, tensors).run())]

    def _unreplayable(self, s: OpRecord, why: str) -> Row:
        self.skip("not replayable")
        return Row(layer=_unit(s), pass_=_pass(s), quantity="output", error_a=None, error_b=None, tolerance=0.0,
                   status=Status.OK, origin="not replayed", mode="op", order=s.index, note=f"not replayed: {why}")

    def _precision(self, s: OpRecord, model: OpModel, side_out: Tensor | None, tensors: list[Tensor]):  # noqa: ANN202
        bounds = UnitBounds(matmul=model.matmul)
        p = precision(self.backend, s.module, bounds, side_out, tensors, self.lam)
        return p.plus(fp64_precision(self.lam))

    def _row(self, o: OpRecord, s: OpRecord, i: int, n: int, side_out: Tensor | None, oracle_out: Tensor,
             model: OpModel, tensors: list[Tensor], notes: list[str], operands: list[Tensor]) -> Row:
        quantity = _quantity(s.op, i, n)
        bound_spec = model.bounds[i] if i < len(model.bounds) else None
        origin = model.origin + (" [generic]" if model.generic else "")
        note = list(notes)
        exclude = self._kinks(o, s, i, side_out, oracle_out, tensors) if side_out is not None else None
        if side_out is None or tuple(side_out.shape) != tuple(oracle_out.shape):
            comp_status, comp = Status.MISMATCH, compare(None if side_out is None else _float(side_out),
                                                         _float(oracle_out), None)
            note.append("no output" if side_out is None else f"shape {tuple(side_out.shape)} vs oracle "
                                                              f"{tuple(oracle_out.shape)}")
        else:
            comp = self._compare(s, side_out, oracle_out, bound_spec, model, operands, exclude)
            comp_status = Status.OK if comp.ok else Status.MISMATCH
            if comp.ok and comp.excluded:
                full = self._compare(s, side_out, oracle_out, bound_spec, model, operands, None)
                if not full.ok:
                    comp_status = Status.KINK
                    note.append(f"{comp.excluded} element(s) whose input rounds across a branch boundary")
            if not _finite(side_out) or not _finite(oracle_out):
                comp_status = Status.NONFINITE
                note.append("NaN/Inf where the fp64 oracle is finite" if _finite(oracle_out) else
                            "non-finite in the oracle too")
        return Row(layer=_unit(s), pass_=_pass(s), quantity=quantity, error_a=comp.error, error_b=None,
                   tolerance=comp.tolerance, status=comp_status, origin=origin, mode="op",
                   side="a" if comp_status != Status.OK else None, tolerance_a=comp.tolerance, ratio_a=comp.ratio,
                   worst_a=comp.worst or None, order=s.index, note="; ".join(note))

    def _compare(self, s: OpRecord, side_out: Tensor, oracle_out: Tensor, spec: object, model: OpModel,
                 tensors: list[Tensor], exclude: Tensor | None):  # noqa: ANN202
        if not side_out.is_floating_point() or spec == EXACT:
            floats = [t.dtype for t in tensors if t.is_floating_point()]
            expected = oracle_out.to(side_out.dtype) if side_out.is_floating_point() else oracle_out
            if not side_out.is_floating_point() or all(d == side_out.dtype for d in floats):
                if torch.equal(side_out, expected.to(side_out.device)):  # the common case, one pass, no copies
                    return Comparison(0.0, 0.0, 0.0, ())
                return compare(_float(side_out), _float(expected), None, exclude)
            u = max(unit_roundoff(d) for d in floats) + unit_roundoff(side_out.dtype)
            bound = oracle_out.abs() * u + 2 * underflow(side_out.dtype)
            return compare(side_out, oracle_out, bound, exclude)
        p = self._precision(s, model, side_out, tensors)
        bound = spec(p)  # type: ignore[operator]
        return compare(side_out, oracle_out, bound, exclude)

    # -- kinks of the replay: inputs that rounding moved across a branch boundary ------------------------------
    def _kinks(self, o: OpRecord, s: OpRecord, i: int, side_out: Tensor, oracle_out: Tensor,
               tensors: list[Tensor]) -> Tensor | None:
        name = base_name(s.op).rstrip("_")
        values = o.input_values or []
        if name in ("threshold_backward", "threshold", "leaky_relu_backward", "hardtanh_backward") and len(values) >= 1:
            j = 0 if name == "threshold" else 1
            if j >= len(values) or j >= len(tensors):
                return None
            x64, xs = values[j], tensors[j]
            if name in ("threshold_backward", "threshold"):
                th = float(s.argument("threshold", 0.0))  # type: ignore[arg-type]
                flips = (x64 > th) != (xs.to(torch.float64) > th)
            elif name == "leaky_relu_backward":
                flips = (x64 > 0) != (xs.to(torch.float64) > 0)
            else:
                lo, hi = float(s.argument("min_val", -1.0)), float(s.argument("max_val", 1.0))  # type: ignore[arg-type]
                x2 = xs.to(torch.float64)
                flips = ((x64 > lo) & (x64 < hi)) != ((x2 > lo) & (x2 < hi))
            return flips.reshape(side_out.shape) if flips.numel() == side_out.numel() and flips.any() else None
        if name in ("gt", "lt", "ge", "le", "eq", "ne") and side_out.dtype == torch.bool:
            expected = oracle_out.to(torch.bool)
            flips = side_out.cpu() != expected
            return flips if flips.any() else None
        if name == "max_pool2d_with_indices" and i == 1 and values:
            flips = side_out.cpu() != oracle_out
            if not flips.any():
                return None
            x = tensors[0].detach().to("cpu").reshape(side_out.shape[0], side_out.shape[1], -1)
            flat_s = side_out.cpu().reshape(x.shape[0], x.shape[1], -1)
            flat_o = oracle_out.reshape(x.shape[0], x.shape[1], -1)
            ties = x.gather(2, flat_s) == x.gather(2, flat_o)  # a tie made by rounding: either index is right
            return (flips.reshape(ties.shape) & ties).reshape(side_out.shape)
        return None

    # -- side-only ops -----------------------------------------------------------------------------------------
    def side_only(self, r: OpRecord) -> tuple[Unmatched, Row | None]:
        unit, phase = _unit(r), r.phase
        name = base_name(r.op)
        if r.index in self.folded:
            return Unmatched(unit, "side", phase, "folded", f"replayed in front of {self.folded[r.index]}"), None
        if name in _CREATION or not r.input_layouts:
            return Unmatched(unit, "side", phase, "glue", "creates values"), None
        outs = [v for v in (r.output_values or []) if v is not None]
        ins = [v for v in (r.input_values or []) if v is not None]
        if not outs:
            return Unmatched(unit, "side", phase, "not judged", "no output values"), None
        out = outs[0]
        if any(_preserves(out, v) for v in ins):
            return Unmatched(unit, "side", phase, "glue", "moves values unchanged"), None
        if any(_view_within(out, v) for v in ins):
            return Unmatched(unit, "side", phase, "glue", "a view inside its input"), None
        row = Row(layer=unit, pass_=_pass(r), quantity="output", error_a=math.inf, error_b=None, tolerance=0.0,
                  status=Status.MISMATCH, origin="runs on this side only", mode="op", side="a", ratio_a=math.inf,
                  order=r.index, note="an op the oracle does not run changes values (neither glue nor a view)")
        return Unmatched(unit, "side", phase, "finding", row.note), row


def _group(r: OpRecord) -> tuple:
    """Ops that belong together for glue: one autograd node's backward, or one module's forward."""
    if r.node is not None:
        return (r.phase, r.node.sequence_nr, r.node.name, r.creator)
    return (r.phase, r.module, r.function)


def _preserves(out: Tensor, x: Tensor) -> bool:
    """``out`` holds ``x``'s values element for element (within one rounding when the dtypes differ)."""
    if out.numel() != x.numel() or out.dtype.is_floating_point != x.dtype.is_floating_point:
        return False
    a, b = out.detach().to("cpu", torch.float64).reshape(-1), x.detach().to("cpu", torch.float64).reshape(-1)
    if out.dtype == x.dtype or not out.dtype.is_floating_point:
        return bool(torch.equal(a, b)) or bool(((a == b) | (a.isnan() & b.isnan())).all())
    u = unit_roundoff(out.dtype) + unit_roundoff(x.dtype)
    return bool(((a - b).abs() <= u * b.abs() + 2 * underflow(out.dtype)).all())


def _positions(t: Tensor) -> Tensor:
    n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    return torch.arange(n).as_strided(t.shape, t.stride(), t.storage_offset()).reshape(-1)


def _view_within(out: Tensor, x: Tensor) -> bool:
    """``out`` is a view of ``x``'s storage that reads only elements ``x`` covers."""
    try:
        if out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() or out.dtype != x.dtype:
            return False
        return bool(torch.isin(_positions(out), _positions(x)).all())
    except (RuntimeError, NotImplementedError):
        return False


def _own_kinks(pairs: list[tuple[OpRecord, OpRecord]]) -> list[OpKink]:
    """Per forward piecewise op: elements on a different branch in the side's own run than in the oracle's."""
    out = []
    for o, s in pairs:
        if o.phase != "forward":
            continue
        name = base_name(o.op).rstrip("_")
        try:
            if name == "max_pool2d_with_indices":
                a, b = (o.output_values or [None, None])[1], (s.output_values or [None, None])[1]
                differ = None if a is None or b is None or a.shape != b.shape else (a != b.cpu())
            else:
                a, b = signed_coordinate(o), signed_coordinate(s)
                differ = None if a is None or b is None or a.shape != b.shape else (
                    torch.sign(a) != torch.sign(b.detach().to("cpu", torch.float64)))
        except (RuntimeError, TypeError, ValueError):
            differ = None
        if differ is not None and differ.any():
            out.append(OpKink(unit=_unit(s), count=int(differ.sum()), total=differ.numel()))
    return out


# -- the entry ----------------------------------------------------------------------------------------------
def judge_ops(model: nn.Module, x: Tensor, y: Tensor, backend: str | Backend, *, oracle_capture: Capture | None = None,
              loss_fn: LossFn = F.cross_entropy, eval_mode: bool = False,
              side_model: nn.Module | None = None) -> OpReport:
    """Teacher-force every aten op of ``backend``'s step on the fp64 oracle's inputs (see the module docstring).

    ``oracle_capture``: a capture from :func:`oracle_capture` of the same model, inputs and loss, to share
    between sides (it is built here when not given). ``side_model``: the side's prepared model to run (kept
    across steps by the caller, :func:`~densenet_debug.verdict.ops.add_ops`). ``model`` is not changed.
    """
    be = parse_backend(backend)
    _check_inputs(x, y)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    oracle = oracle_capture if oracle_capture is not None else _oracle(model, x, y, loss_fn, eval_mode)
    t1 = time.perf_counter()
    side = side_capture(model, x, y, be, loss_fn=loss_fn, eval_mode=eval_mode, prepared=side_model)
    t2 = time.perf_counter()
    pairs, only_oracle, only_side, second = match(oracle, side)
    elements = sum(v.numel() for o, _ in pairs for v in (o.output_values or []) if v is not None)
    judge = _Judge(be, confidence(2 * max(elements, 1)))
    glue: dict[tuple, list[OpRecord]] = {}
    for r in only_side:
        if len(r.input_layouts) == 1 and len(r.output_layouts) >= 1 and r.output_layouts[0] is not None and \
                tuple(r.output_layouts[0].size) == tuple(r.input_layouts[0].size):
            glue.setdefault(_group(r), []).append(r)
    labels = _labels(list(oracle))
    rows: list[Row] = []
    with be.active():
        for o, s in pairs:
            rows.extend(_place(row, labels[o.index], o.index, o.op) for row in judge.pair(o, s, glue))
    t3 = time.perf_counter()
    unmatched = [Unmatched(_unit(r), "oracle", r.phase, "not judged", "runs in the oracle only") for r in only_oracle]
    side_labels = _labels(only_side, " (this side only)")
    for r in only_side:
        entry, row = judge.side_only(r)
        unmatched.append(entry)
        if row is not None:
            rows.append(_place(row, side_labels[r.index], _oracle_place(r, pairs), r.op))
    rows.sort(key=lambda r: r.order)
    times.update(oracle_capture=t1 - t0, side_capture=t2 - t1, replay=t3 - t2, total=time.perf_counter() - t0)
    return OpReport(backend=be.name, rows=rows, unmatched=unmatched, kinks=_own_kinks(pairs), matched=len(pairs),
                    second_pass_matched=second, skipped=judge.skipped, seconds=times)


def _oracle_place(r: OpRecord, pairs: list[tuple[OpRecord, OpRecord]]) -> int:
    """Where a side-only op sits in the oracle's op stream: just after the matched op the side ran before it."""
    before = [o.index for o, s in pairs if s.index < r.index]
    return max(before, default=-1) + 1


def _check_inputs(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise UsageError("inputs must be a floating-point tensor")
    if not isinstance(y, Tensor) or y.shape[:1] != x.shape[:1]:
        raise UsageError(f"labels must be a tensor with one entry per sample ({x.shape[0]})")
    if not _finite(x) or (y.is_floating_point() and not _finite(y)):
        raise UsageError("inputs or labels hold NaN/Inf: nothing can be judged on them")


def _oracle(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, eval_mode: bool) -> Capture:
    return oracle_capture(model, x, y, loss_fn=loss_fn, eval_mode=eval_mode)


__all__ = ["OUTSIDE", "SCHEMA", "OpKink", "OpReport", "TensorLayout", "Unmatched", "judge_ops", "match",
           "module_of", "oracle_capture", "rollup", "side_capture"]
