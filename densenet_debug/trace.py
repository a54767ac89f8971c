"""Record what every unit of a model saw and produced in one forward+backward pass.

The common substrate of ``diff``, ``gradcheck`` and the reference fixtures: teacher forcing needs each
unit's exact inputs and grad_outputs, localisation needs its outputs, grad_inputs and parameter gradients.

A *unit* is a module that owns computation: every leaf module that runs, plus any non-leaf module whose own
``forward`` calls tensor functions (``F.relu``, ``torch.cat`` ... in a user model). :func:`discover_units`
finds them; :class:`Tracer` records them with hooks and removes every hook on exit.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from densenet_debug import progress
from densenet_debug._autograd import in_backward
from densenet_debug.capture.cow import CopyOnWrite
from densenet_debug.capture.graph import Edge, call_graph, gradient_edge, next_sequence_nr

QUANTITIES = ("inputs", "outputs", "grad_outputs", "grad_inputs", "param_grads", "buffers")
STORED_FIELDS = ("inputs", "outputs", "grad_outputs", "grad_inputs")  # activation-sized: what a store may spill
BUDGET_ENV = "DENSENET_DEBUG_TRACE_BUDGET_MB"
DEFAULT_BUDGET_MB = 4096  # BC-100 at batch 8 (3.6 GB of records) stays in memory; batch 64 peaks < 4x a plain step
MEMORY_SHARE = 5  # ... but never more than a fifth of the machine's memory (default_budget)


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
    # A unit called more than once: what its first call sent to each parameter (``param_grads`` sums every
    # call, as .grad does; the first call's inputs are all that is recorded, so local rows judge this share)
    call_param_grads: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Trace:
    """Records of the traced units, in forward order, plus the step's output and loss."""

    units: Mapping[str, UnitRecord]  # a dict, or StoredUnits when a TensorStore spilled part of the step
    output: Tensor | None = None
    loss: Tensor | None = None

    @property
    def spilled(self) -> bool:
        """True when some of the records live in a store's file (read back on access)."""
        return isinstance(self.units, StoredUnits) and self.units.store.spilled > 0

    def meta(self, name: str) -> UnitRecord:
        """``name``'s record without reading anything back: spilled tensors as meta tensors (shape, dtype)."""
        return self.units.meta(name) if isinstance(self.units, StoredUnits) else self.units[name]

    def metas(self) -> Trace:
        """The whole trace as :meth:`meta` records (for counting elements, reading layouts and dtypes)."""
        return Trace({n: self.meta(n) for n in self.units}, self.output, self.loss)

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
        return sorted(self.units, key=lambda n: self.meta(n).forward_index)

    @property
    def backward_order(self) -> list[str]:
        done = [n for n in self.units if self.meta(n).backward_index is not None]
        return sorted(done, key=lambda n: self.meta(n).backward_index)  # type: ignore[arg-type, return-value]


# -- compact storage ---------------------------------------------------------------------------------------
def default_budget() -> int:
    """Bytes of records the :class:`TensorStore` s of a process keep in memory together:
    ``$DENSENET_DEBUG_TRACE_BUDGET_MB`` (MiB), else 4096 MiB or a fifth of the machine's memory if that is less.

    A DenseNet-BC-100 step records ~228 MB per sample in float64 (each tensor once) and half that in float32,
    so a diff of two float32 sides holds ~455 MB per sample: batch 8 (3.6 GB) stays in memory, and past it a
    diff writes the rest to disk; its peak is then the float64 step itself plus this budget. What spilling
    costs at batch 8 (measured, 2 cores, one thread): 1.6 GB written, each record read back by several stages,
    and the oracle's graph not kept (each kink counterfactual re-runs the float64 step): 59 against 36 CPU
    seconds. At batch 64 the 4 GiB keep the diff under 4x a plain step's peak (7.1 GB at 2 GiB against 2.4 GB).
    The fifth of physical memory (``MemTotal``, fixed for a machine, so the same run spills the same way) is
    for small machines: the records are not the only thing a diff holds."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    try:
        mb = float(raw) if raw else min(DEFAULT_BUDGET_MB, _memory_total_mb() / MEMORY_SHARE)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        from densenet_debug.errors import UsageError

        raise UsageError(f"{BUDGET_ENV} must be a number of MiB >= 0, got {raw!r}")
    return int(mb * 2**20)


def _memory_total_mb() -> float:
    """Physical memory in MiB (Linux ``MemTotal``, or the cgroup's limit when lower); inf where unknown."""
    total = math.inf
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) / 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            raw = f.read().strip()
        if raw.isdigit():
            total = min(total, int(raw) / 2**20)
    except OSError:
        pass
    return total


@dataclass(frozen=True, eq=False)
class Spilled:
    """A recorded tensor in a :class:`TensorStore`'s file: its bytes at ``offset``, laid out with dimensions
    ``order`` outermost to innermost (so a channels_last tensor comes back channels_last)."""

    store: TensorStore
    offset: int
    size: tuple[int, ...]
    order: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        return _numel(self.size) * torch.empty((), dtype=self.dtype, device="meta").element_size()

    def load(self) -> Tensor:
        return self.store.read(self)

    @property
    def meta(self) -> Tensor:
        """A meta tensor of the same shape, strides and dtype: what it is, without reading it."""
        return torch.empty([self.size[d] for d in self.order], dtype=self.dtype, device="meta").permute(
            _inverse(self.order))


def materialize(t: Tensor | Spilled | None) -> Tensor | None:
    """The tensor itself, or a spilled one read back (a fresh copy)."""
    return t.load() if isinstance(t, Spilled) else t


def _numel(size: Sequence[int]) -> int:
    n = 1
    for d in size:
        n *= d
    return n


def _inverse(order: Sequence[int]) -> list[int]:
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return inv


class TensorStore:
    """Where a :class:`Tracer` keeps what it records: in memory while all live stores together hold less than
    ``budget`` bytes, the rest in a file.

    One copy per distinct tensor: an alias recorded twice (a unit's output is the next unit's input) or a
    gradient passed on unchanged (a unit's grad_input is the grad_output of the unit before it) is stored once,
    found by object identity and version while the tensor is alive (through a weak reference, so a freed
    tensor whose memory is reused never matches). A tensor over the budget is written when it is recorded, so
    its value is the one it had then (what copy-on-write keeps for an in-memory alias).

    The file is anonymous (unlinked as it is created, in the temp directory): nothing is left on disk however
    the process ends, and it is gone when the last record referring to it is. Reads copy into fresh memory
    rather than mapping the file: mapped pages count in the process's resident set (``ru_maxrss``) for as long
    as they stay mapped, and a judge reads each record a few times, one unit at a time.
    """

    kept_in_process = 0  # bytes every live store holds in memory: the budget is the process's, not a store's
    written_in_process = 0  # bytes every store of this process wrote (for benchmarks)

    def __init__(self, budget: int | None = None) -> None:
        self.budget = default_budget() if budget is None else budget
        self.kept = 0  # bytes held in memory by this store
        self.spilled = 0  # bytes written to the file
        self._held = [0]  # what this store adds to kept_in_process, given back when it is collected
        weakref.finalize(self, TensorStore._give_back, self._held)
        self._file = None
        self._end = 0
        self._seen: dict[int, tuple[weakref.ref, int, Tensor | Spilled]] = {}

    def keep(self, t: Tensor, clone: bool, to_cpu: bool = False) -> Tensor | Spilled:
        """``t`` detached (a private copy if ``clone``) while the budget allows, else written to the file."""
        found = self._seen.get(id(t))
        if found is not None and found[0]() is t and found[1] == t._version:
            return found[2]
        src = t.detach()
        n = src.numel() * src.element_size()
        kept: Tensor | Spilled
        if TensorStore.kept_in_process + n <= self.budget:
            TensorStore.kept_in_process += n
            self._held[0] += n
            self.kept += n
            kept = src.to("cpu", copy=clone) if to_cpu else (src.clone() if clone else src)
        else:
            kept = self._write(src)
        try:
            self._seen[id(t)] = (weakref.ref(t), t._version, kept)
        except TypeError:  # an object without weak references is never shared
            pass
        return kept

    @staticmethod
    def _give_back(held: list[int]) -> None:
        TensorStore.kept_in_process -= held[0]

    def seal(self) -> None:
        """The step is recorded: forget the identities (the records hold what they need)."""
        self._seen.clear()

    def _write(self, src: Tensor) -> Spilled:
        order = tuple(sorted(range(src.dim()), key=lambda d: -src.stride(d)))  # memory order, outermost first
        dense = src.permute(order)
        if not dense.is_contiguous():  # overlapping or gapped (a slice): stored row-major
            order = tuple(range(src.dim()))
            dense = src.contiguous()
        dense = dense.to("cpu")
        offset = self._end
        if dense.numel():
            view = memoryview(dense.reshape(-1).view(torch.uint8).numpy())
            done = 0
            try:
                if self._file is None:
                    self._file = tempfile.TemporaryFile(prefix="densenet-debug-spill-", buffering=0)
                while done < len(view):
                    done += os.pwrite(self._file.fileno(), view[done:], offset + done)
            except OSError as e:  # a full or unwritable temp directory is the environment's, not a finding
                from densenet_debug.errors import UsageError

                raise UsageError(f"cannot write recorded tensors past the memory budget to {tempfile.gettempdir()} "
                                 f"({e.strerror}): free space there, point TMPDIR elsewhere or raise "
                                 f"{BUDGET_ENV}") from e
            self.spilled += len(view)
            self._end += len(view)
            TensorStore.written_in_process += len(view)
        return Spilled(self, offset, tuple(src.shape), order, src.dtype, src.device)

    def read(self, s: Spilled) -> Tensor:
        dense = torch.empty([s.size[d] for d in s.order], dtype=s.dtype)
        if dense.numel():
            view = memoryview(dense.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                got = os.preadv(self._file.fileno(), [view[done:]], s.offset + done)
                if got <= 0:
                    raise RuntimeError("a spilled trace file was truncated while in use")
                done += got
        out = dense.permute(_inverse(s.order))
        out = out if s.device.type == "cpu" else out.to(s.device)
        out._dd_origin = (id(self), s.offset)  # a fresh tensor each read: memos key on where it was stored
        return out


class _Loaded(UnitRecord):
    """A stored record as a :class:`UnitRecord`: each spilled field is read back on first access and lives as
    long as this object does (a judge holds one unit at a time)."""

    def __init__(self, stored: UnitRecord) -> None:  # noqa: D107 - not the dataclass __init__ on purpose
        for f in fields(UnitRecord):
            if f.name not in STORED_FIELDS:
                object.__setattr__(self, f.name, getattr(stored, f.name))
        self._stored = stored

    def __getattr__(self, name: str) -> object:  # only reached for fields not read yet
        if name in STORED_FIELDS:
            value = [materialize(t) for t in getattr(self.__dict__["_stored"], name)]
            setattr(self, name, value)
            return value
        raise AttributeError(name)


class StoredUnits(Mapping[str, UnitRecord]):
    """A trace's records when a :class:`TensorStore` spilled some of them: looking a unit up reads its tensors
    back as they are used; the last unit looked up is kept, so a loop body that names it twice reads once."""

    def __init__(self, records: dict[str, UnitRecord], store: TensorStore) -> None:
        self._records, self.store = records, store
        self._last: tuple[str, UnitRecord] | None = None

    def __getitem__(self, name: str) -> UnitRecord:
        if not self.store.spilled:  # nothing to read back: the record itself (a wrapper per lookup cost 0.6 s a diff)
            return self._records[name]
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        rec = _Loaded(self._records[name])
        self._last = (name, rec)
        return rec

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> Iterator[UnitRecord]:
        """The records as stored, spilled tensors as :class:`Spilled` (nothing is read back)."""
        return iter(self._records.values())

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def meta(self, name: str) -> UnitRecord:
        stored = self._records[name]
        return replace(stored, **{f: [t.meta if isinstance(t, Spilled) else t for t in getattr(stored, f)]
                                  for f in STORED_FIELDS})


UnitSelector = Iterable[str] | Callable[[str, nn.Module], bool] | None


class Tracer:
    """Context manager that hooks the selected units of ``model`` and records one step.

    >>> with Tracer(model) as tracer:
    ...     loss = F.cross_entropy(model(x), y)
    ...     loss.backward()
    >>> trace = tracer.trace()

    ``units``: names, a predicate ``(name, module) -> bool``, or None for every leaf module.
    ``record``: a subset of :data:`QUANTITIES`, to bound memory. ``to_cpu`` moves records to the CPU.
    Tensors are kept as detached aliases, not copies; an in-place op inside the step copies the aliases it is
    about to overwrite first (:class:`~densenet_debug.capture.cow.CopyOnWrite`). If one is changed in place
    where that cannot see it (after the block), :meth:`trace` fails loudly instead of returning a wrong record.
    ``copy_on_write=False`` keeps copies instead and enters no dispatch mode: ``torch.compile`` silently runs
    eagerly while one is active, so a compiled side must be traced that way. ``store`` (a :class:`TensorStore`)
    keeps the activation-sized quantities (inputs, outputs, gradients) once each and writes those past its
    memory budget to disk as they are recorded; the trace then reads them back unit by unit (:class:`StoredUnits`).

    Gradients come from hooks on the autograd nodes each unit's first call created (found by sequence number,
    :mod:`densenet_debug.capture.graph`), not from module full backward hooks, which wrap tensors and make
    in-place ops (``nn.ReLU(inplace=True)``) crash. A unit's ``grad_outputs`` are what its output nodes'
    backward received, in that layout; ``grad_inputs[i]`` is the sum of what its own nodes send to input i.
    Only the first call of a unit is recorded (``calls`` counts them); hooks run until the block exits. A unit
    called more than once keeps both its parameters' ``.grad`` (every call) and its first call's share
    (``call_param_grads``, from the same node hooks: what its nodes sent to each parameter's AccumulateGrad).
    """

    def __init__(
        self, model: nn.Module, units: UnitSelector = None, record: Sequence[str] = QUANTITIES,
        to_cpu: bool = False, copy_on_write: bool = True, store: TensorStore | None = None,
    ) -> None:
        unknown = set(record) - set(QUANTITIES)
        if unknown:
            raise ValueError(f"unknown quantities {sorted(unknown)}; choose from {QUANTITIES}")
        self.model = model
        self.record = frozenset(record)
        self.to_cpu = to_cpu
        self.copy_on_write = copy_on_write
        self.store = store
        self.modules = dict(_select(model, units))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._records: dict[str, UnitRecord] = {}
        self._calls: dict[str, _FirstCall] = {}
        self._cow = CopyOnWrite()
        self._active = False
        self._forward_count = 0
        self._backward_count = 0

    def __enter__(self) -> Tracer:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook(name), with_kwargs=True))
        if self._keeps_aliases:  # only kept aliases need copy-on-write; its dispatch mode costs every op
            self._cow.__enter__()
        progress.expect(len(self.modules) * (2 if self._wants_grads else 1))  # each unit's forward and backward
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False
        if self._keeps_aliases:
            self._cow.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def _keeps_aliases(self) -> bool:
        return self.copy_on_write and bool(self.record & {"inputs", "outputs"})

    @property
    def _wants_grads(self) -> bool:
        return bool(self.record & {"grad_outputs", "grad_inputs"})

    def trace(self) -> Trace:
        """Collect the records (parameter gradients are read now, after backward)."""
        stale = self._cow.stale()
        if stale:
            raise RuntimeError(f"a tensor recorded at {stale[0]} was modified in place after it was recorded")
        with _disable_current_modes():  # the copies are the tool's, no op of the step
            for name, rec in self._records.items():
                if "param_grads" in self.record:
                    for pname, p in self.modules[name].named_parameters(recurse=False):
                        if p.grad is not None:
                            rec.param_grads[pname] = self._keep(p.grad, clone=True)
                if rec.calls == 1:  # .grad is the first call's share
                    rec.call_param_grads = {}
        if self.store is None:
            return Trace(dict(self._records))
        self.store.seal()  # the trace holds the store, so its share of the budget is given back with it
        return Trace(StoredUnits(dict(self._records), self.store))

    # -- forward hooks -------------------------------------------------------------------------------
    def _keep(self, t: Tensor, clone: bool = False) -> Tensor:
        t = t.detach()
        if self.to_cpu:
            return t.to("cpu", copy=clone)
        return t.clone() if clone else t

    def _stored(self, t: Tensor, clone: bool) -> Tensor | Spilled:
        """An activation-sized quantity: kept as before, or through the store (once, maybe on disk)."""
        if self.store is None:
            return self._keep(t, clone)
        return self.store.keep(t, clone, self.to_cpu)

    def _add_grad(self, grads: list, i: int, g: Tensor) -> None:
        """Record ``g`` as ``grads[i]``, or add it (several of a unit's nodes can feed one input)."""
        if grads[i] is None:
            grads[i] = self._stored(g, clone=True)
        elif self.store is None:
            _accumulate(grads, i, self._keep(g, clone=True))
        else:
            total = materialize(grads[i])
            grads[i] = self.store.keep(total + g.detach().to(total.device), clone=False)

    def _aliases(self, name: str, values: Sequence[object]) -> list[Tensor | Spilled | None]:
        if not self.copy_on_write:  # no dispatch mode to see later writes: keep copies instead of aliases
            with _disable_current_modes():
                return [self._stored(v, clone=True) if isinstance(v, Tensor) else None for v in values]
        kept: list[Tensor | Spilled | None] = [self._stored(v, clone=False) if isinstance(v, Tensor) else None
                                               for v in values]
        for i, (k, v) in enumerate(zip(kept, values)):
            if isinstance(k, Tensor) and k.device == v.device:  # type: ignore[union-attr]
                self._cow.watch(kept, i, label=name)  # a spilled one was written with its value of now
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
            if self._wants_grads:
                params = [(k, gradient_edge(p)) for k, p in module.named_parameters(recurse=False)]
                self._calls[name] = _FirstCall(next_sequence_nr(), [gradient_edge(a) for a in args],
                                               [(k, e) for k, e in params if e is not None])
            if "inputs" in self.record:
                rec.inputs = self._aliases(name, args)
            if "buffers" in self.record:
                rec.buffers_before = {k: self._keep(b, clone=True) for k, b in module.named_buffers(recurse=False)}

        return _unobserved(hook)

    def _post_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            rec = self._records[name]
            if in_backward() or rec.calls > 1:
                return
            outputs = flatten_tensors(output)
            progress.advance()
            if "outputs" in self.record:
                rec.outputs = self._aliases(name, outputs)  # type: ignore[assignment]
            if "buffers" in self.record:
                rec.buffers_after = {k: self._keep(b, clone=True) for k, b in module.named_buffers(recurse=False)}
            call = self._calls.get(name)
            if call is not None:
                self._hook_nodes(rec, call, [gradient_edge(o) for o in outputs], [o.shape for o in outputs])

        return _unobserved(hook)

    # -- backward: hooks on the call's own autograd nodes ----------------------------------------------
    def _hook_nodes(self, rec: UnitRecord, call: _FirstCall, output_edges: list[Edge | None],
                    shapes: list[torch.Size]) -> None:
        graph = call_graph(call.first_seq, next_sequence_nr(), output_edges,
                           call.input_edges + [e for _, e in call.param_edges])
        n_in, n_out = len(call.input_edges), len(output_edges)
        by_node: dict[int, tuple[Node, list[tuple[int, int]]]] = {}
        for j, edge in enumerate(output_edges):
            if edge is not None:
                by_node.setdefault(id(edge[0]), (edge[0], []))[1].append((j, edge[1]))
        for node, slots in by_node.values():
            self._handles.append(node.register_prehook(self._grad_out_hook(rec, slots, n_out, n_in)))
        for j, edge in enumerate(output_edges):
            base = _reshaped_base(edge, call.first_seq)
            if base is not None:
                hook = self._grad_out_hook(rec, [(j, 0)], n_out, n_in)
                self._handles.append(base[0].register_prehook(_through_base(hook, base[1], shapes[j])))
        # An output that is an input returned as-is: its gradient passes through this unit unchanged.
        passthrough = [(j, i) for j, e in enumerate(output_edges) for i, f in enumerate(call.input_edges)
                       if e is not None and f is not None and e[0] is f[0] and e[1] == f[1]]
        call.passthrough = passthrough
        feeds: dict[int, tuple[Node, list[tuple[int, int]]]] = {}
        for feed in graph.feeds:
            feeds.setdefault(id(feed.node), (feed.node, []))[1].append((feed.position, feed.input_index))
        if self.record & {"grad_inputs", "param_grads"}:
            for node, pairs in feeds.values():
                self._handles.append(node.register_hook(self._grad_in_hook(rec, pairs, n_in)))

    def _grad_out_hook(self, rec: UnitRecord, slots: list[tuple[int, int]], n_out: int, n_in: int) -> Callable:
        def hook(grad_outputs: tuple) -> None:
            if not self._active:
                return
            if rec.backward_index is None:
                progress.advance()
                rec.backward_index = self._backward_count
                self._backward_count += 1
                rec.grad_output_layouts = [None] * n_out
                if "grad_outputs" in self.record:
                    rec.grad_outputs = [None] * n_out
                if "grad_inputs" in self.record:
                    rec.grad_inputs = [None] * n_in
            elif rec.grad_output_layouts and all(rec.grad_output_layouts[j] is not None for j, _ in slots):
                return  # a second backward through a kept graph: the first one is the record
            for j, nr in slots:
                g = grad_outputs[nr] if nr < len(grad_outputs) else None
                if g is None:
                    continue
                rec.grad_output_layouts[j] = Layout.of(g)
                if "grad_outputs" in self.record:
                    rec.grad_outputs[j] = self._stored(g, clone=True)
                if "grad_inputs" in self.record:
                    for i in (i for jj, i in self._calls[rec.name].passthrough if jj == j):
                        self._add_grad(rec.grad_inputs, i, g)

        return _unobserved(hook)

    def _grad_in_hook(self, rec: UnitRecord, pairs: list[tuple[int, int]], n_in: int) -> Callable:
        done = [False]

        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            if not self._active or done[0]:
                return
            done[0] = True
            if not rec.grad_inputs:
                rec.grad_inputs = [None] * n_in
            for position, i in pairs:
                g = grad_inputs[position]
                if g is None:
                    continue
                if i < n_in:
                    if "grad_inputs" in self.record:
                        self._add_grad(rec.grad_inputs, i, g)
                elif "param_grads" in self.record:  # a parameter: its AccumulateGrad edge follows the inputs'
                    pname = self._calls[rec.name].param_edges[i - n_in][0]
                    have = rec.call_param_grads.get(pname)
                    rec.call_param_grads[pname] = g.detach().clone() if have is None else have + g

        return _unobserved(hook)


# Backward nodes of views that keep every element, only reshaped (``view_as`` at the end of instance norm).
_RESHAPES = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0"}


def _reshaped_base(edge: Edge | None, first_seq: int) -> tuple[Node, int] | None:
    """(node, input slot) of the tensor an output is a reshaped view of, when the same call made that tensor.

    An in-place op on the output (``nn.ReLU(inplace=True)`` after an instance norm, whose output is
    ``view_as`` of its batch norm's) rebases the view: its own backward node is bypassed and never fires, while
    the base's still does, with the same gradient reshaped. A hook there records the grad_output then, and only
    then: the view's node, when it fires, fires first."""
    if edge is None:
        return None
    node = edge[0]
    if type(node).__name__ not in _RESHAPES or len(node.next_functions) != 1:  # (a Function's ctx may own .name)
        return None
    base, slot = node.next_functions[0]
    if base is None or base._sequence_nr() < first_seq:  # noqa: SLF001 - the call's own nodes, by number
        return None
    return base, slot


def _through_base(hook: Callable, slot: int, shape: torch.Size) -> Callable:
    """``hook`` (a unit's grad_output hook for one output) fed from the base's node, reshaped to the output."""
    def run(grad_outputs: tuple) -> None:
        g = grad_outputs[slot] if slot < len(grad_outputs) else None
        if g is not None and g.numel() == math.prod(shape):
            hook((g.reshape(shape),))
    return run


def _unobserved(hook: Callable) -> Callable:
    """Run a hook with dispatch modes off: its own detaches and copies are not ops of the model's step
    (an op-level capture around the Tracer must not record them)."""

    @functools.wraps(hook)
    def run(*args: object) -> object:
        with _disable_current_modes():
            return hook(*args)

    return run


@dataclass
class _FirstCall:
    """What the pre-hook of a unit's first call saw: the next sequence number and its inputs' gradient edges."""

    first_seq: int
    input_edges: list[Edge | None]
    param_edges: list[tuple[str, Edge]] = field(default_factory=list)  # the unit's own parameters
    passthrough: list[tuple[int, int]] = field(default_factory=list)


def _accumulate(grads: list[Tensor | None], i: int, g: Tensor) -> None:
    """Add ``g`` into ``grads[i]`` (several of a unit's nodes can feed one input)."""
    grads[i] = g if grads[i] is None else grads[i] + g


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
    to_cpu: bool = False, copy_on_write: bool = True, store: TensorStore | None = None,
) -> Trace:
    """One traced step: clear gradients, forward, loss, backward. Returns the :class:`Trace`.

    ``copy_on_write=False`` keeps copies of inputs and outputs instead of aliases guarded by a dispatch mode:
    needed under ``torch.compile``, which runs eagerly (silently) while any dispatch mode is active.
    ``store``: see :class:`Tracer`.
    """
    model.zero_grad(set_to_none=True)
    with Tracer(model, units, record, to_cpu, copy_on_write, store) as tracer:
        output = model(inputs)
        loss = loss_fn(output, target)
        loss.backward()
    trace = tracer.trace()
    with _disable_current_modes():
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


def discover_units(model: nn.Module, *example_inputs: Tensor, nested: set[str] | None = None) -> list[str]:
    """Names of the modules that own computation, in the order they first run.

    Leaf modules that run are units. A non-leaf module is a unit too when its own ``forward`` (not its
    children's) calls a tensor-producing torch function, so functional ops in user models are covered.

    A module called with tensors inside a list, tuple or dict, or as keyword arguments (torchvision's
    ``_DenseLayer(features)``, handed the block's list of feature maps) is no unit: a unit's record and
    replay take its tensors as positional arguments. Its own ops are then code between its children
    (:mod:`densenet_debug.verdict.between`), as a model's own ``forward`` is; its children stay units. Their
    names are added to ``nested`` when given.
    """
    named = dict(model.named_modules())
    leaves = {n for n, m in named.items() if not any(True for _ in m.children())}
    stack: list[str] = []
    order: list[str] = []
    own: set[str] = set()
    nested = set() if nested is None else nested
    handles = []
    for name, module in named.items():
        def pre(m: nn.Module, a: tuple, kw: dict, n: str = name) -> None:
            stack.append(n)
            if n not in order:
                order.append(n)
            if not _positional_tensors(a, kw):
                nested.add(n)

        def post(m: nn.Module, a: tuple, o: object) -> None:
            stack.pop()

        handles += [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    try:
        with _preserved_state(model), torch.no_grad(), _OwnComputeMode(stack, own):
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return [n for n in order if (n in leaves or n in own) and n not in nested]


def _positional_tensors(args: tuple, kwargs: dict) -> bool:
    """Every tensor of a call is a positional argument of its own (none inside a container or a keyword)."""
    from torch.utils._pytree import tree_leaves

    tensors = sum(isinstance(t, Tensor) for t in tree_leaves((args, kwargs)))
    return tensors == sum(isinstance(a, Tensor) for a in args)
