"""The capture dispatch mode: every aten op of a step, forward and backward, attributed to its module.

Why a dispatch mode: it sits below autograd, so it sees the ops a model really runs however it is written
(``F.relu`` in a composite, ``torch.cat`` in a closure, in-place ops, a custom Function's body, the ops
autograd's nodes run in backward) and the exact layouts they receive. Module hooks only give forward
attribution; backward attribution goes through the autograd node:

- forward: a global stack of module paths from forward pre/post hooks of the model's modules.
- node creator: autograd creates an op's node before redispatching, so inside dispatch the thread's next
  sequence number is the new node's + 1. Numbers allocated after an op's dispatch returned (``CopySlices``
  after an in-place op on a view) belong to that op. A custom Function's node is numbered when ``apply``
  starts; ``Function.apply`` is wrapped during capture to claim it (and to tag the ops of its forward).
- backward: ``_current_autograd_node()`` names the running node; its number names the forward op that
  created it, hence its module. AccumulateGrad nodes (all numbered 2**64-1) name their parameter. Ops a node
  runs after its post-hooks are the engine summing fan-out gradients: phase ``accumulate``.
- recompute: non-reentrant checkpoint replays forward ops inside backward under its ``_recomputation_hook``
  saved-tensor hooks (and module hooks fire again); those ops are phase ``recompute``, keyed like the forward
  ops they repeat. ModTracker-style "active modules" are too coarse for this (a DenseNet block's cat stays
  active until the block's backward ends), hence nodes.

The tool's own copies run inside ``__torch_dispatch__``, where the mode is off, so they are never captured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from densenet_debug._autograd import in_backward
from densenet_debug.capture.cow import Watcher
from densenet_debug.capture.graph import next_sequence_nr
from densenet_debug.capture.records import OUTSIDE, Capture, Key, NodeRef, OpRecord, Phase, TensorLayout, plain
from densenet_debug.capture.writes import written_tensors

ACCUMULATE_GRAD = "torch::autograd::AccumulateGrad"
# Ops whose outputs are uninitialised memory: their values mean nothing and are not kept.
_UNINITIALISED = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.new_empty.default",
                  "aten.new_empty_strided.default", "aten.empty_like.default"}


def _checkpoint_region() -> tuple[str, object] | None:
    """("checkpoint" | "recompute", the checkpoint frame) while torch.utils.checkpoint (non-reentrant) runs.

    Read from the saved-tensor hooks checkpoint pushes: ``_checkpoint_hook`` in the first forward,
    ``_recomputation_hook`` when backward replays it; both close over the region's ``_CheckpointFrame``.
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    if hooks is None:
        return None
    name = getattr(hooks[0], "__qualname__", "")
    kind = "recompute" if "_recomputation_hook" in name else "checkpoint" if "_checkpoint_hook" in name else None
    if kind is None:
        return None
    frame = _closure_value(hooks[0], ("frame", "target_frame_ref"))
    if callable(frame) and not hasattr(frame, "recompute_fn"):  # a weakref to the frame
        frame = frame()
    return kind, frame


def _closure_value(fn: object, names: tuple[str, ...], depth: int = 3) -> object:
    """A variable named in ``names`` in ``fn``'s closure, looking through wrappers (torch._dynamo.disable)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    values = dict(zip(code.co_freevars, (c.cell_contents for c in cells))) if code is not None else {}
    for name in names:
        if name in values:
            return values[name]
    if depth:
        for inner in [getattr(fn, "__wrapped__", None), *values.values()]:
            if callable(inner):
                found = _closure_value(inner, names, depth - 1)
                if found is not None:
                    return found
    return None


class _Where:
    """Where an op runs: phase, module path, node, the node's creator and custom Function."""

    __slots__ = ("phase", "module", "node", "creator", "function")

    def __init__(self, phase: Phase, module: str, node: NodeRef | None = None, creator: Key | None = None,
                 function: str | None = None) -> None:
        self.phase, self.module, self.node, self.creator, self.function = phase, module, node, creator, function


class OpCapture(TorchDispatchMode):
    """Record every aten op into :attr:`capture`. Use through :func:`capture`."""

    def __init__(self, model: nn.Module, values: bool | Callable[[str], bool] = False) -> None:
        super().__init__()
        self.capture = Capture()
        self.values = values
        self.watcher = Watcher()
        self.stack: list[str] = []
        self.functions: list[str] = []
        self.params = {id(p): f"{m}.{n}" if m else n for m, mod in model.named_modules()
                       for n, p in mod.named_parameters(recurse=False)}
        self._counts: dict[tuple, int] = {}
        self._counted: set[Key] = set()  # forward keys seen, for recompute's ``repeats``
        self._last_seq = next_sequence_nr()
        self._last_key: Key | None = None
        self._nodes: dict[int, Node] = {}  # keeps node wrappers alive, so ids stay unique
        self._finished: set[int] = set()
        self._handles: list = []
        self._regions: dict[int, tuple[object, str]] = {}  # checkpoint frame id -> (frame, module path)

    # -- dispatch ------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        where = self._where()
        self.watcher.before_op(func, args, kwargs)
        leaves = tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, Tensor)]
        written_ids = {id(t) for t in written_tensors(func, args, kwargs)}
        written = tuple(i for i, t in enumerate(tensors) if id(t) in written_ids)
        record = OpRecord(
            index=len(self.capture.records), key=(), phase=where.phase, op=str(func), module=where.module,
            input_layouts=tuple(TensorLayout.of(t) for t in tensors),
            arguments=_non_tensor_arguments(func, args, kwargs), output_layouts=(),
            written=written, node=where.node, creator=where.creator, function=where.function)
        keep_values = self.values(str(func)) if callable(self.values) else self.values
        if keep_values:
            record.input_values = [t.detach().clone() if i in written else t.detach() for i, t in enumerate(tensors)]
            self._watch(record.input_values, written)
        record.key = self._key(record)
        if where.phase == "forward":
            self._claim_nodes(record.key)
        out = func(*args, **kwargs)
        outs = tree_leaves(out)
        record.output_layouts = tuple(TensorLayout.of(o) if isinstance(o, Tensor) else None for o in outs)
        if keep_values:
            keep = record.op not in _UNINITIALISED
            record.output_values = [o.detach() if keep and isinstance(o, Tensor) else None for o in outs]
            self._watch(record.output_values, ())
        self.capture.records.append(record)
        self._last_seq = max(self._last_seq, next_sequence_nr())
        return out

    def _watch(self, values: list[Tensor | None], skip: tuple[int, ...]) -> None:
        for i, v in enumerate(values):
            if v is not None and i not in skip:
                self.watcher.watch(values, i)

    # -- attribution ----------------------------------------------------------------------------------
    def _where(self) -> _Where:
        function = self.functions[-1] if self.functions else None
        region = _checkpoint_region()
        if not in_backward():
            module = self.stack[-1] if self.stack else OUTSIDE
            if region is not None:  # remember where the region runs: its recompute may start outside modules
                self._regions.setdefault(id(region[1]), (region[1], module))
            return _Where("forward", module, function=function)
        if (region is not None and region[0] == "recompute") or self.stack:
            base = self._regions.get(id(region[1]), (None, OUTSIDE))[1] if region is not None else OUTSIDE
            return _Where("recompute", self.stack[-1] if self.stack else base, function=function)
        node = torch._C._current_autograd_node()
        if node is None:
            return _Where("backward", OUTSIDE)
        self._see(node)
        seq, name = node._sequence_nr(), node.name()
        ref = NodeRef(sequence_nr=seq, name=name)
        if name == ACCUMULATE_GRAD:
            param = self.params.get(id(node.variable))
            module = OUTSIDE if param is None else param.rpartition(".")[0]
            return _Where("accumulate", module, ref, ("param", param or OUTSIDE))
        creator = self.capture.creators.get(seq)
        cls = getattr(node, "_forward_cls", None)
        phase: Phase = "accumulate" if id(node) in self._finished else "backward"
        module = creator[1] if creator is not None else OUTSIDE
        return _Where(phase, module, ref, creator, cls.__name__ if cls is not None else None)

    def _key(self, record: OpRecord) -> Key:
        if record.phase in ("forward", "recompute"):
            base: tuple = (record.phase, record.module, record.op)
        else:
            base = (record.phase, record.creator, record.node.name if record.node else None, record.op)
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        if record.phase == "recompute":  # checkpoint's own pack-hook detaches repeat nothing
            twin = ("forward", record.module, record.op, k)
            record.repeats = twin if twin in self._counted else None
        elif record.phase == "forward":
            self._counted.add((*base, k))
        return (*base, k)

    def _claim_nodes(self, key: Key) -> None:
        """Name the creator of the nodes numbered since the last op (see the module docstring)."""
        now = next_sequence_nr()
        creators = self.capture.creators
        if self._last_key is not None:
            for n in range(self._last_seq, now - 1):
                creators.setdefault(n, self._last_key)
        if now - 1 >= self._last_seq:
            owner = key if torch.is_grad_enabled() else self._last_key
            if owner is not None:
                creators.setdefault(now - 1, owner)
        self._last_seq, self._last_key = now, key

    def _see(self, node: Node) -> None:
        """Keep ``node`` alive and learn when its own work ends (its post-hooks run)."""
        if id(node) in self._nodes:
            return
        self._nodes[id(node)] = node
        self._handles.append(node.register_hook(partial(_finish, self._finished, id(node))))

    def see_graph(self, outputs: list[Tensor]) -> None:
        """Hook every node reachable from ``outputs`` now, so nodes without ops of their own are known too."""
        stack = [o.grad_fn for o in outputs if isinstance(o, Tensor) and o.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or id(node) in self._nodes:
                continue
            self._see(node)
            stack.extend(n for n, _ in node.next_functions)

    # -- module stack and custom Functions -------------------------------------------------------------
    def _apply(self, original, cls, *args, **kwargs):  # noqa: ANN001, ANN202
        if in_backward():
            return original(cls, *args, **kwargs)
        first = next_sequence_nr()
        module = self.stack[-1] if self.stack else OUTSIDE
        base = ("function", module, cls.__name__)
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        self.functions.append(cls.__name__)
        try:
            out = original(cls, *args, **kwargs)
        finally:
            self.functions.pop()
        now = next_sequence_nr()
        if now > first:
            self.capture.creators[first] = (*base, k)
        self._last_seq = max(self._last_seq, now)
        return out

    def cleanup(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._nodes.clear()
        self._regions.clear()


def _non_tensor_arguments(func, args: tuple, kwargs: dict) -> tuple[tuple[str, object], ...]:  # noqa: ANN001
    """(name, value) of every schema argument that holds no tensor, in schema order (None kept)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(a.name, a.default_value if a.has_default_value() else None)
        if not any(isinstance(v, Tensor) for v in tree_leaves(value)):
            out.append((a.name, plain(value)))
    return tuple(out)


def _finish(finished: set[int], node_id: int, grad_inputs: tuple, grad_outputs: tuple) -> None:
    finished.add(node_id)


@contextmanager
def capture(model: nn.Module, values: bool | Callable[[str], bool] = False) -> Iterator[Capture]:
    """Capture every aten op run while the block runs (forward, loss, backward) for ``model``.

    >>> with capture(model) as cap:
    ...     F.cross_entropy(model(x), y).backward()
    >>> cap.counts()   # {'forward': ..., 'backward': ..., 'accumulate': ...}

    ``values``: keep every op's input and output values too (aliases, copied before any write reaches them;
    memory grows with the step), or only for the ops a predicate on the op's name (``"aten.relu_.default"``)
    selects. Clear ``.grad`` first (``zero_grad(set_to_none=True)``): an existing
    gradient makes AccumulateGrad run ``add_`` instead of ``detach`` and changes the stream.
    """
    mode = OpCapture(model, values)
    names = {id(m): n for n, m in model.named_modules()}
    handles = []

    def push(module: nn.Module, args: tuple) -> None:
        mode.stack.append(names[id(module)])

    def pop(module: nn.Module, args: tuple, output: object) -> None:
        if mode.stack:
            mode.stack.pop()
        if module is model and not in_backward():
            mode.see_graph(tree_leaves(output))

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop, always_call=True))
    saved = torch.autograd.Function.__dict__["apply"]
    torch.autograd.Function.apply = classmethod(partial(mode._apply, saved.__func__))  # type: ignore[method-assign]
    try:
        with mode:
            yield mode.capture
    finally:
        torch.autograd.Function.apply = saved  # type: ignore[method-assign]
        for h in handles:
            h.remove()
        mode.cleanup()
