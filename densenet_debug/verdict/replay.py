"""Teacher-forced replay of one unit: the side's own module on the oracle's inputs and grad_outputs.

The oracle's fp64 tensors are cast to the dtype the side saw and rebuilt in the *layout* the side saw
(strides and storage offset, :func:`densenet_debug.trace.with_layout`), BN buffers are set to the oracle's
``buffers_before``, and forward and backward run under the side's :meth:`Backend.active`. A unit that is
wrong under the side's flags is thereby wrong here, with no error inherited from upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from densenet_debug.models.densenet import Concat
from densenet_debug.trace import Layout, UnitRecord, flatten_tensors, with_layout


@dataclass
class Replay:
    """Quantity key (``output.i``, ``grad_input.i``, ``grad_<param>``, ``buffer.<name>``) -> side tensor."""

    values: dict[str, Tensor | None] = field(default_factory=dict)
    inputs: list[Tensor | None] = field(default_factory=list)
    grad_outputs: list[Tensor | None] = field(default_factory=list)


def _dense_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def placed(t: Tensor, dtype: torch.dtype, device: torch.device, layout: Layout | None) -> Tensor:
    """``t`` cast to ``dtype`` on ``device`` and laid out as ``layout`` (:func:`~densenet_debug.trace.with_layout`),
    always in a fresh buffer of its own (never an alias of ``t``), so a replay may write into it.

    A contiguous layout at offset 0 (most tensors) is one cast-and-copy: its buffer has no room around the
    view for ``with_layout``'s fill to occupy, so the result is the same without the fill and the second copy.
    """
    applies = layout is not None and tuple(t.shape) == layout.size
    if applies and (layout.storage_offset != 0 or layout.stride != _dense_strides(layout.size)):
        return with_layout(t.to(device=device, dtype=dtype), layout)  # with_layout copies into a new buffer
    x = t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format if applies else torch.preserve_format)
    return x.clone() if x.data_ptr() == t.data_ptr() else x


# Module types whose forward only reads its inputs. By exact type: a subclass (a user's, a planted fault's class)
# may write into them, and so may a module built with ``inplace=True``.
_READS_ONLY = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
               nn.Linear, nn.Bilinear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d,
               nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.ReLU, nn.ReLU6,
               nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
               nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.PReLU)


def reads_only(module: nn.Module) -> bool:
    """``module``'s call cannot write into its inputs: a :data:`_READS_ONLY` type exactly, not built in place,
    its class's own ``forward`` and no pre-hook (which could)."""
    return (type(module) in _READS_ONLY or type(module) is Concat) and not getattr(module, "inplace", False) \
        and "forward" not in module.__dict__ and not module._forward_pre_hooks \
        and not nn.modules.module._global_forward_pre_hooks


def grad_entry(x: Tensor, owned: bool = False, writable: bool = True) -> tuple[Tensor, Tensor]:
    """``x`` as a differentiable *non-leaf* in its exact layout, and the leaf its gradient is read from.

    A unit may write into its input (``nn.ReLU(inplace=True)``); autograd forbids that on a leaf that requires
    grad and on a view of one, but allows it on a view of a non-leaf. So the storage ``x`` spans becomes the
    leaf, ``leaf * 1`` the non-leaf, and the input is that non-leaf viewed with ``x``'s strides and offset, so
    kernels see the layout the side saw. :func:`input_grad` reads the input's gradient back through the same
    strides. Overlapping layouts (a stride 0 over more than one element) would sum aliased gradients, so they
    stay a plain leaf (no unit writes into an expanded input).

    ``owned``: ``x`` is a buffer the caller made for this call alone (:func:`placed`, a cast), so the leaf may
    be that buffer itself instead of a copy of it; nothing writes into a leaf, so its values stay ``x``'s.
    ``writable=False`` (a unit that only reads its inputs, :func:`reads_only`): the input is a view of the leaf
    itself, without the full-size copy ``leaf * 1`` makes (autograd would refuse a write into it, and none comes).
    """
    if any(st == 0 and n > 1 for n, st in zip(x.shape, x.stride())) or x.numel() == 0:
        leaf = x.detach().requires_grad_(True)
        return leaf, leaf
    extent = x.storage_offset() + 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
    leaf = x.detach().as_strided((extent,), (1,), 0)
    leaf = (leaf if owned else leaf.clone()).requires_grad_(True)
    if not writable:
        return leaf.as_strided(x.shape, x.stride(), x.storage_offset()), leaf
    with torch.enable_grad():
        if extent == x.numel() and tuple(x.stride()) == _dense_strides(tuple(x.shape)):
            # The same layout as a view: its backward is a reshape, as_strided's a scatter into a zeroed storage.
            return (leaf * 1).view(x.shape), leaf
        return (leaf * 1).as_strided(x.shape, x.stride(), x.storage_offset()), leaf


def input_grad(x: Tensor, leaf: Tensor, grad: Tensor | None) -> Tensor:
    """The gradient of the input ``x`` made by :func:`grad_entry`, from its leaf's gradient."""
    if grad is None:
        return torch.zeros_like(x)
    if leaf is x:
        return grad.detach()
    return grad.detach().as_strided(x.shape, x.stride(), x.storage_offset())


def replay_unit(module: nn.Module, oracle: UnitRecord, side: UnitRecord | None, backend: object) -> Replay:
    """Re-run ``module`` (the side's unit) on ``oracle``'s inputs and grad_outputs; return what it produced."""
    device, default = backend.device, backend.param_dtype
    inputs: list[Tensor | None] = []
    leaves: dict[int, Tensor] = {}
    writable = not reads_only(module)
    for i, t in enumerate(oracle.inputs):
        if t is None:
            inputs.append(None)
            continue
        seen = side.inputs[i] if side is not None and i < len(side.inputs) else None
        layout = side.input_layouts[i] if side is not None and i < len(side.input_layouts) else None
        dtype = (seen.dtype if seen is not None else default) if t.is_floating_point() else t.dtype
        x = placed(t, dtype, device, layout)  # a fresh buffer: the record is never touched
        wants_grad = i < len(oracle.grad_inputs) and oracle.grad_inputs[i] is not None and x.is_floating_point()
        if wants_grad:
            x, leaves[i] = grad_entry(x, owned=True, writable=writable)
        inputs.append(x)
    own_buffers = dict(module.named_buffers(recurse=False))
    every_buffer = dict(module.named_buffers())  # a composite's replay runs its children: restore theirs too
    saved_buffers = {k: b.clone() for k, b in every_buffer.items()}
    saved_modes = {m: m.training for m in module.modules()}
    # What went in, kept apart: a unit that writes into its input must not change the operands we judge by. A
    # differentiable input is a non-leaf computed from its leaf, which nothing writes into: view the leaf.
    result = Replay(inputs=[None if x is None else _operand(x, leaves.get(i)) for i, x in enumerate(inputs)])
    try:
        with torch.no_grad():
            for k, b in own_buffers.items():
                if k in oracle.buffers_before:
                    b.copy_(oracle.buffers_before[k].to(b.device, b.dtype))
        module.train(oracle.training)
        with backend.active(), torch.enable_grad():
            out = module(*inputs)
            outs = flatten_tensors(out)
            for j, o in enumerate(outs):
                result.values[f"output.{j}"] = o.detach()
            for k, b in own_buffers.items():
                result.values[f"buffer.{k}"] = b.detach().clone()
            params = [(n, p) for n, p in module.named_parameters(recurse=False) if n in oracle.param_grads]
            targets = [(f"grad_input.{i}", leaf) for i, leaf in leaves.items()]
            targets += [(f"grad_{n}", p) for n, p in params]
            live = []
            for j, o in enumerate(outs):
                g = oracle.grad_outputs[j] if j < len(oracle.grad_outputs) else None
                if g is None or not o.requires_grad:
                    result.grad_outputs.append(None)
                    continue
                layout = side.grad_output_layouts[j] if side is not None and j < len(side.grad_output_layouts) else None
                live.append((o, placed(g, o.dtype, o.device, layout)))
                result.grad_outputs.append(live[-1][1])
            if targets and live:
                grads = torch.autograd.grad([o for o, _ in live], [t for _, t in targets], [g for _, g in live],
                                            allow_unused=True)
                for (key, t), g in zip(targets, grads):
                    if key.startswith("grad_input."):
                        x = inputs[int(key.rpartition(".")[2])]
                        result.values[key] = input_grad(x, t, g)
                    else:
                        result.values[key] = torch.zeros_like(t) if g is None else g.detach()
    finally:
        with torch.no_grad():
            for k, b in every_buffer.items():
                b.copy_(saved_buffers[k])
        for m, mode in saved_modes.items():
            m.train(mode)
    return result


def _operand(x: Tensor, leaf: Tensor | None) -> Tensor:
    """The value of replay input ``x`` before the unit ran, as a tensor no later write can reach."""
    if leaf is None:
        return x.detach().clone()
    view = leaf.detach() if leaf is x else leaf.detach().as_strided(x.shape, x.stride(), x.storage_offset())
    return view.requires_grad_(True)


def oracle_values(rec: UnitRecord, first_call: bool = False) -> dict[str, Tensor | None]:
    """The oracle's quantities under the same keys as :class:`Replay`.

    ``first_call``: a unit called several times has its parameters' gradients as its first call sent them
    (what a replay of that call computes), not their sum over the calls (``.grad``, the propagated truth).
    """
    values: dict[str, Tensor | None] = {}
    for j, o in enumerate(rec.outputs):
        values[f"output.{j}"] = o
    for i, g in enumerate(rec.grad_inputs):
        if g is not None:
            values[f"grad_input.{i}"] = g
    shares = rec.call_param_grads if first_call else {}
    for n, g in rec.param_grads.items():
        values[f"grad_{n}"] = shares.get(n, g)
    for k, b in rec.buffers_after.items():
        values[f"buffer.{k}"] = b
    return values


def side_values(rec: UnitRecord, params: dict[str, Tensor] | None = None) -> dict[str, Tensor | None]:
    """A side's propagated record under the same keys (missing gradients stay None: they fail)."""
    values = oracle_values(rec)
    for i, g in enumerate(rec.grad_inputs):
        values.setdefault(f"grad_input.{i}", g)
    return values


def exact_expectation(module: nn.Module, replay: Replay, wide: bool = True) -> dict[str, Tensor | None]:
    """An exact op (data movement, ReLU-like) evaluated in fp64 on the replay's own rounded operands.

    The class's ``forward`` is called, not the instance's: a planted fault replaces the instance's.
    ``wide=False``: evaluated in the operands' own dtypes instead (on the CPU), which is the same number for an
    op that only selects and moves values (no arithmetic: nothing to round), in half the bytes.
    """
    xs: list[Tensor | None] = []
    leaves: dict[int, Tensor] = {}
    writable = not reads_only(module)
    for i, t in enumerate(replay.inputs):
        if t is not None and not wide and not writable and t.device.type == "cpu":
            x = t.detach()  # read as it is: nothing writes into it, and a leaf made on it is a new alias
        else:
            x = None if t is None else placed(t.detach(), torch.float64 if wide else t.dtype, torch.device("cpu"),
                                              None)
        if x is not None and t.requires_grad:
            x, leaves[i] = grad_entry(x, owned=True, writable=writable)
        xs.append(x)
    with torch.enable_grad():
        outs = flatten_tensors(type(module).forward(module, *xs))
    values: dict[str, Tensor | None] = {f"output.{j}": o.detach() for j, o in enumerate(outs)}
    targets = [(f"grad_input.{i}", leaf) for i, leaf in leaves.items()]
    live = [(o, g.detach().to("cpu", torch.float64 if wide else g.dtype)) for o, g in zip(outs, replay.grad_outputs)
            if g is not None and o.requires_grad]
    if targets and live:
        grads = torch.autograd.grad([o for o, _ in live], [t for _, t in targets], [g for _, g in live],
                                    allow_unused=True)
        for (key, t), g in zip(targets, grads):
            values[key] = input_grad(xs[int(key.rpartition(".")[2])], t, g)
    return values
