"""Replaying one captured op: its overload and arguments rebuilt from a record, its tensors placed in a layout.

A capture keeps, per op, the overload's name, the non-tensor arguments by schema name (as plain values) and the
tensor arguments as a flat list (with values when captured with ``values=True``). :func:`rebuild_call` puts
them back in schema order; a list-of-tensors argument takes the tensors no other argument takes, so an op with
two tensor-list arguments cannot be rebuilt and says so (:class:`Unreplayable`).

:func:`in_layout` places values in an exact layout (size, stride, storage offset) inside a fresh storage of the
size the side's own storage had. The rest of that storage holds NaN: a kernel that reads outside the view it
was given (the #708 read of a ``torch.cat`` backward slice with contiguous strides) then returns NaN, which is
never within tolerance. Elements that share memory (stride 0, an expanded gradient) are scattered by linear
index instead of ``copy_`` (which refuses overlapping destinations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from densenet_debug.capture.records import OpRecord, TensorLayout

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128)}
_FORMATS = {str(f).removeprefix("torch."): f for f in (
    torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)}
_LAYOUTS = {str(lo).removeprefix("torch."): lo for lo in (torch.strided, torch.sparse_coo)}


class Unreplayable(Exception):
    """An op whose call cannot be rebuilt from its record (the reason is the message)."""


def overload(name: str) -> torch._ops.OpOverload:
    """``"aten.convolution.default"`` -> ``torch.ops.aten.convolution.default``."""
    ns, op, ov = name.split(".", 2) if name.count(".") >= 2 else (*name.split(".", 1), "default")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), ov)
    except (AttributeError, RuntimeError) as exc:
        raise Unreplayable(f"no overload {name}") from exc


def _unplain(value: object, type_name: str) -> object:
    """A plain recorded value back as the type its schema argument wants (dtypes, devices, formats).

    TorchScript schemas type dtypes and memory formats as ``int``, so strings are recognised by value.
    """
    if value is None:
        return None
    if isinstance(value, tuple):
        return [_unplain(v, "") for v in value]
    if isinstance(value, str) and "str" not in type_name:
        name = value.removeprefix("torch.")
        for table in (_DTYPES, _FORMATS, _LAYOUTS):
            if name in table:
                return table[name]
        if "Device" in type_name:
            return torch.device(value)
        raise Unreplayable(f"argument of type {type_name} recorded only as {value!r}")
    return value


@dataclass
class Call:
    """An op ready to run: the overload, positional and keyword arguments, and where each tensor went."""

    func: torch._ops.OpOverload
    args: list
    kwargs: dict

    def run(self) -> object:
        return self.func(*self.args, **self.kwargs)


def rebuild_call(record: OpRecord, tensors: list[Tensor | None]) -> Call:
    """``record``'s op with ``tensors`` (one per recorded tensor argument, in order) in place of its own."""
    func = overload(record.op)
    plain = dict(record.arguments)
    schema = func._schema.arguments
    holders = [a for a in schema if a.name not in plain]
    lists = [a for a in holders if "List[" in str(a.type) or "[]" in str(a.type)]
    if len(lists) > 1:
        raise Unreplayable(f"{record.op}: {len(lists)} tensor-list arguments")
    n_list = len(tensors) - (len(holders) - len(lists))
    if n_list < 0 or (not lists and n_list):
        raise Unreplayable(f"{record.op}: {len(tensors)} tensors for {len(holders)} tensor arguments")
    it = iter(tensors)
    args, kwargs = [], {}
    for a in schema:
        if a.name in plain:
            value = _unplain(plain[a.name], str(a.type))
        elif a in lists:
            value = [next(it) for _ in range(n_list)]
        else:
            value = next(it)
        if a.kwarg_only:
            kwargs[a.name] = value
        else:
            args.append(value)
    return Call(func, args, kwargs)


def storage_numel(value: Tensor | None, layout: TensorLayout) -> int:
    """Elements the side's storage held: its own size when ``value`` still aliases it, else the view's extent."""
    extent = layout.storage_offset + 1 + sum((n - 1) * s for n, s in zip(layout.size, layout.stride) if n > 0)
    if any(n == 0 for n in layout.size):
        extent = layout.storage_offset
    if value is not None and tuple(value.stride()) == layout.stride and value.storage_offset() == layout.storage_offset:
        try:
            return max(extent, value.untyped_storage().nbytes() // max(value.element_size(), 1))
        except (RuntimeError, NotImplementedError):
            pass
    return extent


def in_layout(values: Tensor, layout: TensorLayout, numel: int, device: torch.device | str = "cpu",
              fill: float = math.nan) -> Tensor:
    """``values`` cast to ``layout.dtype`` and placed at ``layout``'s positions in a fresh storage of ``numel``
    elements, the rest ``fill`` (NaN by default; zero for integer dtypes)."""
    dtype = _DTYPES.get(layout.dtype)
    if dtype is None:
        raise Unreplayable(f"dtype {layout.dtype}")
    buf = torch.full((max(numel, 1),), fill if dtype.is_floating_point or dtype.is_complex else 0, dtype=dtype,
                     device=device)
    view = buf.as_strided(layout.size, layout.stride, layout.storage_offset)
    src = values.detach().to(device=device, dtype=dtype)
    if tuple(src.shape) != tuple(layout.size):
        raise Unreplayable(f"oracle shape {tuple(src.shape)} vs side {layout.size}")
    if any(s == 0 and n > 1 for n, s in zip(layout.size, layout.stride)) or not _non_overlapping(layout):
        index = torch.arange(buf.numel(), device=device).as_strided(layout.size, layout.stride, layout.storage_offset)
        buf.index_put_((index.reshape(-1),), src.reshape(-1))
    else:
        view.copy_(src)
    return view


def _non_overlapping(layout: TensorLayout) -> bool:
    dims = sorted((s, n) for n, s in zip(layout.size, layout.stride) if n > 1)
    span = 1
    for s, n in dims:
        if s < span:
            return False
        span = s * n
    return True
