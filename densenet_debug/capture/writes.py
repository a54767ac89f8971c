"""Which tensor arguments an aten op writes, including the writes its schema does not declare.

Copy-on-write (``cow.py``) and capture (recording in-place inputs before the mutation) both need to know,
before an op runs, which of its arguments it will change. The schema says so with an ``(a!)`` alias
annotation, except for the batch-norm kernels that update ``running_mean``/``running_var`` in training
without declaring it (measured on torch 2.13: no annotation, no version bump). Those are listed by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import torch
from torch import Tensor

# Batch-norm kernels whose schemas hide the running-stat update done when ``training`` is true.
_UNDECLARED = {
    "aten::native_batch_norm": ("running_mean", "running_var"),
    "aten::cudnn_batch_norm": ("running_mean", "running_var"),
    "aten::miopen_batch_norm": ("running_mean", "running_var"),
}


@cache
def _written_names(func: torch._ops.OpOverload) -> tuple[tuple[str, ...], bool]:
    """(names of written arguments, whether the write depends on a ``training`` argument)."""
    schema = func._schema
    declared = tuple(a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write)
    hidden = _UNDECLARED.get(schema.name, ())
    return declared + hidden, bool(hidden)


def _argument(func: torch._ops.OpOverload, args: tuple, kwargs: dict, name: str) -> object:
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) else kwargs.get(name, a.default_value)
    return None


def is_mutating(func: torch._ops.OpOverload) -> bool:
    """Whether ``func`` may write any of its arguments (cheap: cached per overload)."""
    return bool(_written_names(func)[0])


def written_tensors(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Iterator[Tensor]:
    """The tensors ``func(*args, **kwargs)`` is about to write, in schema order."""
    names, conditional = _written_names(func)
    if not names:
        return
    if conditional and not _argument(func, args, kwargs, "training"):
        names = tuple(n for n in names if n not in ("running_mean", "running_var"))
    for name in names:
        value = _argument(func, args, kwargs, name)
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, Tensor))
