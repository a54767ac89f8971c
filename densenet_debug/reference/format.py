"""Reference fixtures on disk: ``reference_grads/<name>/``, written whole or not at all, read with every check.

Schema ``densenet-debug/reference/4`` (written as ``/3``, byte for byte what schema 3 was, without an op capture,
and as ``/2``, byte for byte what schema 2 was, when the model applies no custom autograd Function either); a
fixture directory holds

* ``meta.json``: what was recorded and how (model, data generation, step, storage policy, how the truth was
  computed), the size and SHA-256 of every other file, provenance. The only file not checksummed (it holds
  the checksums), so it is validated field by field instead (:func:`validate_meta`): every field a reader
  uses has its type, ``files`` lists exactly the four files below, and the model section names no path and
  nothing to import. ``model.kind`` says how the model comes back: ``builder`` (one of
  ``densenet_debug.models.BUILDERS``, rebuilt from meta.json), ``file``/``module`` (a user's
  ``m.py:factory`` or ``package.module:factory``, which the user names again; see
  :func:`densenet_debug.reference.record.model_description`) or ``python`` (recorded from Python, no spec);
  ``model.factory_kwargs`` how the builder or factory was called; ``model.structure_sha256`` the structure
  the rebuilt model must have.
* ``index.json``: per step and per unit, its kind, forward/backward order, mode, call count, the layouts
  its inputs and grad_outputs had, and for each stored quantity the references of its tensors.
  Schema 3 adds, per step, ``functions``: each custom autograd Function call of the float64 step (module
  path, class ``__qualname__``, occurrence, where it ran in the forward, which inputs wanted a gradient, input
  and grad_output layouts, and the references of its inputs, outputs, grad_outputs and grad_inputs), and
  ``entered`` (the modules in the order their forward started, to place each call among the units); meta.json's
  ``functions`` lists the calls and says whether they are stored (policy ``full``) or recomputed. No class and
  no argument that is not a tensor is stored: the check binds the model's own Function by name.
  Schema 4 (written only for ``record --ops``) adds a top-level ``ops``: the float64 oracle's op capture of the
  first step (:func:`densenet_debug.verdict.ops.oracle_capture`), every aten op forward and backward with its
  index, key, phase, op overload, module, input and output layouts, non-tensor arguments as typed JSON (scalars
  as themselves; tuples, lists, non-finite floats, dtypes, devices, layouts and memory formats as one-tag
  objects, decoded from a fixed set of tags and nothing else), written inputs, autograd node (its sequence
  number as a rank within the capture: the absolute number depends on the process), creator, custom Function
  and checkpoint repeat, and the references of its input and output values in ``trace.npz``; meta.json's
  ``ops`` says what was recorded. ``check-reference --ops`` judges a backend op by op against it.
* ``inputs.npz``: ``inputs`` and ``targets`` exactly as fed to the model.
* ``state.npz``: the initial ``state_dict`` (parameters and buffers) in its own dtype (bfloat16 is stored
  widened to float32, which is exact, and narrowed back on load).
* ``trace.npz``: the float64 truth, each distinct tensor once (``t00000``...).

A reference is a key of ``trace.npz``, ``null`` (no tensor there), or a recipe verified bit for bit at
write time: ``{"cat": [refs], "dim": d}`` (a concatenation's output is its inputs) and
``{"narrow": ref, "dim": d, "start": s, "length": n}`` (a concatenation's input gradients are slices of its
output gradient). Recipes and content deduplication are what make the truth of a DenseNet small: there,
most tensors are concatenations or copies of earlier ones.

Arrays are loaded with ``allow_pickle=False``; an object array, a member that is not a ``.npy`` array and a
non-numeric dtype are refused, and every tensor must have the shape the index records for it. The ``.npz``
files are zips written with fixed timestamps and sorted names, so the same arrays give the same bytes.
Every refusal is a :class:`FixtureError`: one line naming the file and the field (the CLI exits 2).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from densenet_debug.atomic import writing_dir
from densenet_debug.capture.records import ArgumentError, Capture, capture_from_json, capture_to_json
from densenet_debug.reference.meta import (
    NARROWED_DTYPES,
    SCHEMA,
    SCHEMA_OPS,
    FixtureError,
    read_meta,
    schema_for,
    shown,
    validate_meta,
    verify_files,
)
from densenet_debug.trace import Layout, Trace, UnitRecord, materialize

ARRAY_FILES = ("inputs.npz", "state.npz", "trace.npz")
TENSOR_QUANTITIES = ("inputs", "outputs", "grad_outputs", "grad_inputs")
# call_param_grads: a unit called several times, its first call's share of each parameter gradient (the
# share its local rows judge); stored only for such units
DICT_QUANTITIES = ("param_grads", "call_param_grads", "buffers_before", "buffers_after")
ALL_QUANTITIES = TENSOR_QUANTITIES + DICT_QUANTITIES
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_WIDENED = {torch.bfloat16: torch.float32}
_NUMERIC_KINDS = "biuf"


@dataclass
class Fixture:
    """A loaded, verified fixture. ``stored[step][unit]`` names the quantities the files hold for that unit."""

    path: Path
    meta: dict
    inputs: Tensor
    targets: Tensor
    state: dict[str, Tensor]
    traces: list[Trace]
    stored: list[dict[str, set[str]]] = field(default_factory=list)
    ops: Capture | None = None  # schema 4: the float64 oracle's op capture of the first step (record --ops)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def complete(self) -> bool:
        """True when every quantity of every unit is in the files (policy ``full``)."""
        return self.meta["storage"]["policy"] == "full"


# -- npz ---------------------------------------------------------------------------------------------------
def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A compressed ``.npz`` (what ``np.savez_compressed`` writes) with fixed timestamps: reproducible bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            array = np.asarray(arrays[key])
            if array.dtype == object:
                raise ValueError(f"array {key!r} has dtype object; fixtures hold numeric arrays only")
            member = io.BytesIO()
            np.lib.format.write_array(member, array.copy(order="C"), allow_pickle=False)  # keeps 0-d arrays 0-d
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compresslevel=6)
    return buffer.getvalue()


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of ``path``: numeric ``.npy`` members only, in native byte order.

    Pickled (object) arrays, members that are not ``.npy`` arrays, non-numeric dtypes and damaged zips raise
    :class:`FixtureError` naming the file and the member.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        for member in names:
            if not member.endswith(".npy") or "/" in member:
                raise FixtureError(path, f"member {member!r} is not a .npy array; fixtures hold numeric arrays only")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FixtureError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise FixtureError(path, "holds an object (pickled) array; refused, fixtures are numeric only") from None
        raise FixtureError(path, f"not a readable npz file: {_first_line(exc)}") from None
    except Exception as exc:  # zipfile, zlib, EOF, OS errors from a damaged file: all the same to the user
        raise FixtureError(path, f"not a readable npz file ({type(exc).__name__}: {_first_line(exc)})") from None
    for key, array in arrays.items():
        if not isinstance(array, np.ndarray) or array.dtype.kind not in _NUMERIC_KINDS:
            what = getattr(array, "dtype", type(array).__name__)
            raise FixtureError(path, f"array {key!r} has dtype {what}; fixtures hold bool, integer and float arrays")
        if not array.dtype.isnative:
            arrays[key] = array.astype(array.dtype.newbyteorder("="))
    return arrays


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def to_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in _WIDENED:
        t = t.to(_WIDENED[t.dtype])
    return t.contiguous().numpy()


def canonical_json(data: object) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


# -- trace encoding ------------------------------------------------------------------------------------------
class _Store:
    """Assigns keys to tensors: one per distinct tensor (same object, or same dtype, shape and bytes)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self._by_id: dict[int, str] = {}
        self._by_content: dict[tuple, str] = {}
        self._alive: list[Tensor] = []  # keeps ids valid while encoding

    def key(self, t: Tensor) -> str:
        if id(t) in self._by_id:
            return self._by_id[id(t)]
        array = to_numpy(t)
        digest = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        key = self._by_content.get(digest)
        if key is None:
            key = f"t{len(self.arrays):05d}"
            self.arrays[key] = array
            self._by_content[digest] = key
        self._by_id[id(t)] = key
        self._alive.append(t)
        return key


def _cat_recipe(rec: UnitRecord) -> int | None:
    """The dim along which ``rec``'s single output is exactly the concatenation of its inputs, else None."""
    ins, outs = rec.inputs, rec.outputs
    if len(outs) != 1 or len(ins) < 2 or any(t is None for t in ins):
        return None
    out = outs[0]
    for dim in range(out.dim()):
        if all(t.dim() == out.dim() for t in ins) and sum(t.shape[dim] for t in ins) == out.shape[dim]:
            same = all(t.shape[:dim] + t.shape[dim + 1:] == out.shape[:dim] + out.shape[dim + 1:] for t in ins)
            if same and out.dtype == ins[0].dtype and torch.equal(torch.cat(ins, dim), out):  # type: ignore[arg-type]
                return dim
    return None


def encode_traces(
    traces: list[Trace], keep: Mapping[str, Iterable[str]] | None = None, store: _Store | None = None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """``(index, arrays)`` for ``traces``. ``keep``: unit -> quantities to store; None stores everything.
    ``store``: the arrays to add to (shared with an op capture, :func:`encode_ops`)."""
    store = store if store is not None else _Store()
    index = []
    for trace in traces:
        units = {}
        for rec in trace:
            wanted = set(ALL_QUANTITIES) if keep is None else set(keep.get(rec.name, ()))
            units[rec.name] = _encode_unit(rec, wanted, store)
        step = {
            "units": units,
            "output": None if trace.output is None else store.key(trace.output),
            "loss": None if trace.loss is None else store.key(trace.loss),
        }
        calls = getattr(trace, "functions", None) or []
        if keep is None and any(calls_of(t) for t in traces):  # (a checkpoints fixture recomputes them)
            step["functions"] = [_encode_call(c, store) for c in calls]
            step["entered"] = list(getattr(trace, "entered", []))
        index.append(step)
    return index, store.arrays


def encode_ops(capture: Capture, store: _Store) -> dict:
    """index.json's ``ops`` (schema 4): every record of the oracle's op capture as JSON
    (:func:`densenet_debug.capture.records.capture_to_json`: arguments as typed JSON, autograd node numbers as
    ranks within the capture), every input and output value a key of ``trace.npz`` in its own dtype (float64 for
    the oracle's floating-point tensors), each distinct tensor once, shared with the unit tensors."""
    return capture_to_json(capture, lambda t: _ref(t, store))


def decode_ops(data: object, arrays: Mapping[str, np.ndarray], where: Path) -> Capture:
    """The capture :func:`encode_ops` wrote. Every value must have the size and dtype its layout records (a
    bfloat16 value comes back from its float32 widening); an argument that is not typed JSON, a reference to
    no array, any other malformed field: :class:`FixtureError`, one line."""
    tensors: dict[str, Tensor] = {}

    def resolve(ref: object) -> Tensor | None:
        if ref is None:
            return None
        if not isinstance(ref, str):
            raise FixtureError(where, f"op capture: malformed tensor reference {shown(ref)}")
        if ref not in arrays:
            raise FixtureError(where, f"op capture refers to array {ref!r}, which trace.npz lacks")
        if ref not in tensors:
            tensors[ref] = torch.from_numpy(arrays[ref])
        return tensors[ref]

    try:
        capture = capture_from_json(data, resolve)
    except FixtureError:
        raise
    except ArgumentError as exc:
        raise FixtureError(where, f"op capture: {exc}; a fixture holds data only") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise FixtureError(where, f"malformed op capture ({type(exc).__name__}: {_first_line(exc)})") from None
    for r in capture.records:
        for what, values, layouts in (("input", r.input_values, r.input_layouts),
                                      ("output", r.output_values, r.output_layouts)):
            values = values or []
            if len(values) != len(layouts):
                raise FixtureError(where, f"op {r.index} ({r.op}): {len(values)} {what} value(s) for "
                                          f"{len(layouts)} layout(s)")
            for i, (t, lo) in enumerate(zip(values, layouts)):
                if t is None:
                    continue
                if lo is None or tuple(t.shape) != tuple(lo.size):
                    raise FixtureError(where.parent / "trace.npz", f"{what} {i} of op {r.index} ({r.op}) has shape "
                                                                   f"{tuple(t.shape)}, {where.name} records "
                                                                   f"{None if lo is None else tuple(lo.size)}")
                dtype = str(t.dtype).removeprefix("torch.")
                if dtype != lo.dtype:
                    if lo.dtype in NARROWED_DTYPES and t.dtype == torch.float32:
                        values[i] = t.to(NARROWED_DTYPES[lo.dtype])
                    else:
                        raise FixtureError(where.parent / "trace.npz", f"{what} {i} of op {r.index} ({r.op}) "
                                                                       f"has dtype {dtype}, {where.name} records "
                                                                       f"{lo.dtype}")
    return capture


def calls_of(trace: Trace) -> list:
    """The custom autograd Function calls the oracle's step recorded (``trace.functions``; none: ``[]``)."""
    return list(getattr(trace, "functions", None) or [])


def _encode_call(call: object, store: _Store) -> dict:
    """One custom Function call (:class:`~densenet_debug.verdict.functions.FunctionCall`) as data: its name
    (module path, class ``__qualname__``, occurrence), where it ran in the forward, the layouts and the float64
    tensors. The class itself, its non-tensor arguments and its code are not stored (a fixture runs no code):
    the check takes them from the model it is given (:func:`densenet_debug.reference.check.bind_functions`)."""
    def refs(ts: list | None) -> list | None:
        return None if ts is None else [_ref(materialize(t), store) for t in ts]

    return {"module": call.module, "class": call.name, "occurrence": call.occurrence,  # type: ignore[attr-defined]
            "defined_in": getattr(call.cls, "__module__", None), "entered": call.entered,  # type: ignore[attr-defined]
            "needs": [bool(n) for n in call.needs], "random": bool(call.random),  # type: ignore[attr-defined]
            "input_layouts": [_layout_json(lo) for lo in call.input_layouts],  # type: ignore[attr-defined]
            "grad_output_layouts": [_layout_json(lo) for lo in call.grad_output_layouts],  # type: ignore[attr-defined]
            "tensors": {"inputs": refs(call.inputs), "outputs": refs(call.outputs),  # type: ignore[attr-defined]
                        "grad_outputs": refs(call.grad_outputs),  # type: ignore[attr-defined]
                        "grad_inputs": refs(call.grad_inputs)}}  # type: ignore[attr-defined]


def _encode_unit(rec: UnitRecord, wanted: set[str], store: _Store) -> dict:
    entry: dict = {
        "kind": rec.kind, "forward_index": rec.forward_index, "backward_index": rec.backward_index,
        "training": rec.training, "calls": rec.calls,
        "input_layouts": [_layout_json(lo) for lo in rec.input_layouts],
        "grad_output_layouts": [_layout_json(lo) for lo in rec.grad_output_layouts],
        "tensors": {},
    }
    tensors = entry["tensors"]
    cat_dim = _cat_recipe(rec) if wanted & {"outputs", "grad_inputs"} else None
    for q in TENSOR_QUANTITIES:
        if q not in wanted:
            continue
        values = getattr(rec, q)
        if q == "outputs" and cat_dim is not None and "inputs" in wanted:
            tensors[q] = [{"cat": [_ref(t, store) for t in rec.inputs], "dim": cat_dim}]
        elif q == "grad_inputs" and cat_dim is not None and _slices_of(values, rec.grad_outputs, cat_dim):
            tensors[q] = _slice_refs(values, rec.grad_outputs[0], cat_dim, store)  # type: ignore[arg-type]
        else:
            tensors[q] = [_ref(t, store) for t in values]
    for q in DICT_QUANTITIES:
        if q in wanted and (q != "call_param_grads" or rec.call_param_grads):
            tensors[q] = {k: store.key(t) for k, t in sorted(getattr(rec, q).items())}
    return entry


def _ref(t: Tensor | None, store: _Store) -> str | None:
    return None if t is None else store.key(t)


def _slices_of(grads: list[Tensor | None], grad_outputs: list[Tensor | None], dim: int) -> bool:
    if len(grad_outputs) != 1 or grad_outputs[0] is None or not grads:
        return False
    start = 0
    for g in grads:
        if g is None:
            return False
        if not torch.equal(grad_outputs[0].narrow(dim, start, g.shape[dim]), g):
            return False
        start += g.shape[dim]
    return start == grad_outputs[0].shape[dim]


def _slice_refs(grads: list[Tensor], grad_output: Tensor, dim: int, store: _Store) -> list[dict]:
    base, start, refs = store.key(grad_output), 0, []
    for g in grads:
        refs.append({"narrow": base, "dim": dim, "start": start, "length": g.shape[dim]})
        start += g.shape[dim]
    return refs


def _layout_json(layout: Layout | None) -> list | None:
    return None if layout is None else [list(layout.size), list(layout.stride), layout.storage_offset]


def _layout(data: list | None) -> Layout | None:
    if data is None:
        return None
    if not isinstance(data, list) or len(data) != 3:
        raise ValueError(f"a layout is [size, stride, offset], got {data!r}")
    return Layout(tuple(int(v) for v in data[0]), tuple(int(v) for v in data[1]), int(data[2]))


def decode_traces(index: list[dict], arrays: Mapping[str, np.ndarray], where: Path,
                  state_shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[list[Trace], list]:
    """Rebuild the traces of :func:`encode_traces` (tensors shared where they were). Returns (traces, stored).

    Every tensor's shape is checked against what the index says it must be (the layout recorded with it,
    its parameter's shape in ``state_shapes``), so a swapped or reshaped array is refused here, by name,
    and never reaches the judge.
    """
    tensors: dict[str, Tensor] = {}

    def resolve(ref: object) -> Tensor | None:
        if ref is None:
            return None
        if isinstance(ref, str):
            if ref not in arrays:
                raise FixtureError(where, f"refers to array {ref!r}, which trace.npz lacks")
            if ref not in tensors:
                tensors[ref] = torch.from_numpy(arrays[ref])
            return tensors[ref]
        if isinstance(ref, dict) and "cat" in ref:
            return torch.cat([resolve(r) for r in ref["cat"]], int(ref["dim"]))  # type: ignore[misc]
        if isinstance(ref, dict) and "narrow" in ref:
            base = resolve(ref["narrow"])
            return base.narrow(int(ref["dim"]), int(ref["start"]), int(ref["length"]))  # type: ignore[union-attr]
        raise FixtureError(where, f"malformed tensor reference {ref!r}")

    traces, stored = [], []
    try:
        for step_no, step in enumerate(index):
            units, kept = {}, {}
            # JSON keys are sorted on disk; a trace lists its units in forward order
            for name, entry in sorted(step["units"].items(), key=lambda item: item[1]["forward_index"]):
                rec = UnitRecord(name, str(entry["kind"]), int(entry["forward_index"]), bool(entry["training"]),
                                 backward_index=_opt_int(entry["backward_index"]), calls=int(entry["calls"]))
                rec.input_layouts = [_layout(lo) for lo in entry["input_layouts"]]
                rec.grad_output_layouts = [_layout(lo) for lo in entry["grad_output_layouts"]]
                for q, refs in entry["tensors"].items():
                    if q in TENSOR_QUANTITIES:
                        setattr(rec, q, [resolve(r) for r in refs])
                    elif q in DICT_QUANTITIES:
                        setattr(rec, q, {str(k): resolve(r) for k, r in refs.items()})
                    else:
                        raise FixtureError(where, f"unit {name}: unknown quantity {q!r}")
                _check_shapes(rec, state_shapes or {}, where, step_no, tensors)
                units[name] = rec
                kept[name] = set(entry["tensors"])
            trace = Trace(units, output=resolve(step["output"]), loss=resolve(step["loss"]))
            if "functions" in step:  # schema 3: the custom Function calls (unbound: no class, see bind_functions)
                trace.functions = [_decode_call(c, resolve, where, step_no) for c in step["functions"]]
                trace.entered = [str(n) for n in step["entered"]]
            if trace.loss is not None and trace.loss.dim() != 0:
                raise FixtureError(where, f"step {step_no}: the loss has shape {tuple(trace.loss.shape)}, not a scalar")
            traces.append(trace)
            stored.append(kept)
    except FixtureError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
        raise FixtureError(where, f"malformed index ({type(exc).__name__}: {_first_line(exc)})") from None
    return traces, stored


class Unbound:
    """Stands for the class of a stored custom Function call until the check binds the model's own class to it
    (a fixture names a class; it never imports one). Its ``apply`` refuses: an unbound call is never replayed."""

    @classmethod
    def apply(cls, *args: object, **kwargs: object) -> object:
        why = getattr(cls, "why", "it is not bound to the model's class")
        raise RuntimeError(f"recorded in the fixture, but {why}: not replayed")


def _decode_call(entry: dict, resolve: Callable, where: Path, step: int) -> object:
    from densenet_debug.verdict.functions import FunctionCall

    qualname = str(entry["class"])
    if not all(part.isidentifier() for part in qualname.replace(".<locals>.", ".").split(".")):
        raise FixtureError(where, f"step {step}: custom Function class name {qualname!r} is not a Python name")
    cls = type(qualname.rpartition(".")[2], (Unbound,), {"__qualname__": qualname,
                                                          "__module__": str(entry.get("defined_in") or "fixture")})
    tensors = entry["tensors"]

    def get(q: str) -> list | None:
        refs = tensors[q]
        return None if refs is None else [resolve(r) for r in refs]

    call = FunctionCall(cls=cls, module=str(entry["module"]), occurrence=int(entry["occurrence"]), template=(),
                        inputs=get("inputs") or [], input_layouts=[_layout(lo) for lo in entry["input_layouts"]],
                        needs=[bool(n) for n in entry["needs"]], entered=int(entry["entered"]),
                        random=bool(entry["random"]), outputs=get("outputs") or [], grad_outputs=get("grad_outputs"),
                        grad_output_layouts=[_layout(lo) for lo in entry["grad_output_layouts"]],
                        grad_inputs=get("grad_inputs"))
    what = f"custom Function call {call.label}, step {step}"
    if len(call.input_layouts) != len(call.inputs) or len(call.needs) != len(call.inputs):
        raise FixtureError(where, f"{what}: {len(call.inputs)} input(s) but {len(call.input_layouts)} layout(s)")
    pairs = [("input", call.inputs, call.input_layouts), ("grad_input", call.grad_inputs or [], call.input_layouts),
             ("grad_output", call.grad_outputs or [], call.grad_output_layouts)]
    for label, ts, layouts in pairs:
        for i, (t, lo) in enumerate(zip(ts, layouts)):
            if t is not None and lo is not None and tuple(t.shape) != tuple(lo.size):
                raise FixtureError(where.parent / "trace.npz", f"{label} {i} of {what} has shape {tuple(t.shape)}, "
                                                               f"{where.name} records {tuple(lo.size)}")
    return call


def _opt_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[arg-type]


def _check_shapes(rec: UnitRecord, state_shapes: Mapping[str, tuple[int, ...]], where: Path, step: int,
                  tensors: Mapping[str, Tensor]) -> None:
    """Each stored tensor has the shape its record implies; a unit called twice is checked per hook only."""
    def expect(what: str, t: Tensor | None, shape: tuple[int, ...] | None) -> None:
        if t is not None and shape is not None and tuple(t.shape) != tuple(shape):
            key = next((k for k, v in tensors.items() if v is t), None)
            array = f"array {key}" if key else "a recipe of arrays"
            raise FixtureError(where.parent / "trace.npz", f"{array} ({what} of unit {rec.name}, step {step}) "
                                                           f"has shape {tuple(t.shape)}, {where.name} records "
                                                           f"{tuple(shape)}")

    def sizes(layouts: list[Layout | None], n: int) -> list[tuple[int, ...] | None]:
        return [lo.size if lo is not None else None for lo in layouts[:n]] + [None] * max(0, n - len(layouts))

    for i, (t, shape) in enumerate(zip(rec.inputs, sizes(rec.input_layouts, len(rec.inputs)))):
        expect(f"input {i}", t, shape)
    for i, (t, shape) in enumerate(zip(rec.grad_outputs, sizes(rec.grad_output_layouts, len(rec.grad_outputs)))):
        expect(f"grad_output {i}", t, shape)
    if rec.calls == 1:  # one call: outputs and grad_outputs, inputs and grad_inputs come from the same call
        for i, (t, shape) in enumerate(zip(rec.outputs, sizes(rec.grad_output_layouts, len(rec.outputs)))):
            expect(f"output {i}", t, shape)
        for i, (t, shape) in enumerate(zip(rec.grad_inputs, sizes(rec.input_layouts, len(rec.grad_inputs)))):
            expect(f"grad_input {i}", t, shape)
    prefix = f"{rec.name}." if rec.name else ""
    for q in DICT_QUANTITIES:
        for k, t in getattr(rec, q).items():
            expect(f"{q} {k}", t, state_shapes.get(prefix + k))


# -- write / read -------------------------------------------------------------------------------------------
def write_fixture(
    path: str | Path, meta: dict, inputs: Tensor, targets: Tensor, state: Mapping[str, Tensor],
    traces: list[Trace], keep: Mapping[str, Iterable[str]] | None = None, ops: Capture | None = None,
) -> Path:
    """Write a fixture directory atomically; ``meta`` gains ``schema``, ``files`` and storage figures.

    ``meta`` must hold every field :func:`validate_meta` asks for (``record_reference`` writes them all), and an
    ``ops`` section exactly when ``ops`` (the oracle's op capture of the first step, schema 4) is given.
    """
    target = Path(path)
    store = _Store()
    index, _ = encode_traces(traces, keep, store)
    schema = schema_for(meta)
    if any("functions" in step for step in index) and schema not in (SCHEMA, SCHEMA_OPS):
        raise ValueError("custom Function calls are stored but meta.json has no functions section")
    if (ops is not None) != (schema == SCHEMA_OPS):
        raise ValueError("an op capture is stored exactly when meta.json has an ops section")
    document: dict = {"schema": schema, "steps": index}
    if ops is not None:
        document["ops"] = encode_ops(ops, store)
    payload = {
        "inputs.npz": npz_bytes({"inputs": to_numpy(inputs), "targets": to_numpy(targets)}),
        "state.npz": npz_bytes({k: to_numpy(v) for k, v in state.items()}),
        "trace.npz": npz_bytes(store.arrays),
        "index.json": (json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
                       + "\n").encode(),
    }
    meta = dict(meta)
    meta["schema"] = schema
    meta["state_dtypes"] = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()
                            if v.dtype in _WIDENED}
    meta["storage"] = {**meta.get("storage", {}), "arrays": len(store.arrays),
                       "tensor_bytes": int(sum(a.nbytes for a in store.arrays.values()))}
    meta["files"] = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                     for name, data in sorted(payload.items())}
    validate_meta(meta, target / "meta.json")  # never write what a reader would refuse
    with writing_dir(target) as tmp:
        for name, data in payload.items():
            (tmp / name).write_bytes(data)
        (tmp / "meta.json").write_text(canonical_json(meta))
    return target


def read_fixture(path: str | Path) -> Fixture:
    """Load and verify a fixture; any problem raises :class:`FixtureError` naming the file and the cause."""
    root = Path(path)
    meta = read_meta(root)
    verify_files(root, meta)
    inputs, targets = _read_batch(root / "inputs.npz", meta)
    state = {}
    for k, a in load_npz(root / "state.npz").items():
        t = torch.from_numpy(a)
        state[k] = t.to(NARROWED_DTYPES[meta["state_dtypes"][k]]) if k in meta["state_dtypes"] else t
    unknown = sorted(set(meta["state_dtypes"]) - set(state))
    if unknown:
        raise FixtureError(root / "meta.json", f"field state_dtypes names {unknown[0]!r}, which state.npz lacks")
    try:
        index = json.loads((root / "index.json").read_text())
        steps = index["steps"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise FixtureError(root / "index.json", f"malformed ({exc})") from None
    if not isinstance(steps, list) or len(steps) != meta["step"]["steps"]:
        raise FixtureError(root / "index.json", f"field steps must list {meta['step']['steps']} step(s) as "
                                                f"meta.json records, got {shown(steps)}")
    with_calls = any(isinstance(step, dict) and "functions" in step for step in steps)
    stored_calls = bool(meta.get("functions", {}).get("stored"))
    if with_calls != stored_calls:
        raise FixtureError(root / "index.json", "holds custom Function calls but meta.json says none are stored"
                           if with_calls else "holds no custom Function calls but meta.json says they are stored")
    has_ops, recorded_ops = isinstance(index, dict) and "ops" in index, "ops" in meta
    if has_ops != recorded_ops:
        raise FixtureError(root / "index.json", "holds an op capture but meta.json has no ops section"
                           if has_ops else "holds no op capture but meta.json says one is recorded")
    shapes = {k: tuple(t.shape) for k, t in state.items()}
    arrays = load_npz(root / "trace.npz")
    traces, stored = decode_traces(steps, arrays, root / "index.json", shapes)
    ops = decode_ops(index["ops"], arrays, root / "index.json") if has_ops else None
    if ops is not None and len(ops) != meta["ops"]["records"]:
        raise FixtureError(root / "index.json", f"op capture holds {len(ops)} op(s), meta.json records "
                                                f"{meta['ops']['records']}")
    classes = meta["model"]["num_classes"]
    for i, trace in enumerate(traces):
        if trace.output is not None and (trace.output.dim() != 2 or trace.output.shape[0] != inputs.shape[0]
                                         or (classes is not None and trace.output.shape[1] != classes)):
            raise FixtureError(root / "trace.npz", f"step {i}: logits of shape {tuple(trace.output.shape)}, expected "
                                                   f"({inputs.shape[0]}, {classes}) (a wrongly shaped trace array)")
    return Fixture(root, meta, inputs, targets, state, traces, stored, ops)


def _read_batch(path: Path, meta: dict) -> tuple[Tensor, Tensor]:
    """``inputs`` and ``targets``, checked against meta.json's batch, input shape and classes."""
    arrays = load_npz(path)
    if set(arrays) != {"inputs", "targets"}:
        raise FixtureError(path, f"expected arrays inputs and targets, found {sorted(arrays)}")
    inputs, targets = arrays["inputs"], arrays["targets"]
    expected = (meta["data"]["batch"], *meta["data"]["input_shape"])
    if inputs.shape != expected:
        raise FixtureError(path, f"array inputs has shape {inputs.shape}, meta.json records {expected}")
    dtype = str(torch.from_numpy(inputs[:0]).dtype).removeprefix("torch.")
    if dtype != meta["data"].get("input_dtype", dtype):
        raise FixtureError(path, f"array inputs has dtype {dtype}, meta.json records {meta['data']['input_dtype']}")
    if targets.shape != expected[:1] or targets.dtype.kind not in "iu":
        raise FixtureError(path, f"array targets must be {expected[0]} integer labels, got shape {targets.shape} "
                                 f"{targets.dtype}")
    classes = meta["model"]["num_classes"]
    if targets.size and (targets.min() < 0 or (classes is not None and targets.max() >= classes)):
        raise FixtureError(path, f"array targets holds labels outside [0, {classes}): {targets.min()}..{targets.max()}")
    return torch.from_numpy(inputs), torch.from_numpy(targets)
