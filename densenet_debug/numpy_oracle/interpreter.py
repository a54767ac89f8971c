"""The NumPy oracle as an op-level interpreter: any model built from the ops of :mod:`.vjp`, forward and backward.

**Graph.** ``torch.export.export`` (non-strict) traces ``cross_entropy(model(x), y)`` into a functional aten
graph with explicit dataflow: parameters and buffers are inputs, in-place ops (``relu_``, BatchNorm's
running statistics) become pure ops with the buffer writes as outputs, ``torch.utils.checkpoint`` and custom
``autograd.Function``\\ s are traced through their *forward* ops, and every node keeps ``nn_module_stack``
and ``stack_trace``. The default core-aten decompositions run, except the loss's ``nll_loss_forward``.
PyTorch's backward is never traced: the oracle differentiates the forward math itself, so a hand-written
backward that is wrong (in every dtype) shows as a disagreement.

**Comparison with PyTorch float64** (CPU, one step):

* *Forward, per op, teacher-forced.* Each node's NumPy rule runs on PyTorch's own values of its inputs
  (the graph run in torch) and is compared with PyTorch's value of the node. Tolerance ``2·γ_K·A``:
  each side within ``γ_K·A`` of the exact result (``A = Σ|terms|``, ``K`` the op's rounding count, see
  :mod:`.vjp`), so the two within twice that; exact ops (``K = 0``) must agree bit for bit.
* *Gradients, end to end.* PyTorch's real backward of the eager model (its own derivative formulas and any
  custom Function's backward) against a NumPy reverse sweep of VJP rules on the same forward values (both
  sides take the same branch at every ReLU and max-pool). A worst-case bound carried through the sweep
  (``|J|ᵀE`` per op) compounds with depth (each conv's ``|J|`` exceeds its ``J``'s effect on a cancelling
  gradient by ~√K, each BatchNorm's by its projection), so the bound uses the random-rounding model of
  Higham & Mary (SIAM J. Sci. Comput. 2019) that :mod:`densenet_debug.verdict.tolerance` uses: an op's
  rounding errors are independent and mean zero, a length-``K`` sum of terms ``Σ|terms| = A`` errs by a
  sub-Gaussian amount of variance proxy ``K·ε²·A²`` (Hoeffding). Errors reach a gradient through the exact
  linear maps of the ops after them, so the sweep carries the variance proxy ``V_v`` of each node's
  gradient error: an op hands its inputs ``(J∘J)ᵀV_out`` (:mod:`.vjp` ``backward_sq``) plus its own
  ``K·ε²·A²`` (BatchNorm and log-softmax: the square of their derived deterministic bound, a bounded error
  being sub-Gaussian with that proxy); a node used ``c`` times adds ``(c-1)·ε²·(Σ|contributions|)²``.
  The two sides err independently, so their difference has proxy ``2V`` and the tolerance is ``λ·√(2V)``,
  ``λ = √(2 ln(2N/10⁻⁶))`` over the ``N`` gradient elements compared (one false alarm in 10⁶ runs, the
  union bound :func:`densenet_debug.verdict.tolerance.confidence` uses). First order: products of two
  roundings (~1e-32 relative) are dropped.
* BatchNorm's running statistics are the batch-norm op's buffer writes, compared per op like any output
  (not against the eager model's buffers: a checkpointed BatchNorm updates them again when its forward is
  recomputed in the backward, which is PyTorch's documented behaviour, not an error of the math).
* Non-finite numbers never pass (status ``nonfinite``).
* *Informative:* NumPy's own end-to-end forward (its values, not PyTorch's) gives the loss difference.

An op without a rule, or with arguments its rule does not reproduce, is :class:`UnsupportedOp`, a
:class:`~densenet_debug.errors.UsageError` naming the op and where it runs (exit 2).
"""

from __future__ import annotations

import copy
import math
import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from densenet_debug.errors import UsageError
from densenet_debug.numpy_oracle.vjp import EPS, RULES, Unsupported, gamma

Array = np.ndarray
_PREFIX = "model."


def confidence(elements: int, false_alarm: float = 1e-6) -> float:
    """λ with ``elements · 2·exp(-λ²/2) <= false_alarm`` (Hoeffding and a union bound over the elements)."""
    return math.sqrt(2.0 * math.log(2.0 * max(elements, 1) / false_alarm))


class UnsupportedOp(UsageError):
    """An op the NumPy oracle has no rule for (the message names it and the module it runs in)."""


class _Step(nn.Module):
    """The traced function: the model's forward and the loss every verb uses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


@dataclass
class OpGraph:
    """The functional aten graph of one step and what its placeholders and outputs are."""

    module: fx.GraphModule
    inputs: list[tuple[str, str]]  # per placeholder: (kind: param | buffer | input | target | constant, name)
    constants: dict[str, torch.Tensor]
    buffer_writes: dict[str, str]  # output node name -> buffer name
    loss: str  # the node holding the loss
    no_grad: set[str] = field(default_factory=set)  # ops run under torch.no_grad(): no gradient flows through
    notes: list[str] = field(default_factory=list)

    def nodes(self) -> list[fx.Node]:
        return [n for n in self.module.graph.nodes if n.op == "call_function"]


def module_path(node: fx.Node) -> str:
    """The innermost module the op ran in (``(model)`` for the model's own forward, ``(loss)`` for the loss)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "(loss)"
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    if path in ("", "model"):
        return "(model)" if path == "model" else "(loss)"
    return path[len(_PREFIX):] if path.startswith(_PREFIX) else path


def source_line(node: fx.Node) -> str:
    """``file.py:LINE`` of the user's code that made the op, when the graph kept it."""
    trace = node.meta.get("stack_trace") or ""
    hits = re.findall(r'File "([^"]+)", line (\d+)', trace)
    hits = [h for h in hits if "/torch/" not in h[0]]
    return f"{hits[-1][0].rsplit('/', 1)[-1]}:{hits[-1][1]}" if hits else ""


def export_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> OpGraph:
    """``cross_entropy(model(x), y)`` as a functional aten graph (model in its current train/eval mode)."""
    step = _Step(model)
    try:
        with warnings.catch_warnings():  # torch's own pytree deprecation notices, not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            ep = torch.export.export(step, (x, y), strict=False)
            regions = {n.name for n in ep.graph.nodes if n.target is torch.ops.higher_order.wrap_with_set_grad_enabled
                       and not n.args[0]}  # `with torch.no_grad():` blocks in a forward
            notes = []
            if any(_reentrant_checkpoint(ep.graph_module, n) for n in ep.graph.nodes if n.name in regions):
                # A reentrant checkpoint runs its function under no_grad and recomputes it with grad in the
                # backward; export keeps grad off from there on (measured on torch 2.13: the loss too), so its
                # no-grad marks say nothing about the eager step.
                regions = set()
                notes.append("torch.no_grad() regions not honoured: a reentrant torch.utils.checkpoint makes "
                             "torch.export's grad-mode marks meaningless (use_reentrant=False keeps them)")
            table = torch.export.default_decompositions()
            for op in (torch.ops.aten.nll_loss_forward.default, torch.ops.aten.detach.default):
                table.pop(op, None)  # keep the loss whole, and detach (it stops the gradient; alias does not)
            ep = ep.run_decompositions(table)
    except UsageError:
        raise
    except Exception as exc:  # a model torch.export cannot trace: say so in one line
        msg = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise UsageError(f"torch.export cannot trace the model's step ({type(exc).__name__}: {msg})") from exc
    sig = ep.graph_signature
    kinds = {"PARAMETER": "param", "BUFFER": "buffer", "CONSTANT_TENSOR": "constant"}
    inputs, constants = [], {}
    user = iter(("input", "target"))
    for spec in sig.input_specs:
        kind = kinds.get(spec.kind.name)
        if kind is None:
            inputs.append((next(user), spec.arg.name))
            continue
        name = spec.target[len(_PREFIX):] if spec.target.startswith(_PREFIX) else spec.target
        inputs.append((kind, name))
        if kind == "constant":
            constants[name] = ep.constants[spec.target]
    writes, loss = {}, ""
    for spec in sig.output_specs:
        if spec.kind.name == "BUFFER_MUTATION":
            writes[spec.arg.name] = spec.target[len(_PREFIX):] if spec.target.startswith(_PREFIX) else spec.target
        elif spec.kind.name == "USER_OUTPUT":
            loss = spec.arg.name
    no_grad = {n.name for n in ep.graph.nodes if n.op == "call_function" and _from_region(n, regions)}
    return OpGraph(ep.graph_module, inputs, constants, writes, loss, no_grad, notes)


def _reentrant_checkpoint(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a no-grad region of the exported graph holds ops run by torch.utils.checkpoint's reentrant Function."""
    sub = getattr(gm, str(node.args[1].target), None) if isinstance(node.args[1], fx.Node) else None
    return sub is not None and any("CheckpointFunction" in (n.meta.get("stack_trace") or "")
                                   or "torch/utils/checkpoint.py" in (n.meta.get("stack_trace") or "")
                                   for n in sub.graph.nodes)


def _from_region(node: fx.Node, regions: set[str]) -> bool:
    """Whether the op came from a no-grad region of the exported graph (``from_node`` provenance)."""
    todo = list(node.meta.get("from_node") or [])
    while todo:
        src = todo.pop()
        if src.name in regions and str(src.target).endswith("wrap_with_set_grad_enabled"):
            return True
        todo += list(getattr(src, "from_node", None) or [])
    return False


def graph_inputs(graph: OpGraph, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    out = []
    for kind, name in graph.inputs:
        t = {"param": params, "buffer": buffers, "constant": graph.constants}.get(kind, {}).get(name)
        out.append({"input": x, "target": y}.get(kind, t).detach().clone())
    return out


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def torch_values(graph: OpGraph, inputs: list[torch.Tensor]) -> dict[str, Any]:
    """PyTorch's value of every node (the graph run in torch, no autograd)."""
    rec = _Recorder(graph.module)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


def _to_numpy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy().copy()
    if isinstance(v, (tuple, list)):
        return type(v)(_to_numpy(t) for t in v)
    return v


def _args(node: fx.Node, env: dict[str, Any], tvals: dict[str, Any]) -> list:
    def conv(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return env[a.name]
        if isinstance(a, (list, tuple)):
            return [conv(b) for b in a]
        return a

    args = [conv(a) for a in node.args]
    schema = getattr(node.target, "_schema", None)
    if node.kwargs and schema is not None:  # keyword arguments in schema order after the positional ones
        names = [arg.name for arg in schema.arguments]
        for name in names[len(args):]:
            if name in node.kwargs:
                while len(args) < names.index(name):
                    default = schema.arguments[len(args)].default_value
                    args.append(default)
                args.append(conv(node.kwargs[name]))
    if str(node.target) == "aten.as_strided.default":  # the input's layout, which as_strided reads
        t = tvals[node.args[0].name]
        args.append((list(t.shape), list(t.stride()), int(t.storage_offset())))
    return args


def _tensor_slots(node: fx.Node) -> list[fx.Node]:
    slots: list[fx.Node] = []

    def walk(a: Any) -> None:
        if isinstance(a, fx.Node):
            slots.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                walk(b)
    for a in node.args:
        walk(a)
    schema = getattr(node.target, "_schema", None)
    if node.kwargs and schema is not None:
        for arg in schema.arguments[len(node.args):]:
            if arg.name in node.kwargs:
                walk(node.kwargs[arg.name])
    return slots


def _where(node: fx.Node) -> str:
    line = source_line(node)
    return f"at {module_path(node)}" + (f", {line}" if line else "")


def _rule(node: fx.Node):  # noqa: ANN202
    rule = RULES.get(str(node.target))
    if rule is None:
        raise UnsupportedOp(f"no NumPy rule for {node.target} ({_where(node)})")
    return rule


def _abs_args(args: list) -> list:
    """Float arrays (also inside lists, cat's inputs) by their absolute values, kept arrays even at 0-d."""
    return [np.asarray(np.abs(a)) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else
            ([np.asarray(np.abs(b)) if isinstance(b, np.ndarray) else b for b in a] if isinstance(a, list) else a)
            for a in args]


def _is_float(v: Any) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind == "f"


@dataclass
class Comparison:
    """One quantity of the interpreted step: PyTorch's value, NumPy's, and the two-sided bound."""

    layer: str
    op: str
    pass_: str
    quantity: str
    theirs: Array
    ours: Array
    bound: Array
    index: int  # order: forward rows by node, backward rows in backward order
    scale: float | None = None  # what error and tolerance are read relative to (Σ|terms| of a gradient)
    note: str = ""  # where the gradient of a module's output comes from (the ops that consume it)


@dataclass
class Interpreted:
    comparisons: list[Comparison]
    loss_torch: float
    loss_numpy_own: float
    ops: dict[str, int] = field(default_factory=dict)
    modules: int = 0
    notes: list[str] = field(default_factory=list)


def interpret(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, train: bool = True) -> Interpreted:
    """Trace, run and differentiate one step of ``model`` in NumPy float64 and collect what to compare."""
    with np.errstate(all="ignore"):  # a NaN/Inf is judged by its row (never a pass), not warned about
        return _interpret(model, x, y, train)


def _interpret(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool) -> Interpreted:
    model64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).train(train)
    x64, y = x.detach().to(device="cpu", dtype=torch.float64), y.detach().cpu()
    graph = export_step(copy.deepcopy(model64), x64, y)
    nodes = graph.nodes()
    for n in nodes:  # name the first op without a rule before any work
        if n.target is not operator.getitem:
            _rule(n)
    inputs = graph_inputs(graph, model64, x64, y)
    tvals = torch_values(graph, inputs)
    teacher = {k: _to_numpy(v) for k, v in tvals.items()}
    own = dict(teacher)  # NumPy's own end-to-end values (placeholders shared)
    ours: dict[str, Any] = {}  # NumPy on PyTorch's inputs, per node
    bound: dict[str, Any] = {}
    comps: list[Comparison] = []
    users_of = {n.name: len(n.users) for n in graph.module.graph.nodes}
    writes = graph.buffer_writes
    op_counts: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.target is operator.getitem:
            parent, k = n.args[0].name, n.args[1]
            ours[n.name], own[n.name] = ours[parent][k], own[parent][k]
            b = bound[parent]
            bound[n.name] = b[k] if isinstance(b, (tuple, list)) and len(b) > k else np.zeros(np.shape(ours[n.name]))
            if users_of[n.name] or n.name in writes:
                quantity = writes[n.name].rsplit(".", 1)[-1] if n.name in writes else f"output{k}"
                _forward_row(comps, n.args[0], quantity, teacher[n.name], ours[n.name], bound[n.name], i)
            continue
        rule = _rule(n)
        op_counts[str(n.target)] = op_counts.get(str(n.target), 0) + 1
        a = _args(n, teacher, tvals)
        try:
            ours[n.name] = rule.forward(a, False)
            own[n.name] = rule.forward(_args(n, own, tvals), False)
            bound[n.name] = _forward_bound(rule, a, ours[n.name])
        except Unsupported as exc:
            raise UnsupportedOp(f"no NumPy rule for {exc} ({_where(n)})") from exc
        if str(n.target).startswith("aten.empty") or ours[n.name] is None or isinstance(ours[n.name], tuple):
            continue  # uninitialised memory / a check without a value / the elements are compared at their getitem
        _forward_row(comps, n, "output", teacher[n.name], ours[n.name], bound[n.name], i)
    grads, errors, terms = _backward(graph, nodes, teacher, ours, tvals)
    comps += _eager_rows(graph, model64, x64, y, grads, errors, terms, nodes, teacher)
    paths = {module_path(n) for n in nodes}
    return Interpreted(comps, float(tvals[graph.loss]), float(own[graph.loss]), op_counts, len(paths), graph.notes)


def _forward_bound(rule, a: list, out: Any) -> Any:  # noqa: ANN001
    if rule.bound_fwd is not None:
        b = rule.bound_fwd(a, out)
    else:
        k = rule.k_fwd(a)
        if not k:
            return (tuple(np.zeros(np.shape(o)) for o in out) if isinstance(out, tuple) else np.zeros(np.shape(out)))
        b = rule.forward(_abs_args(a), True)
        b = tuple(gamma(k) * np.asarray(v, dtype=np.float64) for v in b) if isinstance(b, tuple) \
            else gamma(k) * np.asarray(b, dtype=np.float64)
    return tuple(2 * np.asarray(v) for v in b) if isinstance(b, tuple) else 2 * np.asarray(b)


def _forward_row(comps: list, n: fx.Node, quantity: str, theirs: Any, ours: Any, b: Any, index: int) -> None:
    theirs, ours = np.asarray(theirs), np.asarray(ours)
    if theirs.shape != ours.shape:
        ours = np.full(theirs.shape, np.nan) if ours.size != theirs.size else ours.reshape(theirs.shape)
    op = str(n.target).removesuffix(".default")
    comps.append(Comparison(module_path(n), op, "forward", quantity, theirs, ours.astype(np.float64),
                            np.broadcast_to(np.asarray(b, dtype=np.float64), theirs.shape), index))


def _square_args(args: list) -> list:
    return [np.asarray(a * a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else
            a * a if isinstance(a, (int, float)) and not isinstance(a, bool) else a for a in args]


def _backward_sq(rule, a: list, out: Any, v: Any) -> dict[int, Array]:  # noqa: ANN001
    """(J∘J)ᵀV: how the variance of the output gradient's error reaches each input."""
    if rule.backward_sq is not None:
        return rule.backward_sq(a, out, v)
    if rule.sq == "squares":
        return rule.backward(_square_args(a), out, v, True)
    return rule.backward(_abs_args(a), out, v, True)  # entries 0 or ±1: J∘J = |J|


def _backward(graph: OpGraph, nodes: list[fx.Node], teacher: dict, ours: dict, tvals: dict
              ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Reverse sweep: per node, NumPy's gradient of the loss, the variance proxy of one side's error in it, and
    the Σ|terms| of its last products (the scale its row is read on)."""
    grads: dict[str, Any] = {graph.loss: np.array(1.0)}
    errors: dict[str, Any] = {graph.loss: np.array(0.0)}
    mags: dict[str, Any] = {}  # Σ|contributions| and their count, for the accumulation's rounding
    counts: dict[str, int] = {}
    terms: dict[str, Any] = {}  # Σ|terms| of each gradient's last products: the scale rows are read on

    def add(name: str, g: Array, e: Array, t: Array) -> None:
        g, e = np.asarray(g, dtype=np.float64), np.asarray(e, dtype=np.float64)
        if name in grads:
            grads[name] = grads[name] + g
            errors[name] = errors[name] + e
            mags[name] = mags[name] + np.abs(g)
            terms[name] = terms[name] + t
        else:
            grads[name], errors[name], mags[name], terms[name] = g, e, np.abs(g), np.asarray(t, dtype=np.float64)
        counts[name] = counts.get(name, 0) + 1

    def finish(name: str) -> None:
        c = counts.get(name, 0)
        if c > 1:
            errors[name] = errors[name] + (c - 1) * (EPS * mags[name]) ** 2

    for n in reversed(nodes):
        finish(n.name)
        g = grads.get(n.name)
        if g is None:
            continue
        if n.target is operator.getitem:
            parent, k = n.args[0].name, n.args[1]
            size = len(ours[parent])
            pg = grads.setdefault(parent, [None] * size)
            pe = errors.setdefault(parent, [None] * size)
            pg[k], pe[k] = g, errors[n.name]
            continue
        rule = RULES[str(n.target)]
        if rule.backward is None or n.name in graph.no_grad:
            continue
        a = _args(n, teacher, tvals)
        out = ours[n.name]
        e = errors[n.name]
        if isinstance(out, tuple):
            g = tuple(gi for gi in g)
            e_t = tuple(ei if ei is not None else (np.zeros(np.shape(o)) if gi is not None else None)
                        for ei, gi, o in zip(e, g, out))
        else:
            e_t = e
        gin = rule.backward(a, out, g, False)
        ga = tuple(np.abs(x) if x is not None else None for x in g) if isinstance(g, tuple) else np.abs(g)
        mag = rule.backward(_abs_args(a), out, ga, True)  # Σ|terms| of each input gradient
        if rule.exact_bwd:
            loc: dict[int, Array] = {}
        elif rule.bound_bwd is not None:
            loc = {s: b ** 2 for s, b in rule.bound_bwd(a, out, g).items()}
        else:
            k = rule.k_bwd(a)
            loc = {s: k * (EPS * v) ** 2 for s, v in mag.items()}
        prop = _backward_sq(rule, a, out, e_t)
        slots = _tensor_slots(n)
        for s, gs in gin.items():
            src = slots[s]
            if not _is_float(teacher.get(src.name)):
                continue
            add(src.name, gs, prop[s] + loc.get(s, 0.0), mag[s])
    for n in graph.module.graph.nodes:
        if n.op == "placeholder":
            finish(n.name)
    return grads, errors, terms


def _module_outputs(graph: OpGraph, nodes: list[fx.Node], teacher: dict) -> dict[tuple[str, int], fx.Node]:
    """(module path, call index) -> the node holding that call's output: the one value made inside the call
    that code outside it uses (calls with none or several are left out)."""
    members: dict[str, set[str]] = {}
    for n in nodes:
        for key in list((n.meta.get("nn_module_stack") or {}).keys())[1:]:  # the first is the traced step
            members.setdefault(key, set()).add(n.name)
    by_name = {n.name: n for n in nodes}
    out = {}
    for key, names in members.items():
        path, _, call = key.partition("@")
        candidates = [by_name[m] for m in names if _is_float(teacher.get(m)) and any(
            u.op == "call_function" and u.name not in names for u in by_name[m].users)]
        if len(candidates) != 1:
            continue
        fqn = list(candidates[0].meta["nn_module_stack"][key])[0] if key in candidates[0].meta["nn_module_stack"] \
            else path
        fqn = str(fqn)
        fqn = "(model)" if fqn == "model" else fqn[len(_PREFIX):] if fqn.startswith(_PREFIX) else fqn
        out[(fqn, int(call or 0))] = candidates[0]
    return out


def _eager_step(model64: nn.Module, x64: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """PyTorch's real step; the gradient of every module call's output, by (path, call index), forward calls only
    (a non-reentrant checkpoint's recomputation in the backward is not a call of the step)."""
    x = x64.clone().requires_grad_(True)
    model64.zero_grad(set_to_none=True)
    grads: dict[tuple[str, int], torch.Tensor] = {}
    calls: dict[str, int] = {}
    capturing = [True]

    def hook(path: str):  # noqa: ANN202
        def record(_module: nn.Module, _args: Any, out: Any) -> None:
            if not capturing[0] or not isinstance(out, torch.Tensor) or not out.requires_grad:
                return
            key = (path, calls.get(path, 0))
            calls[path] = key[1] + 1

            def keep(g: torch.Tensor) -> None:
                grads[key] = g.detach().clone()
            out.register_hook(keep)
        return record

    handles = [m.register_forward_hook(hook(name or "(model)")) for name, m in model64.named_modules()]
    try:
        out = model64(x)
        capturing[0] = False
        F.cross_entropy(out, y).backward()
    finally:
        for h in handles:
            h.remove()
    return x, grads


def _eager_rows(graph: OpGraph, model64: nn.Module, x64: torch.Tensor, y: torch.Tensor, grads: dict, errors: dict,
                terms: dict, nodes: list[fx.Node], teacher: dict) -> list[Comparison]:
    """PyTorch's real step (its backward, custom Functions included) against the NumPy sweep: every parameter's
    gradient, the input's, and the gradient of every module call's output (where a wrong one first appears)."""
    x, outputs = _eager_step(model64, x64, y)
    params = dict(model64.named_parameters())
    placeholders = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    position = {n.name: i for i, n in enumerate(nodes)}
    base = len(nodes)
    todo = []  # (layer, quantity, PyTorch's gradient, node, backward-order index, note)
    for node, (kind, name) in zip(placeholders, graph.inputs):
        if kind not in ("param", "input"):
            continue
        theirs = params[name].grad if kind == "param" else x.grad
        if theirs is None and grads.get(node.name) is None:
            continue
        first = min((position[u.name] for u in node.users if u.name in position), default=0)
        ref = params[name] if kind == "param" else x
        theirs = np.zeros(tuple(ref.shape)) if theirs is None else theirs.detach().numpy()
        layer, q = (name.rsplit(".", 1) if "." in name else ("(model)", name)) if kind == "param" else ("(input)",
                                                                                                     "input")
        todo.append((layer, f"grad_{q}", theirs, node, base + (len(nodes) - first), ""))
    for (path, call), node in _module_outputs(graph, nodes, teacher).items():
        theirs = outputs.get((path, call))
        if theirs is None or grads.get(node.name) is None or tuple(theirs.shape) != np.shape(grads[node.name]):
            continue  # no gradient reached it on one side (a detached output, a reentrant checkpoint)
        users = sorted({f"{module_path(u)} · {str(u.target).removesuffix('.default')}" for u in node.users
                        if u.op == "call_function"})
        todo.append((path, "grad_output" + (f" (call {call + 1})" if call else ""), theirs.numpy(), node,
                     base + (len(nodes) - position[node.name]) - 0.5,
                     "its gradient comes from " + ", ".join(users)))
    lam = confidence(sum(t[2].size for t in todo))
    rows = []
    for layer, q, theirs, node, index, note in todo:
        mine = grads.get(node.name)
        mine = np.zeros(theirs.shape) if mine is None else mine
        err = lam * np.sqrt(2 * errors.get(node.name, np.zeros(theirs.shape)))
        scale = float(np.max(terms[node.name])) if node.name in terms and np.size(terms[node.name]) else None
        rows.append(Comparison(layer, "", "backward", q, theirs, np.broadcast_to(mine, theirs.shape),
                               np.broadcast_to(err, theirs.shape), index, scale, note))
    return rows
