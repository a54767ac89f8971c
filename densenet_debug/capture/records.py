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

import math
import re
from collections.abc import Callable, Mapping
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


# -- as data (a reference fixture stores an oracle's capture: JSON for the record, arrays for the values) --------
# Non-tensor arguments as typed JSON. null, booleans, integers, finite floats and strings are themselves; the rest
# is an object with exactly one known tag. Decoding knows these tags only and looks nothing up by a stored name
# (dtypes, layouts and memory formats come from torch's own instances): nothing a fixture holds is evaluated,
# imported or unpickled.
ARGUMENT_TAGS = ("tuple", "list", "float", "dtype", "device", "layout", "memory_format")
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:[0-9]+)?", re.ASCII)


class ArgumentError(ValueError):
    """An argument that is not one of the typed JSON forms (one line: what and where)."""


def _named(kind: type) -> dict[str, object]:
    """torch's own instances of ``kind`` by the name ``str()`` gives them, without the ``torch.`` prefix."""
    return {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, kind)}


def encode_argument(value: object) -> object:
    """``value`` (what :func:`plain` keeps, or a dtype, device, layout or memory format) as typed JSON."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"float": "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"}
    if isinstance(value, (tuple, list)):
        return {"tuple" if isinstance(value, tuple) else "list": [encode_argument(v) for v in value]}
    for tag, kind in (("dtype", torch.dtype), ("device", torch.device), ("layout", torch.layout),
                      ("memory_format", torch.memory_format)):
        if isinstance(value, kind):
            return {tag: str(value).removeprefix("torch.")}
    raise ArgumentError(f"argument of type {type(value).__name__} has no typed JSON form")


def decode_argument(data: object) -> object:
    """The value :func:`encode_argument` encoded; anything else raises :class:`ArgumentError` (one line)."""
    if data is None or isinstance(data, (bool, str, int)):
        return data
    if isinstance(data, float):
        return data
    if not isinstance(data, dict) or len(data) != 1:
        raise ArgumentError(f"argument {_shown(data)} is not typed JSON (a scalar, or an object with one tag of "
                            f"{', '.join(ARGUMENT_TAGS)})")
    (tag, body), = data.items()
    if tag in ("tuple", "list"):
        if not isinstance(body, list):
            raise ArgumentError(f"argument tag {tag!r} holds {_shown(body)}, not a list")
        items = [decode_argument(v) for v in body]
        return tuple(items) if tag == "tuple" else items
    if tag == "float" and body in _NONFINITE:
        return _NONFINITE[body]  # type: ignore[index]
    if tag == "device" and isinstance(body, str) and _DEVICE.fullmatch(body):
        return torch.device(body)
    kinds = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
    if tag in kinds and isinstance(body, str) and body in (names := _named(kinds[tag])):
        return names[body]
    if tag in ARGUMENT_TAGS:
        raise ArgumentError(f"argument tag {tag!r} holds {_shown(body)}, not a known {tag}")
    raise ArgumentError(f"unknown argument tag {tag!r} (known: {', '.join(ARGUMENT_TAGS)})")


def _shown(data: object, limit: int = 60) -> str:
    text = repr(data)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_json(key: Key | None) -> list | None:
    return None if key is None else [_key_json(k) if isinstance(k, tuple) else k for k in key]


def _key(data: object) -> Key | None:
    """A key back from JSON: lists are tuples again; its parts are strings, integers, null or keys."""
    if data is None:
        return None
    if not isinstance(data, list):
        raise ValueError(f"a key is a list, got {_shown(data)}")
    out = []
    for part in data:
        if isinstance(part, list):
            out.append(_key(part))
        elif part is None or isinstance(part, str) or (isinstance(part, int) and not isinstance(part, bool)):
            out.append(part)
        else:
            raise ValueError(f"key part {_shown(part)} is not a string, an integer, null or a key")
    return tuple(out)


def _layout_to_json(lo: TensorLayout | None) -> dict | None:
    return None if lo is None else {"size": list(lo.size), "stride": list(lo.stride),
                                    "storage_offset": lo.storage_offset, "dtype": lo.dtype, "device": lo.device}


def _layout_from_json(data: object) -> TensorLayout | None:
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) != {"size", "stride", "storage_offset", "dtype", "device"}:
        raise ValueError(f"a layout has size, stride, storage_offset, dtype and device, got {_shown(data)}")
    return TensorLayout(size=tuple(int(v) for v in data["size"]), stride=tuple(int(v) for v in data["stride"]),
                        storage_offset=int(data["storage_offset"]), dtype=str(data["dtype"]),
                        device=str(data["device"]))


def node_ranks(capture: Capture) -> dict[int, int]:
    """Each autograd sequence number the capture names -> its rank among them (AccumulateGrad's 2**64-1 stays).

    A sequence number is a thread's running count, so it depends on everything the process ran before; its rank
    within one capture does not (the order in which the step created its nodes)."""
    numbers = {r.node.sequence_nr for r in capture.records if r.node is not None} | set(capture.creators)
    ranks = {n: rank for rank, n in enumerate(sorted(numbers - {ACCUMULATE_SEQUENCE_NR}))}
    if ACCUMULATE_SEQUENCE_NR in numbers:
        ranks[ACCUMULATE_SEQUENCE_NR] = ACCUMULATE_SEQUENCE_NR
    return ranks


ACCUMULATE_SEQUENCE_NR = 2**64 - 1  # every AccumulateGrad node's


def record_to_json(r: OpRecord, ref: Callable[[Tensor | None], object], ranks: Mapping[int, int]) -> dict:
    """``r`` as JSON: its fields, tensors as whatever ``ref`` makes of them, node numbers as ``ranks`` has them
    (:func:`node_ranks`)."""
    def refs(values: list | None) -> list | None:
        return None if values is None else [ref(v) for v in values]

    return {"index": r.index, "key": _key_json(r.key), "phase": r.phase, "op": r.op, "module": r.module,
            "input_layouts": [_layout_to_json(lo) for lo in r.input_layouts],
            "output_layouts": [_layout_to_json(lo) for lo in r.output_layouts],
            "arguments": [[name, encode_argument(v)] for name, v in r.arguments], "written": list(r.written),
            "node": None if r.node is None else {"rank": ranks[r.node.sequence_nr], "name": r.node.name},
            "creator": _key_json(r.creator), "function": r.function, "repeats": _key_json(r.repeats),
            "input_values": refs(r.input_values), "output_values": refs(r.output_values)}


PHASES = ("forward", "backward", "accumulate", "recompute")


def record_from_json(data: dict, resolve: Callable[[object], Tensor | None]) -> OpRecord:
    """The record :func:`record_to_json` wrote (node numbers are ranks); ``resolve`` turns a reference back into
    a tensor. Raises :class:`ArgumentError` or ``ValueError``/``KeyError``/``TypeError`` on anything else."""
    if not isinstance(data, dict):
        raise ValueError(f"an op record is an object, got {_shown(data)}")
    if data["phase"] not in PHASES:
        raise ValueError(f"phase {_shown(data['phase'])} is not one of {', '.join(PHASES)}")
    arguments = []
    for item in data["arguments"]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"an argument is [name, value], got {_shown(item)}")
        try:
            arguments.append((item[0], decode_argument(item[1])))
        except ArgumentError as exc:
            raise ArgumentError(f"op {data.get('index')} ({data.get('op')}), argument {item[0]!r}: {exc}") from None
    node = data["node"]
    if node is not None and not (isinstance(node, dict) and isinstance(node.get("rank"), int)
                                 and isinstance(node.get("name"), str)):
        raise ValueError(f"a node is {{rank, name}}, got {_shown(node)}")

    def values(refs: object) -> list | None:
        if refs is None:
            return None
        if not isinstance(refs, list):
            raise ValueError(f"values are a list of references, got {_shown(refs)}")
        return [resolve(v) for v in refs]

    for name in ("op", "module"):
        if not isinstance(data[name], str):
            raise ValueError(f"field {name} must be a string, got {_shown(data[name])}")
    function = data["function"]
    if function is not None and not isinstance(function, str):
        raise ValueError(f"field function must be a string or null, got {_shown(function)}")
    return OpRecord(index=int(data["index"]), key=_key(data["key"]) or (), phase=data["phase"], op=data["op"],
                    module=data["module"], input_layouts=tuple(_layout_from_json(lo) for lo in data["input_layouts"]),
                    arguments=tuple(arguments),
                    output_layouts=tuple(_layout_from_json(lo) for lo in data["output_layouts"]),
                    written=tuple(int(i) for i in data["written"]),
                    node=None if node is None else NodeRef(sequence_nr=int(node["rank"]), name=node["name"]),
                    creator=_key(data["creator"]), function=function, repeats=_key(data["repeats"]),
                    input_values=values(data["input_values"]), output_values=values(data["output_values"]))


def capture_to_json(capture: Capture, ref: Callable[[Tensor | None], object]) -> dict:
    """``capture`` as JSON (:func:`record_to_json` per record; the creators by node rank, :func:`node_ranks`)."""
    ranks = node_ranks(capture)
    return {"records": [record_to_json(r, ref, ranks) for r in capture.records],
            "creators": [[ranks[n], _key_json(k)] for n, k in sorted(capture.creators.items())]}


def capture_from_json(data: object, resolve: Callable[[object], Tensor | None]) -> Capture:
    """The capture :func:`capture_to_json` wrote (node numbers are ranks within it)."""
    if not isinstance(data, dict) or not isinstance(data.get("records"), list) or \
            not isinstance(data.get("creators"), list):
        raise ValueError("an op capture is an object with records and creators (lists)")
    records = [record_from_json(r, resolve) for r in data["records"]]
    if [r.index for r in records] != list(range(len(records))):
        raise ValueError("op records must be numbered 0, 1, ... in the order they ran")
    creators = {}
    for item in data["creators"]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)):
            raise ValueError(f"a creator is [rank, key], got {_shown(item)}")
        creators[item[0]] = _key(item[1]) or ()
    return Capture(records=records, creators=creators)
