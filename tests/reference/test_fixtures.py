"""The fixture format: exact round trips, deduplication, reproducible bytes, and refusal of damaged files."""

from __future__ import annotations

import copy
import functools
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from densenet_debug import build_model
from densenet_debug.reference.format import (
    ALL_QUANTITIES,
    decode_traces,
    encode_traces,
    load_npz,
    npz_bytes,
    read_fixture,
    write_fixture,
)
from densenet_debug.reference.meta import SCHEMA_NO_FUNCTIONS, FixtureError
from densenet_debug.trace import Trace, trace_step


@functools.lru_cache(maxsize=4)
def _fp64_trace(seed: int = 0, batch: int = 2, model: str = "densenet-bc-10") -> tuple:
    """(model, x, y, initial state, fp64 trace) of one step; cached, so treat as read-only."""
    torch.manual_seed(seed)
    m = build_model(model)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    trace = trace_step(copy.deepcopy(m).double(), x.double(), y)
    return m, x, y, state, trace


def _assert_same_trace(a: Trace, b: Trace, quantities=ALL_QUANTITIES) -> None:
    assert list(a.units) == list(b.units)
    assert torch.equal(a.output, b.output) and torch.equal(a.loss, b.loss)
    for ra, rb in zip(a, b):
        assert (ra.kind, ra.forward_index, ra.backward_index, ra.training, ra.calls) == (
            rb.kind, rb.forward_index, rb.backward_index, rb.training, rb.calls)
        assert ra.input_layouts == rb.input_layouts and ra.grad_output_layouts == rb.grad_output_layouts
        for q in quantities:
            va, vb = getattr(ra, q), getattr(rb, q)
            if isinstance(va, dict):
                assert va.keys() == vb.keys(), (ra.name, q)
                va, vb = [va[k] for k in sorted(va)], [vb[k] for k in sorted(va)]
            assert len(va) == len(vb), (ra.name, q)
            for ta, tb in zip(va, vb):
                assert (ta is None) == (tb is None), (ra.name, q)
                if ta is not None:
                    assert ta.dtype == tb.dtype and torch.equal(ta, tb), (ra.name, q)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fixture written once, copied by the many corruption examples."""
    return _write(tmp_path_factory.mktemp("pristine"))


def _meta(name: str = "fx", batch: int = 2, input_shape: tuple[int, ...] = (3, 32, 32)) -> dict:
    """Every field meta.json must hold, for a fixture of densenet-bc-10 (what record_reference writes)."""
    from densenet_debug.reference.record import model_description

    return {"name": name, "model": {**model_description(build_model("densenet-bc-10"), "densenet-bc-10", None),
                                    "num_classes": 10},
            "data": {"batch": batch, "input_shape": list(input_shape)}, "step": {"steps": 1, "bn_mode": "train"},
            "storage": {"policy": "full"}}


def _write(tmp_path: Path, name: str = "fx", **kw) -> Path:
    m, x, y, state, trace = _fp64_trace(**kw)
    return write_fixture(tmp_path / name, _meta(name, x.shape[0]), x, y, state, [trace])


def test_round_trip_is_bit_exact_with_layouts(tmp_path: Path) -> None:
    m, x, y, state, trace = _fp64_trace()
    fx = read_fixture(write_fixture(tmp_path / "fx", _meta(), x, y, state, [trace]))
    _assert_same_trace(trace, fx.traces[0])
    assert torch.equal(fx.inputs, x) and torch.equal(fx.targets, y)
    assert fx.state.keys() == state.keys() and all(torch.equal(fx.state[k], v) for k, v in state.items())
    assert fx.state["stem.weight"].dtype == torch.float32  # weights kept in their own dtype
    assert fx.meta["schema"] == SCHEMA_NO_FUNCTIONS and fx.complete  # no custom Function: schema 2
    # the #708 layout (last layer of a block: conv2's grad_output is an offset cat slice) survives
    last = fx.traces[0]["block1.layer01.conv2"].grad_output_layouts[0]
    assert last is not None and not last.is_contiguous


def test_dedup_shares_tensors_and_uses_verified_recipes() -> None:
    _, _, _, _, trace = _fp64_trace()
    index, arrays = encode_traces([trace])
    units = index[0]["units"]
    # a unit's input is its predecessor's output: one array, one key
    assert units["block1.layer01.norm1"]["tensors"]["outputs"] == units["block1.layer01.relu1"]["tensors"]["inputs"]
    # a block's concatenation is stored as a recipe over its inputs, its input grads as slices
    assert "cat" in units["block1.cat"]["tensors"]["outputs"][0]
    assert all("narrow" in r for r in units["block1.cat"]["tensors"]["grad_inputs"])
    distinct = sum(a.nbytes for a in arrays.values())
    total = sum(t.numel() * 8 for r in trace for q in ("inputs", "outputs", "grad_outputs", "grad_inputs")
                for t in getattr(r, q) if t is not None)
    assert distinct < 0.6 * total
    traces, stored = decode_traces(index, arrays, Path("index.json"))
    _assert_same_trace(trace, traces[0])
    assert stored[0]["block1.cat"] == set(ALL_QUANTITIES) - {"call_param_grads"}  # called once: .grad is its share


def test_partial_storage_keeps_only_what_was_asked() -> None:
    _, _, _, _, trace = _fp64_trace()
    keep = {"block1.layer01.conv2": ["outputs", "grad_outputs"], "stem": ["param_grads"]}
    index, arrays = encode_traces([trace], keep)
    traces, stored = decode_traces(index, arrays, Path("index.json"))
    rec = traces[0]["block1.layer01.conv2"]
    assert torch.equal(rec.outputs[0], trace["block1.layer01.conv2"].outputs[0])
    assert rec.inputs == [] and rec.param_grads == {}
    assert stored[0]["stem"] == {"param_grads"} and stored[0]["head.fc"] == set()
    assert torch.equal(traces[0].loss, trace.loss)


def test_same_arrays_same_bytes(tmp_path: Path) -> None:
    a = _write(tmp_path / "a")
    b = _write(tmp_path / "b")
    for name in ("inputs.npz", "state.npz", "trace.npz", "index.json", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_npz_is_readable_by_numpy_and_refuses_objects(tmp_path: Path) -> None:
    p = tmp_path / "a.npz"
    p.write_bytes(npz_bytes({"x": np.arange(3.0), "y": np.ones((2, 2), dtype=np.int64)}))
    with np.load(p, allow_pickle=False) as z:
        assert z["x"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="object"):
        npz_bytes({"bad": np.array([{"a": 1}], dtype=object)})


def test_bfloat16_state_round_trips(tmp_path: Path) -> None:
    _, x, y, state, trace = _fp64_trace()
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()}
    fx = read_fixture(write_fixture(tmp_path / "bf", _meta("bf"), x, y, state, [trace]))
    assert fx.state["stem.weight"].dtype == torch.bfloat16
    assert torch.equal(fx.state["stem.weight"], state["stem.weight"])


# -- refusals: one line naming the file and the cause ---------------------------------------------------------
def _rewrite_meta(root: Path, **changes) -> None:
    meta = json.loads((root / "meta.json").read_text())
    meta.update(changes)
    (root / "meta.json").write_text(json.dumps(meta))


def test_missing_meta(tmp_path: Path) -> None:
    root = _write(tmp_path)
    (root / "meta.json").unlink()
    with pytest.raises(FixtureError, match=r"meta\.json: missing"):
        read_fixture(root)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FixtureError, match="no such fixture"):
        read_fixture(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(FixtureError, match="not a fixture directory"):
        read_fixture(tmp_path / "f")


@pytest.mark.parametrize("schema, cause", [
    ("densenet-debug/reference/5", "newer than this toolkit"),
    ("densenet-debug/reference/1", "older than .*re-record it: scripts/regen_reference"),
    ("densenet-debug/reference/0", "older than"),
    ("someone-else/1", "not a densenet-debug reference schema"),
    (None, "not a densenet-debug reference schema"),
])
def test_schema_refused(tmp_path: Path, schema, cause: str) -> None:
    root = _write(tmp_path)
    _rewrite_meta(root, schema=schema)
    with pytest.raises(FixtureError, match=cause) as err:
        read_fixture(root)
    assert "meta.json" in str(err.value) and "\n" not in str(err.value)


def test_truncated_file(tmp_path: Path) -> None:
    root = _write(tmp_path)
    data = (root / "trace.npz").read_bytes()
    (root / "trace.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(FixtureError, match=r"trace\.npz: truncated"):
        read_fixture(root)


@settings(max_examples=8, deadline=None)
@given(which=st.sampled_from(["inputs.npz", "state.npz", "trace.npz", "index.json"]), where=st.floats(0, 0.999))
def test_any_flipped_byte_is_caught(tmp_path_factory, pristine: Path, which: str, where: float) -> None:
    root = tmp_path_factory.mktemp("flip") / "fx"
    shutil.copytree(pristine, root)
    data = bytearray((root / which).read_bytes())
    data[int(where * len(data))] ^= 0x01
    (root / which).write_bytes(bytes(data))
    with pytest.raises(FixtureError, match=f"{which}: SHA-256 mismatch"):
        read_fixture(root)


def test_object_array_refused_even_with_matching_checksum(tmp_path: Path) -> None:
    import hashlib

    root = _write(tmp_path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:  # a pickled object array, checksum recomputed to match
        member = io.BytesIO()
        np.lib.format.write_array(member, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
        zf.writestr("inputs.npy", member.getvalue())
        member = io.BytesIO()
        np.save(member, np.zeros(2, dtype=np.int64))
        zf.writestr("targets.npy", member.getvalue())
    data = buffer.getvalue()
    (root / "inputs.npz").write_bytes(data)
    meta = json.loads((root / "meta.json").read_text())
    meta["files"]["inputs.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FixtureError, match=r"inputs\.npz: holds an object \(pickled\) array"):
        read_fixture(root)


def test_garbage_zip_with_matching_checksum(tmp_path: Path) -> None:
    p = tmp_path / "x.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(FixtureError, match=r"x\.npz: not a readable npz"):
        load_npz(p)


def test_missing_array_file(tmp_path: Path) -> None:
    root = _write(tmp_path)
    (root / "state.npz").unlink()
    with pytest.raises(FixtureError, match=r"state\.npz: missing"):
        read_fixture(root)


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write(tmp_path)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    import densenet_debug.reference.format as fixtures

    def boom(data: object) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setattr(fixtures, "canonical_json", boom)
    m, x, y, state, trace = _fp64_trace(seed=1)
    with pytest.raises(RuntimeError):
        write_fixture(root, _meta(), x, y, state, [trace])
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fx"]


# -- storage policies: the checkpoints policy rebuilds exactly the oracle the full policy stores -------------
@settings(max_examples=4, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # no slow shrink
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), eval_mode=st.booleans())
def test_checkpoints_policy_rebuilds_the_full_oracle(tmp_path_factory, seed: int, batch: int,
                                                      eval_mode: bool) -> None:
    from densenet_debug.reference.check import check_reference, load_reference, reference_oracle
    from densenet_debug.reference.record import generate_batch, record_reference

    torch.manual_seed(seed)
    model = build_model("densenet-bc-10")
    x, y, _ = generate_batch(batch, seed, (3, 8, 8), 10)
    root = tmp_path_factory.mktemp("policy")
    kw = {"eval_mode": eval_mode, "check_oracle": False}  # the NumPy cross-check has its own test
    full = record_reference(model, x, y, root / "full", policy="full", **kw)
    ckpt = record_reference(model, x, y, root / "ckpt", policy="checkpoints", **kw)
    assert (ckpt / "trace.npz").stat().st_size < (full / "trace.npz").stat().st_size
    fa, ma = load_reference(full, model)
    fb, mb = load_reference(ckpt, model)
    assert fa.complete and not fb.complete
    oracle_a, _ = reference_oracle(fa, ma)
    oracle_b, recomputed = reference_oracle(fb, mb)
    _assert_same_trace(oracle_a[0], oracle_b[0])  # bit for bit: same torch, one thread, same stored inputs
    result = check_reference(fb, "native", loaded=(fb, mb, oracle_b, recomputed))
    assert result.verdict == "agree", result.message()
    assert result.reproduction and all(r.error_a == 0.0 for r in result.reproduction)



class _ConvTwice(torch.nn.Module):
    """A conv and a batch norm each called twice in one forward (their .grad sums both calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv0(x)))
        h = torch.relu(self.bn(self.conv1(h))) + h
        h = torch.relu(self.conv1(h)) + h
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("policy", ["full", "checkpoints"])
def test_a_module_called_twice_round_trips_and_its_first_call_share_is_stored(tmp_path: Path, policy: str) -> None:
    """Its local rows judge the first call's share of each parameter gradient: the fixture must hold it."""
    from densenet_debug.reference.check import check_reference
    from densenet_debug.reference.format import read_fixture
    from densenet_debug.reference.record import generate_batch, record_reference

    torch.manual_seed(0)
    model = _ConvTwice()
    x, y, _ = generate_batch(3, 0, (3, 8, 8), 10)
    path = record_reference(model, x, y, tmp_path / "fx", policy=policy, check_oracle=False)
    stored = read_fixture(path).traces[0]
    assert stored["conv1"].calls == 2 and sorted(stored["conv1"].call_param_grads) == ["bias", "weight"]
    assert sorted(stored["bn"].call_param_grads) == ["bias", "weight"] and not stored["conv0"].call_param_grads
    for backend in ("native", "mkldnn"):
        result = check_reference(path, backend, model=model)
        assert result.verdict == "agree", result.message()
