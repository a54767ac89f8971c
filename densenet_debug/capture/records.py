"""Typed records of one captured step: every aten op, forward and backward, with its layouts.

Keys make two captures of the same model comparable op by op (``align``), so they name *what* ran, never
*where in memory* or *how fast*:

- forward: ``("forward", module path, op, k)``, the k-th call of ``op`` directly under that module;
- backward and accumulate: ``(phase, key of the forward op that created the autograd node, node name, op, k)``,
  the k-th ``op`` run by that node (a node created outside any recorded op, e.g. in a custom Function,
  is named by its creator's key too, see ``capture.mode``);
- recompute (checkpoint): ``("recompute", module path, op, k)``, and ``repeats`` names the forward key.

A layout (size, stride, storage offset, dtype, device) is what a #708-style fault depends on, so every tensor
argument and output keeps one. Values are optional (``values=True``): aliases kept true by copy-on-write,
and an in-place op's written inputs copied *before* the write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Phase = Literal["forward", "backward", "accumulate", "recompute"]
Key = tuple
OUTSIDE = "<outside>"  # module path of ops that ran outside the captured model (the loss, backward's seed)


@dataclass(frozen=True)
class TensorLayout:
    """Where and how a tensor sat in memory when an op saw it."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    dtype: str
    device: str

    @classmethod
    def of(cls, t: Tensor) -> TensorLayout:
        return cls(size=tuple(t.shape), stride=tuple(t.stride()), storage_offset=t.storage_offset(),
                   dtype=str(t.dtype).removeprefix("torch."), device=str(t.device))

    @property
    def is_contiguous(self) -> bool:
        expected, step = [], 1
        for n in reversed(self.size):
            expected.append(step)
            step *= max(n, 1)
        dims = [(st, ex) for n, st, ex in zip(self.size, self.stride, reversed(expected)) if n > 1]
        return self.storage_offset == 0 and all(st == ex for st, ex in dims)


@dataclass(frozen=True)
class NodeRef:
    """An autograd node: its sequence number (2**64-1 for AccumulateGrad) and name."""

    sequence_nr: int
    name: str


@dataclass
class OpRecord:
    """One aten op call of a captured step."""

    index: int
    key: Key
    phase: Phase
    op: str
    module: str
    input_layouts: tuple[TensorLayout, ...]
    arguments: tuple[tuple[str, object], ...]
    output_layouts: tuple[TensorLayout | None, ...]
    written: tuple[int, ...] = ()
    node: NodeRef | None = None
    creator: Key | None = None
    function: str | None = None
    repeats: Key | None = None
    input_values: list[Tensor | None] | None = None
    output_values: list[Tensor | None] | None = None

    def argument(self, name: str, default: object = None) -> object:
        """The non-tensor argument ``name`` (schema name) this op was called with."""
        return next((v for n, v in self.arguments if n == name), default)

    @property
    def label(self) -> str:
        """``module · op`` for rows and messages."""
        return f"{self.module or '(model)'} · {self.op}"


@dataclass
class Capture:
    """The ops of one step in the order they ran, with the autograd nodes' creators."""

    records: list[OpRecord] = field(default_factory=list)
    creators: dict[int, Key] = field(default_factory=dict)

    def __iter__(self):  # noqa: ANN204
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def phase(self, phase: Phase) -> list[OpRecord]:
        return [r for r in self.records if r.phase == phase]

    def by_key(self) -> dict[Key, OpRecord]:
        return {r.key: r for r in self.records}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.phase] = out.get(r.phase, 0) + 1
        return out


def plain(value: object) -> object:
    """A non-tensor argument as a plain, comparable Python value (dtypes, devices and formats as strings)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    return repr(value)
