"""The precision controls planted *as kernels*: below every capture, one aten op whose values are the control's.

A real TF32 convolution, or a kernel that sums in another order, is one ``aten.convolution`` (one
``aten.convolution_backward``) whose values differ from the default kernel's within the precision it runs at.
Emulated with Python ops around the call (rounding ops, chunked convolutions), the same control is a chain of
side-only ops that change values, which the op engine rightly calls findings. So the controls are a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` that :meth:`Backend.active` enters with the side's
flags, *before* any capture mode (a mode entered later sits above it and hands it each op): the capture records
the op as the model called it, and this mode computes it with its own inner ops, which run with the modes
above it off and are seen by nothing. The op judge replays a side's op under the same ``active()``, so the
replay computes the control too: one code path for the step and every replay.

Which ops it takes: the ``aten.convolution`` of a planted unit, and the ``aten.convolution_backward`` of the
autograd node that convolution created. A planted unit's forward runs the stock forward inside
:func:`~densenet_debug.backends.running_unit` (its qualified name); a replay names the unit it replays the
same way. Inside dispatch, autograd has already numbered the node of the op it redispatches (the capture
notes), so the node's sequence number is taken there and its backward is recognised by
``torch._C._current_autograd_node()``. Everything else passes through unchanged. (Dynamo skips frames while
a dispatch mode is active, so a ``compile`` backend with a control planted runs its step eagerly.)

The two kernels:

- ``tf32_round``: every GEMM operand (input, weight; grad_output, input, weight in backward) rounded to TF32's
  10 explicit mantissa bits, to nearest, then an fp32 product and sum, as tensor cores do. The bias and the
  bias gradient are not GEMMs and stay fp32. Bound: the conv error models with u_op = 2**-11 (TF32's unit
  roundoff, :data:`~densenet_debug.backends.TF32_ROUNDOFF`), which the judges take from
  ``Fault.unit_roundoff_override`` for the planted units.
- ``reordered_sum``: every reduction split into MAG chunks summed last-to-first: the forward's over input
  channels, grad_input's over output channels, grad_weight's and grad_bias's over the batch. A sum of K
  products in any order and grouping is within the same gamma_K * sum|terms| bound, so the conv error models
  apply unchanged.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from densenet_debug.backends import current_unit
from densenet_debug.capture.graph import next_sequence_nr
from densenet_debug.faults.ops import round_mantissa

aten = torch.ops.aten
CONV, CONV_BACKWARD = aten.convolution.default, aten.convolution_backward.default
_INSIDE: ContextVar[bool] = ContextVar("densenet_debug_control_kernel", default=False)


class ControlKernel(TorchDispatchMode):
    """Compute the planted units' convolutions (forward and backward) as fault ``name``'s kernel.

    ``units``: the planted units' qualified names (``Fault.units``, read on every op: a fault is applied to a
    model after its backend's flags may have been set). ``nodes``: sequence numbers of the autograd nodes the
    planted convolutions created, shared across every ``active()`` of one fault, so a backward run under a
    later ``active()`` (a replayed unit's) is still recognised.
    """

    def __init__(self, name: str, mag: float, fault: object, nodes: set[int]) -> None:
        super().__init__()
        self.name, self.mag, self.fault, self.nodes = name, mag, fault, nodes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func not in (CONV, CONV_BACKWARD) or _INSIDE.get():
            return func(*args, **kwargs)
        args = _positional(func, args, kwargs)
        planted = current_unit() in self.fault.units
        if func is CONV and planted and torch.is_grad_enabled() and any(
                isinstance(t, Tensor) and t.requires_grad for t in args[:3]):
            self.nodes.add(next_sequence_nr() - 1)  # the ConvolutionBackward0 node autograd just made
        if func is CONV_BACKWARD and not planted:
            node = torch._C._current_autograd_node()
            planted = node is not None and node._sequence_nr() in self.nodes
        if not planted:
            return func(*args, **kwargs)
        token = _INSIDE.set(True)  # a second instance of this mode lower down passes our inner ops through
        try:
            if self.name == "tf32_round":
                return tf32_call(func, args)
            return reordered_call(func, args, max(1, int(self.mag)))
        finally:
            _INSIDE.reset(token)


def _positional(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list:
    """Every schema argument of the call, in order (the convolutions have no keyword-only ones)."""
    out = list(args)
    for a in func._schema.arguments[len(out):]:
        out.append(kwargs[a.name] if a.name in kwargs else a.default_value)
    return out


# -- TF32 ---------------------------------------------------------------------------------------------------
def tf32_call(func: torch._ops.OpOverload, a: list) -> object:
    """``func`` with its GEMM operands rounded to TF32 (the bias and its gradient stay fp32)."""
    if func is CONV:
        return CONV(round_mantissa(a[0]), round_mantissa(a[1]), *a[2:])
    go, x, w, *rest = a
    mask = list(rest[-1])
    gx, gw, _ = CONV_BACKWARD(round_mantissa(go), round_mantissa(x), round_mantissa(w), *rest[:-1],
                              [mask[0], mask[1], False])
    gb = CONV_BACKWARD(go, x, w, *rest[:-1], [False, False, True])[2] if mask[2] else None
    return gx, gw, gb


# -- another summation order -----------------------------------------------------------------------------
def _bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` (at most ``n``) near-equal ranges covering 0..n, last first."""
    k = max(1, min(chunks, n))
    cuts = [round(i * n / k) for i in range(k + 1)]
    return [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo][::-1]


def _format(t: Tensor) -> torch.memory_format:
    """The memory format a kernel gives a result laid out like ``t`` (ATen's ``suggest_memory_format``)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _summed(parts: list[Tensor], like: Tensor) -> Tensor:
    """The parts summed in the order given, into a tensor laid out as the stock kernel lays out ``like``'s."""
    out = torch.empty_like(like, memory_format=_format(like))
    out.copy_(parts[0])
    for p in parts[1:]:
        out.add_(p)
    return out


def reordered_call(func: torch._ops.OpOverload, a: list, chunks: int) -> object:
    """``func`` with each of its reductions split into ``chunks`` partial sums added last-to-first.

    A transposed or grouped convolution is left to the stock kernel (the fault plants on neither).
    """
    transposed, groups = bool(a[6]), int(a[8]) if func is CONV else int(a[9])
    if func is CONV:
        x, w, b = a[0], a[1], a[2]
        if transposed or groups != 1:
            return CONV(*a)
        parts = [CONV(x[:, lo:hi], w[:, lo:hi], None, *a[3:]) for lo, hi in _bounds(w.shape[1], chunks)]
        out = _summed(parts, parts[0])
        if b is not None:
            out.add_(b.view(1, -1, *([1] * (out.dim() - 2))))
        return out
    go, x, w, bias_sizes, *rest = a
    if bool(rest[3]) or groups != 1:
        return CONV_BACKWARD(*a)
    mask = list(rest[-1])
    gx = gw = gb = None
    if mask[0]:  # grad_input: a sum over output channels
        gx = _summed([CONV_BACKWARD(go[:, lo:hi], x, w[lo:hi], None, *rest[:-1], [True, False, False])[0]
                      for lo, hi in _bounds(w.shape[0], chunks)], x)
    batches = _bounds(go.shape[0], chunks)
    if mask[1]:  # grad_weight: a sum over the batch (and positions)
        gw = _summed([CONV_BACKWARD(go[lo:hi], x[lo:hi], w, None, *rest[:-1], [False, True, False])[1]
                      for lo, hi in batches], w)
    if mask[2]:
        dims = [0, *range(2, go.dim())]
        gb = _summed([go[lo:hi].sum(dim=dims) for lo, hi in batches], go.new_empty(go.shape[1]))
    return gx, gw, gb
