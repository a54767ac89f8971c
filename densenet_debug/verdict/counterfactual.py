"""The counterfactual oracle: fp64 arithmetic, but the side's branch at exactly the side's kink elements.

Kinks (:mod:`densenet_debug.verdict.kinks`) leave forward values continuous, so the counterfactual only changes the
backward. When :func:`densenet_debug.verdict.engine.oracle_traces` built the oracle in this process it kept the
step's autograd graph with a *gate* behind every ReLU-like unit and max pool; a counterfactual is then one
more fp64 backward through that graph with the gates open at the side's kink elements. An oracle rebuilt
from stored arrays has no graph: the fp64 step is re-run with forcing hooks instead (same result, a
forward more).

A propagated backward divergence at unit U is *explained by the kinks* when, against the counterfactual,
U's grad_output and parameter gradients agree within the row's tolerance: U itself is judged by its local
(teacher-forced) check, so its grad_input follows from its grad_output (at a kink unit, with the flips).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from densenet_debug.trace import TensorStore, Trace, Tracer, UnitSelector
from densenet_debug.verdict import kinks as kinkmod
from densenet_debug.verdict.compare import relative_error
from densenet_debug.verdict.report import Row, Status


class _Gates:
    """Which kink sites are open, by unit name; empty while the oracle computes its own gradients."""

    def __init__(self) -> None:
        self.open: dict[str, kinkmod.KinkSite] = {}


class _GateFn(torch.autograd.Function):
    """Identity on the unit's output; in backward, adds the gradient correction of an open kink site."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, gates: _Gates, name: str, module: nn.Module) -> Tensor:
        ctx.save_for_backward(x)
        ctx.gates, ctx.name, ctx.module = gates, name, module
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        site = ctx.gates.open.get(ctx.name)
        if site is None:
            return g, None, None, None, None
        (x,) = ctx.saved_tensors
        return g, _correction(ctx.module, site, x, g), None, None, None


def _correction(module: nn.Module, site: kinkmod.KinkSite, x: Tensor, g: Tensor) -> Tensor:
    """Side's branch minus the oracle's, times the incoming gradient, at the flipped elements only."""
    mask = site.mask.to(x.device)
    corr = torch.zeros_like(x)
    if isinstance(module, kinkmod.POOLS):
        _, own = kinkmod.pool_indices(module, x)
        flat_corr, gm = corr.flatten(2), (g * mask).flatten(2)
        flat_corr.scatter_add_(2, site.side_branch.to(x.device).flatten(2), gm)
        flat_corr.scatter_add_(2, own.flatten(2), -gm)
        return corr
    own = kinkmod.derivative(module, x[mask]).to(x.dtype)
    corr[mask] = (site.side_branch.to(x.device, x.dtype)[mask] - own) * g[mask]
    return corr


@dataclass
class RetainedGraph:
    """One oracle step's autograd graph, kept alive with gates, for counterfactual backwards."""

    loss: Tensor
    gates: _Gates
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    params: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def gradients(self, sites: list[kinkmod.KinkSite]) -> dict[str, dict[str, Tensor | None]]:
        """grad_output.i and grad_<param> of every unit, with the gates open at ``sites``."""
        targets: list[tuple[str, str, Tensor]] = []
        for name, outs in self.outputs.items():
            targets += [(name, f"grad_output.{i}", t) for i, t in enumerate(outs) if t.requires_grad]
        for name, ps in self.params.items():
            targets += [(name, f"grad_{p}", t) for p, t in ps.items() if t.requires_grad]
        self.gates.open = {s.layer: s for s in sites}
        try:
            grads = torch.autograd.grad(self.loss, [t for _, _, t in targets], retain_graph=True, allow_unused=True)
        finally:
            self.gates.open = {}
        result: dict[str, dict[str, Tensor | None]] = {}
        for (name, key, _), g in zip(targets, grads):
            result.setdefault(name, {})[key] = g
        return result


def traced_step_with_gates(model: nn.Module, x: Tensor, y: Tensor, units: UnitSelector,
                           loss_fn: Callable[[Tensor, Tensor], Tensor], store: TensorStore | None = None) -> Trace:
    """:func:`densenet_debug.trace.trace_step` for the oracle, keeping its graph (``trace.retained``).

    With a ``store`` that had to spill, the graph is not kept: it holds every activation of the step, as
    large as what did not fit (a counterfactual then re-runs the step, :func:`rerun_gradients`). From the
    first spill on, no more gates are added and no more outputs held for it, so the step costs what a plain
    one does."""
    gates = _Gates()
    modules = dict(model.named_modules())
    graph_outputs: dict[str, list[Tensor]] = {}
    handles = []
    for name, module in modules.items():
        if name and kinkmod.is_kinky(module):
            handles.append(module.register_forward_hook(_gate_hook(name, gates, store)))
    model.zero_grad(set_to_none=True)
    try:
        with Tracer(model, units, store=store) as tracer:
            for name in tracer.modules:
                handles.append(modules[name].register_forward_hook(_keep_outputs(name, graph_outputs, store)))
            output = model(x)
            loss = loss_fn(output, y)
            loss.backward(retain_graph=True)
        trace = tracer.trace()
    finally:
        for h in handles:
            h.remove()
    trace.output, trace.loss = output.detach(), loss.detach()
    if trace.spilled:
        trace.retained = None
        return trace
    params = {name: dict(modules[name].named_parameters(recurse=False)) for name in graph_outputs}
    trace.retained = RetainedGraph(loss, gates, graph_outputs, params)
    return trace


def _gate_hook(name: str, gates: _Gates, store: TensorStore | None) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if store is not None and store.spilled:  # the graph will not be kept: no gate to save inputs for
            return None
        if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor) or not output.requires_grad:
            return None
        return _GateFn.apply(output, args[0], gates, name, module)

    return hook


def _keep_outputs(name: str, outputs: dict[str, list[Tensor]], store: TensorStore | None) -> Callable:
    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if store is not None and store.spilled:  # the graph will not be kept: hold no outputs for it
            outputs.clear()
            return
        if name not in outputs:  # the first call (a checkpoint recompute calls again, in backward)
            outputs[name] = [o for o in (output if isinstance(output, (tuple, list)) else [output])
                           if isinstance(o, Tensor)]

    return hook


def rerun_gradients(ref: nn.Module, x: Tensor, y: Tensor, o_trace: Trace, sites: list[kinkmod.KinkSite],
                    units: list[str], loss_fn: Callable) -> Mapping[str, dict[str, Tensor | None]]:
    """The counterfactual without a kept graph: the fp64 step again, with a gate open at each site.

    The gate (:class:`_SiteGateFn`) adds the same correction as the kept graph's, but keeps only what it reads:
    the coefficients at the flipped elements (a pool's whole input), not a copy of the unit's output as
    :func:`~densenet_debug.verdict.kinks.forcing_hook` makes, so the step costs what a plain one does.

    Its gradients go through a :class:`~densenet_debug.trace.TensorStore` and are read back one unit at a time
    (a whole step's fp64 gradients are as large as the oracle's)."""
    modules = dict(ref.named_modules())
    saved = {k: b.clone() for k, b in ref.named_buffers()}
    with torch.no_grad():
        for rec in o_trace:
            for k, b in rec.buffers_before.items():
                getattr(modules[rec.name], k).copy_(b)
    handles = [modules[s.layer].register_forward_hook(_site_gate_hook(s)) for s in sites]
    try:
        ref.zero_grad(set_to_none=True)
        with Tracer(ref, units, record=("grad_outputs", "param_grads"), store=TensorStore()) as tracer:
            loss_fn(ref(x), y).backward()
        trace = tracer.trace()
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for k, b in ref.named_buffers():
                b.copy_(saved[k])
    return _UnitGradients(trace)


class _UnitGradients(Mapping[str, dict[str, Tensor | None]]):
    """A counterfactual trace as ``{unit: {"grad_output.i" | "grad_<param>": tensor}}``, built on lookup."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def __getitem__(self, name: str) -> dict[str, Tensor | None]:
        rec = self.trace[name]
        values = {f"grad_output.{i}": g for i, g in enumerate(rec.grad_outputs)}
        values.update({f"grad_{p}": g for p, g in rec.param_grads.items()})
        return values

    def __iter__(self) -> Iterator[str]:
        return iter(self.trace.units)

    def __len__(self) -> int:
        return len(self.trace.units)

    def __contains__(self, name: object) -> bool:
        return name in self.trace.units


class _SiteGateFn(torch.autograd.Function):
    """Identity on a unit's output; in backward, the side's branch minus the oracle's at one open site."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, site: kinkmod.KinkSite, module: nn.Module, coef: Tensor | None) -> Tensor:
        ctx.save_for_backward(x if coef is None else coef)
        ctx.site, ctx.module, ctx.elementwise = site, module, coef is not None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        (saved,) = ctx.saved_tensors
        if not ctx.elementwise:  # a pool: its indices need the whole input
            return g, _correction(ctx.module, ctx.site, saved, g), None, None, None
        return g, saved * g[ctx.site.mask.to(g.device)], None, None, None


def _site_gate_hook(site: kinkmod.KinkSite) -> Callable:
    """A forward hook opening the gate of ``site``: for an elementwise op, the gradient correction enters
    through the flipped elements of its input (``x[mask]``), times (side's derivative - the oracle's)."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor) or not output.requires_grad:
            return None
        x = args[0]
        if isinstance(module, kinkmod.POOLS):
            return _SiteGateFn.apply(output, x, site, module, None)
        mask = site.mask.to(x.device)
        xm = x[mask]
        coef = site.side_branch.to(x.device, x.dtype)[mask] - kinkmod.derivative(module, xm).to(x.dtype)
        return _SiteGateFn.apply(output, xm, site, module, coef)

    return hook


def explain(rows: list[Row], s_trace: Trace, cf: Mapping[str, dict[str, Tensor | None]]) -> None:
    """Turn backward ``mismatch`` rows the kinks explain into ``kink`` rows (see the module docstring).

    The rule needs only the side's grad_outputs and parameter grads against the counterfactual ``cf``.
    """
    for r in rows:
        if r.status != Status.MISMATCH or r.pass_ != "backward" or r.layer not in cf or r.layer not in s_trace:
            continue
        s_rec, grads = s_trace[r.layer], cf[r.layer]
        if r.quantity == "grad_input":  # follows from the grad_output: the unit passed its local check
            errs = [relative_error(s, grads.get(f"grad_output.{i}")) for i, s in enumerate(s_rec.grad_outputs)
                    if f"grad_output.{i}" in grads]
        else:
            errs = [relative_error(s_rec.param_grads.get(r.quantity[len("grad_"):]), grads.get(r.quantity),
                                   terms=r.scale)]  # the row's scale of the terms: a parameter grad may cancel
        err = max(errs, default=math.inf)
        if err <= r.tolerance:
            r.status = Status.KINK
            r.note = f"agrees with the counterfactual oracle (the side's branch at its kinks): error {err:.2e}"
