"""Record what every unit of a model saw and produced in one forward+backward pass.

The common substrate of ``diff``, ``gradcheck`` and the reference fixtures: teacher forcing needs each
unit's exact inputs and grad_outputs, localisation needs its outputs, grad_inputs and parameter gradients.

A *unit* is a module that owns computation: every leaf module that runs, plus any non-leaf module whose own
``forward`` calls tensor functions (``F.relu``, ``torch.cat`` ... in a user model). :func:`discover_units`
finds them; :class:`Tracer` records them with hooks and removes every hook on exit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from densenet_debug._autograd import in_backward

QUANTITIES = ("inputs", "outputs", "grad_outputs", "grad_inputs", "param_grads", "buffers")


@dataclass(frozen=True)
class Layout:
    """Where a tensor sat in memory: layout bugs (#708) only show when a replay reproduces it."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    @classmethod
    def of(cls, t: Tensor) -> Layout:
        return cls(tuple(t.shape), tuple(t.stride()), t.storage_offset())

    @property
    def is_contiguous(self) -> bool:
        return self.storage_offset == 0 and self.stride == Layout.of(torch.empty(self.size, device="meta")).stride


def with_layout(t: Tensor, layout: Layout | None, fill: float = 1.0) -> Tensor:
    """A tensor equal to ``t`` but laid out as ``layout`` (strides and storage offset) in a fresh buffer.

    The rest of the buffer holds ``fill``, so a kernel that reads past the view reads plausible numbers,
    as it would in the real step (where the neighbours are other channels' gradients), not zeros.
    """
    if layout is None or tuple(t.shape) != layout.size:
        return t
    extent = layout.storage_offset + 1 + sum((n - 1) * st for n, st in zip(layout.size, layout.stride) if n)
    buffer = torch.full((extent,), fill, dtype=t.dtype, device=t.device)
    out = buffer.as_strided(layout.size, layout.stride, layout.storage_offset)
    out.copy_(t)
    return out


@dataclass
class UnitRecord:
    """One unit's view of one step. Tensors are detached; ``None`` stands for a non-tensor or no gradient."""

    name: str
    kind: str
    forward_index: int
    training: bool
    inputs: list[Tensor | None] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    grad_outputs: list[Tensor | None] = field(default_factory=list)
    grad_inputs: list[Tensor | None] = field(default_factory=list)
    param_grads: dict[str, Tensor] = field(default_factory=dict)
    buffers_before: dict[str, Tensor] = field(default_factory=dict)
    buffers_after: dict[str, Tensor] = field(default_factory=dict)
    input_layouts: list[Layout | None] = field(default_factory=list)
    grad_output_layouts: list[Layout | None] = field(default_factory=list)
    backward_index: int | None = None
    calls: int = 0


@dataclass
class Trace:
    """Records of the traced units, in forward order, plus the step's output and loss."""

    units: dict[str, UnitRecord]
    output: Tensor | None = None
    loss: Tensor | None = None

    def __getitem__(self, name: str) -> UnitRecord:
        return self.units[name]

    def __contains__(self, name: object) -> bool:
        return name in self.units

    def __iter__(self) -> Iterator[UnitRecord]:
        return iter(self.units.values())

    def __len__(self) -> int:
        return len(self.units)

    @property
    def forward_order(self) -> list[str]:
        return sorted(self.units, key=lambda n: self.units[n].forward_index)

    @property
    def backward_order(self) -> list[str]:
        done = [n for n, r in self.units.items() if r.backward_index is not None]
        return sorted(done, key=lambda n: self.units[n].backward_index)  # type: ignore[arg-type, return-value]


UnitSelector = Iterable[str] | Callable[[str, nn.Module], bool] | None


class Tracer:
    """Context manager that hooks the selected units of ``model`` and records one step.

    >>> with Tracer(model) as tracer:
    ...     loss = F.cross_entropy(model(x), y)
    ...     loss.backward()
    >>> trace = tracer.trace()

    ``units``: names, a predicate ``(name, module) -> bool``, or None for every leaf module.
    ``record``: a subset of :data:`QUANTITIES`, to bound memory. ``to_cpu`` moves records to the CPU.
    Tensors are kept as detached aliases, not copies; if one is changed in place before :meth:`trace`,
    tracing fails loudly instead of returning a wrong record.
    """

    def __init__(
        self, model: nn.Module, units: UnitSelector = None, record: Sequence[str] = QUANTITIES,
        to_cpu: bool = False,
    ) -> None:
        unknown = set(record) - set(QUANTITIES)
        if unknown:
            raise ValueError(f"unknown quantities {sorted(unknown)}; choose from {QUANTITIES}")
        self.model = model
        self.record = frozenset(record)
        self.to_cpu = to_cpu
        self.modules = dict(_select(model, units))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._records: dict[str, UnitRecord] = {}
        self._versions: list[tuple[str, Tensor, int]] = []
        self._forward_count = 0
        self._backward_count = 0

    def __enter__(self) -> Tracer:
        # Expected for the first unit, whose input needs no gradient: its grad_inputs are then None.
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook(name), with_kwargs=True))
            if self.record & {"grad_outputs", "grad_inputs"}:
                self._handles.append(module.register_full_backward_pre_hook(self._grad_out_hook(name)))
                self._handles.append(module.register_full_backward_hook(self._grad_in_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._warnings.__exit__(*exc)

    def trace(self) -> Trace:
        """Collect the records (parameter gradients are read now, after backward)."""
        for name, tensor, version in self._versions:
            if tensor._version != version:
                raise RuntimeError(f"a tensor recorded at {name} was modified in place after it was recorded")
        for name, rec in self._records.items():
            if "param_grads" in self.record:
                for pname, p in self.modules[name].named_parameters(recurse=False):
                    if p.grad is not None:
                        rec.param_grads[pname] = self._keep(p.grad, clone=True)
        return Trace(dict(self._records))

    # -- hooks -------------------------------------------------------------------------------------
    def _keep(self, t: Tensor, clone: bool = False) -> Tensor:
        t = t.detach()
        if self.to_cpu:
            return t.to("cpu", copy=clone)
        return t.clone() if clone else t

    def _alias(self, name: str, t: object) -> Tensor | None:
        if not isinstance(t, Tensor):
            return None
        kept = self._keep(t)
        if not self.to_cpu:
            self._versions.append((name, kept, kept._version))
        return kept

    def _pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if in_backward():  # checkpoint recomputation: already recorded in the real forward
                return
            rec = self._records.get(name)
            if rec is not None:
                rec.calls += 1
                return
            rec = UnitRecord(name, type(module).__name__, self._forward_count, module.training, calls=1)
            self._forward_count += 1
            self._records[name] = rec
            rec.input_layouts = [Layout.of(a) if isinstance(a, Tensor) else None for a in args]
            if "inputs" in self.record:
                rec.inputs = [self._alias(name, a) for a in args]
            if "buffers" in self.record:
                rec.buffers_before = {k: self._keep(b, clone=True) for k, b in module.named_buffers(recurse=False)}

        return hook

    def _post_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            rec = self._records[name]
            if in_backward() or rec.calls > 1:
                return
            if "outputs" in self.record:
                rec.outputs = [self._alias(name, o) for o in flatten_tensors(output)]  # type: ignore[misc]
            if "buffers" in self.record:
                rec.buffers_after = {k: self._keep(b, clone=True) for k, b in module.named_buffers(recurse=False)}

        return hook

    def _grad_out_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, grad_output: tuple) -> None:
            rec = self._records.get(name)
            if rec is None or rec.backward_index is not None:
                return
            rec.backward_index = self._backward_count
            self._backward_count += 1
            rec.grad_output_layouts = [None if g is None else Layout.of(g) for g in grad_output]
            if "grad_outputs" in self.record:
                rec.grad_outputs = [None if g is None else self._keep(g, clone=True) for g in grad_output]

        return hook

    def _grad_in_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            rec = self._records.get(name)
            if rec is None or rec.grad_inputs:
                return
            if "grad_inputs" in self.record:
                rec.grad_inputs = [None if g is None else self._keep(g, clone=True) for g in grad_input]

        return hook


def flatten_tensors(output: object) -> list[Tensor]:
    """The tensors of a module's output (a tensor, or nested tuples, lists and dicts of them), in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in flatten_tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in flatten_tensors(o)]
    return []


def _select(model: nn.Module, units: UnitSelector) -> Iterator[tuple[str, nn.Module]]:
    named = dict(model.named_modules())
    if units is None:
        yield from ((n, m) for n, m in named.items() if n and not any(True for _ in m.children()))
    elif callable(units):
        yield from ((n, m) for n, m in named.items() if units(n, m))
    else:
        for name in units:
            if name not in named:
                raise KeyError(f"no module named {name!r} in the model")
            yield name, named[name]


def trace_step(
    model: nn.Module, inputs: Tensor, target: Tensor, units: UnitSelector = None,
    record: Sequence[str] = QUANTITIES, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    to_cpu: bool = False,
) -> Trace:
    """One traced step: clear gradients, forward, loss, backward. Returns the :class:`Trace`."""
    model.zero_grad(set_to_none=True)
    with Tracer(model, units, record, to_cpu) as tracer:
        output = model(inputs)
        loss = loss_fn(output, target)
        loss.backward()
    trace = tracer.trace()
    trace.output, trace.loss = output.detach(), loss.detach()
    return trace


# Tensor methods that read metadata or are no-ops for gradient flow; they do not make a module a unit.
_NO_MATH = {"size", "dim", "numel", "is_contiguous", "__get__", "__len__", "requires_grad_", "__format__",
            "__repr__", "__bool__", "__index__", "is_floating_point", "element_size", "stride", "storage_offset",
            "data_ptr", "__hash__", "__eq__"}


class _OwnComputeMode(TorchFunctionMode):
    def __init__(self, stack: list[str], found: set[str]) -> None:
        super().__init__()
        self.stack, self.found = stack, found

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if self.stack and name not in _NO_MATH and isinstance(out, Tensor):
            self.found.add(self.stack[-1])
        return out


@contextmanager
def _preserved_state(model: nn.Module) -> Iterator[None]:
    """Run a probing forward without changing BN statistics or the RNG stream."""
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])


def discover_units(model: nn.Module, *example_inputs: Tensor) -> list[str]:
    """Names of the modules that own computation, in the order they first run.

    Leaf modules that run are units. A non-leaf module is a unit too when its own ``forward`` (not its
    children's) calls a tensor-producing torch function, so functional ops in user models are covered.
    """
    named = dict(model.named_modules())
    leaves = {n for n, m in named.items() if not any(True for _ in m.children())}
    stack: list[str] = []
    order: list[str] = []
    own: set[str] = set()
    handles = []
    for name, module in named.items():
        def pre(m: nn.Module, a: tuple, n: str = name) -> None:
            stack.append(n)
            if n not in order:
                order.append(n)

        def post(m: nn.Module, a: tuple, o: object) -> None:
            stack.pop()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with _preserved_state(model), torch.no_grad(), _OwnComputeMode(stack, own):
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return [n for n in order if n in leaves or n in own]
