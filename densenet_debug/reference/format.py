"""Reference fixtures on disk: ``reference_grads/<name>/``, written whole or not at all, read with every check.

Schema ``densenet-debug/reference/1``; a fixture directory holds

* ``meta.json``: what was recorded and how (model, data generation, step, storage policy, how the truth was
  computed), the size and SHA-256 of every other file, provenance. The only file not checksummed: it holds
  the checksums.
* ``index.json``: per step and per unit, its kind, forward/backward order, mode, call count, the layouts
  its inputs and grad_outputs had, and for each stored quantity the references of its tensors.
* ``inputs.npz``: ``inputs`` and ``targets`` exactly as fed to the model.
* ``state.npz``: the initial ``state_dict`` (parameters and buffers) in its own dtype (bfloat16 is stored
  widened to float32, which is exact, and narrowed back on load).
* ``trace.npz``: the float64 truth, each distinct tensor once (``t00000``...).

A reference is a key of ``trace.npz``, ``null`` (no tensor there), or a recipe verified bit for bit at
write time: ``{"cat": [refs], "dim": d}`` (a concatenation's output is its inputs) and
``{"narrow": ref, "dim": d, "start": s, "length": n}`` (a concatenation's input gradients are slices of its
output gradient). Recipes and content deduplication are what make the truth of a DenseNet small: there,
most tensors are concatenations or copies of earlier ones.

Arrays are loaded with ``allow_pickle=False``; an object array is refused. The ``.npz`` files are zips
written with fixed timestamps and sorted names, so the same arrays give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from densenet_debug.atomic import writing_dir
from densenet_debug.errors import UsageError
from densenet_debug.trace import Layout, Trace, UnitRecord

SCHEMA = "densenet-debug/reference/1"
SCHEMA_PREFIX = "densenet-debug/reference/"
SCHEMA_VERSION = 1
ARRAY_FILES = ("inputs.npz", "state.npz", "trace.npz")
TENSOR_QUANTITIES = ("inputs", "outputs", "grad_outputs", "grad_inputs")
DICT_QUANTITIES = ("param_grads", "buffers_before", "buffers_after")
ALL_QUANTITIES = TENSOR_QUANTITIES + DICT_QUANTITIES
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_WIDENED = {torch.bfloat16: torch.float32}


class FixtureError(UsageError):
    """A fixture that cannot be used: one line naming the file and the cause (the CLI exits 2)."""

    def __init__(self, path: str | Path, cause: str) -> None:
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = Path(path), cause


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
    """Every array of ``path``; pickled (object) arrays and damaged zips raise :class:`FixtureError`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise FixtureError(path, "holds an object (pickled) array; refused, fixtures are numeric only") from None
        raise FixtureError(path, f"not a readable npz file: {exc}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise FixtureError(path, f"not a readable npz file ({type(exc).__name__}: {exc})") from None


def to_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in _WIDENED:
        t = t.to(_WIDENED[t.dtype])
    return t.contiguous().numpy()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    traces: list[Trace], keep: Mapping[str, Iterable[str]] | None = None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """``(index, arrays)`` for ``traces``. ``keep``: unit -> quantities to store; None stores everything."""
    store = _Store()
    index = []
    for trace in traces:
        units = {}
        for rec in trace:
            wanted = set(ALL_QUANTITIES) if keep is None else set(keep.get(rec.name, ()))
            units[rec.name] = _encode_unit(rec, wanted, store)
        index.append({
            "units": units,
            "output": None if trace.output is None else store.key(trace.output),
            "loss": None if trace.loss is None else store.key(trace.loss),
        })
    return index, store.arrays


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
        if q in wanted:
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
    return None if data is None else Layout(tuple(data[0]), tuple(data[1]), int(data[2]))


def decode_traces(index: list[dict], arrays: Mapping[str, np.ndarray], where: Path) -> tuple[list[Trace], list]:
    """Rebuild the traces of :func:`encode_traces` (tensors shared where they were). Returns (traces, stored)."""
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
        for step in index:
            units, kept = {}, {}
            # JSON keys are sorted on disk; a trace lists its units in forward order
            for name, entry in sorted(step["units"].items(), key=lambda item: item[1]["forward_index"]):
                rec = UnitRecord(name, entry["kind"], int(entry["forward_index"]), bool(entry["training"]),
                                 backward_index=entry["backward_index"], calls=int(entry["calls"]))
                rec.input_layouts = [_layout(lo) for lo in entry["input_layouts"]]
                rec.grad_output_layouts = [_layout(lo) for lo in entry["grad_output_layouts"]]
                for q, refs in entry["tensors"].items():
                    if q in TENSOR_QUANTITIES:
                        setattr(rec, q, [resolve(r) for r in refs])
                    elif q in DICT_QUANTITIES:
                        setattr(rec, q, {k: resolve(r) for k, r in refs.items()})
                    else:
                        raise FixtureError(where, f"unit {name}: unknown quantity {q!r}")
                units[name] = rec
                kept[name] = set(entry["tensors"])
            trace = Trace(units, output=resolve(step["output"]), loss=resolve(step["loss"]))
            traces.append(trace)
            stored.append(kept)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise FixtureError(where, f"malformed index ({type(exc).__name__}: {exc})") from None
    return traces, stored


# -- write / read -------------------------------------------------------------------------------------------
def write_fixture(
    path: str | Path, meta: dict, inputs: Tensor, targets: Tensor, state: Mapping[str, Tensor],
    traces: list[Trace], keep: Mapping[str, Iterable[str]] | None = None,
) -> Path:
    """Write a fixture directory atomically; ``meta`` gains ``schema``, ``files`` and storage figures."""
    target = Path(path)
    index, arrays = encode_traces(traces, keep)
    payload = {
        "inputs.npz": npz_bytes({"inputs": to_numpy(inputs), "targets": to_numpy(targets)}),
        "state.npz": npz_bytes({k: to_numpy(v) for k, v in state.items()}),
        "trace.npz": npz_bytes(arrays),
        "index.json": (json.dumps({"schema": SCHEMA, "steps": index}, sort_keys=True, separators=(",", ":"))
                       + "\n").encode(),
    }
    meta = dict(meta)
    meta["schema"] = SCHEMA
    meta["state_dtypes"] = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()
                            if v.dtype in _WIDENED}
    meta.setdefault("storage", {})["arrays"] = len(arrays)
    meta["storage"]["tensor_bytes"] = int(sum(a.nbytes for a in arrays.values()))
    meta["files"] = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                     for name, data in sorted(payload.items())}
    with writing_dir(target) as tmp:
        for name, data in payload.items():
            (tmp / name).write_bytes(data)
        (tmp / "meta.json").write_text(canonical_json(meta))
    return target


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of the fixture at ``path``, with its schema checked (one-line errors)."""
    root = Path(path)
    if not root.exists():
        raise FixtureError(root, "no such fixture directory")
    if not root.is_dir():
        raise FixtureError(root, "not a fixture directory (expected reference_grads/<name>/)")
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise FixtureError(meta_path, "missing; not a reference fixture (or a half-copied one)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FixtureError(meta_path, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise FixtureError(meta_path, "not a JSON object")
    schema = meta.get("schema")
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_PREFIX):
        raise FixtureError(meta_path, f"schema {schema!r} is not a densenet-debug reference schema")
    version = schema.removeprefix(SCHEMA_PREFIX)
    if not version.isdigit():
        raise FixtureError(meta_path, f"unreadable schema version {version!r}")
    if int(version) > SCHEMA_VERSION:
        raise FixtureError(meta_path, f"schema {schema} is newer than this toolkit reads ({SCHEMA}); "
                                      "upgrade densenet-debug or re-record the fixture")
    if int(version) < SCHEMA_VERSION:
        raise FixtureError(meta_path, f"schema {schema} is older than {SCHEMA}; re-record it: scripts/regen_reference "
                                      "for the committed fixtures, `densenet-debug record --force` (same options) for "
                                      "your own")
    for key in ("files", "storage", "model"):
        if not isinstance(meta.get(key), dict):
            raise FixtureError(meta_path, f"no {key!r} section")
    return meta


def verify_files(path: str | Path, meta: dict) -> None:
    """Every file named in ``meta['files']`` exists with the recorded size and SHA-256."""
    root = Path(path)
    expected = set(ARRAY_FILES) | {"index.json"}
    missing_entries = expected - set(meta["files"])
    if missing_entries:
        raise FixtureError(root / "meta.json", f"lists no checksum for {', '.join(sorted(missing_entries))}")
    for name, info in sorted(meta["files"].items()):
        file = root / name
        if "/" in name or name.startswith("."):
            raise FixtureError(root / "meta.json", f"bad file name {name!r}")
        if not file.is_file():
            raise FixtureError(file, "missing")
        size = file.stat().st_size
        if size != info.get("bytes"):
            cause = "truncated" if size < int(info.get("bytes") or 0) else "wrong size"
            raise FixtureError(file, f"{cause}: {size} bytes, meta.json records {info.get('bytes')}")
        digest = sha256(file)
        if digest != info.get("sha256"):
            raise FixtureError(file, f"SHA-256 mismatch (corrupted or edited): {digest[:16]}..., "
                                     f"meta.json records {str(info.get('sha256'))[:16]}...")


def read_fixture(path: str | Path) -> Fixture:
    """Load and verify a fixture; any problem raises :class:`FixtureError` naming the file and the cause."""
    root = Path(path)
    meta = read_meta(root)
    verify_files(root, meta)
    io_arrays = load_npz(root / "inputs.npz")
    if set(io_arrays) != {"inputs", "targets"}:
        raise FixtureError(root / "inputs.npz", f"expected arrays inputs and targets, found {sorted(io_arrays)}")
    widened = meta.get("state_dtypes", {})
    state = {}
    for k, a in load_npz(root / "state.npz").items():
        t = torch.from_numpy(a)
        state[k] = t.to(getattr(torch, widened[k])) if k in widened else t
    try:
        index = json.loads((root / "index.json").read_text())
        steps = index["steps"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise FixtureError(root / "index.json", f"malformed ({exc})") from None
    traces, stored = decode_traces(steps, load_npz(root / "trace.npz"), root / "index.json")
    return Fixture(root, meta, torch.from_numpy(io_arrays["inputs"]), torch.from_numpy(io_arrays["targets"]),
                   state, traces, stored)
