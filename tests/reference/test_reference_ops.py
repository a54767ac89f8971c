"""Fixtures with the float64 oracle's op capture (``record --ops``, schema 4), judged op by op (``--ops``).

Recorded in a subprocess (another process: other autograd sequence numbers, tensor ids and data pointers) and
checked here; one fixture recorded under a float64 that rounds differently (conv/matmul results nudged by a few
ulps, as tests/reference/test_foreign_machine.py does); a planted op that runs under oneDNN float32 only and
changes values by far less than its conv's tolerance is a mismatch at that op with ``ops=True`` and passes
without. The typed-JSON argument encoding round-trips (hypothesis) and refuses any other tag in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_debug.capture.records import (
    ArgumentError,
    Capture,
    decode_argument,
    encode_argument,
    node_ranks,
    record_to_json,
)
from densenet_debug.cli import main
from densenet_debug.models import resolve_model
from densenet_debug.reference.check import check_reference, load_reference, reference_oracle
from densenet_debug.reference.format import read_fixture
from densenet_debug.reference.meta import SCHEMA_NO_FUNCTIONS, SCHEMA_OPS, FixtureError
from densenet_debug.reference.record import generate_batch, record_reference
from densenet_debug.verdict.engine import JudgeCache
from densenet_debug.verdict.ops import oracle_capture

ROOT = Path(__file__).resolve().parents[2]
ULPS = 2

MODELS = '''
import torch
import torch.nn.functional as F
from torch import nn


class NudgedConv(nn.Conv2d):
    """Under oneDNN in float32 only, multiplies its output by 1 + 2**-22: an op the oracle never runs."""

    def forward(self, x):
        out = super().forward(x)
        if torch.backends.mkldnn.enabled and out.dtype == torch.float32:
            return out * (1 + 2**-22)
        return out


class Functional(nn.Module):
    """The seed's style: F.relu inside forward, torch.cat((x, out), 1) in the same forward."""

    def __init__(self, num_classes=5, nudge=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv1 = (NudgedConv if nudge else nn.Conv2d)(4, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(7)
        self.fc = nn.Linear(7, num_classes)

    def forward(self, x):
        x = self.stem(x)
        out = torch.cat((x, self.conv1(F.relu(self.bn1(x)))), 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1), 1))


class InPlace(nn.Module):
    """torchvision's style: nn.ReLU(inplace=True) modules, features collected in a list and concatenated."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(7, num_classes)

    def forward(self, x):
        features = [self.stem(x)]
        features.append(self.conv(self.relu(self.norm(features[0]))))
        out = F.relu(torch.cat(features, 1), inplace=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def functional(num_classes=5):
    return Functional(num_classes)


def inplace(num_classes=5):
    return InPlace(num_classes)


def nudged(num_classes=5):
    return Functional(num_classes, nudge=True)
'''

RUNNER = '''"""Records in another process (autograd numbers moved on first), one of them under a foreign float64."""
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from densenet_debug.models import resolve_model
from densenet_debug.reference.record import generate_batch, record_reference

aten = torch.ops.aten
NUDGED = {aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.addmm.default}
ULPS = int(sys.argv[2])


def nudge(t):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or t.numel() == 0:
        return t
    index = torch.arange(t.numel(), dtype=torch.int64).reshape(t.shape)
    k = (index * 2654435761 + 12345) % (2 * ULPS + 1) - ULPS
    return t * (1 + k.to(torch.float64) * 2.0**-52)


class ForeignFloat64(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return tree_map(nudge, out) if func in NUDGED else out


for _ in range(257):  # this process's autograd sequence numbers and tensor ids are not the checker's
    (torch.ones(3, requires_grad=True) * 2).sum().backward()
for spec, path, foreign in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    model = resolve_model(spec)
    x, y, how = generate_batch(2, 0, (3, 6, 6), 5)
    if foreign:
        with ForeignFloat64():
            record_reference(model, x, y, path, spec=spec, data=how, ops=True, check_oracle=False)
    else:
        record_reference(model, x, y, path, spec=spec, data=how, ops=True)
print("recorded")
'''
CASES = {"functional": ("functional", False), "inplace": ("inplace", False), "nudged": ("nudged", False),
         "foreign": ("functional", True)}


def _spec(models: Path, factory: str) -> str:
    return f"{models}:{factory}"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The four fixtures of :data:`CASES`, recorded with ``ops=True`` in one subprocess."""
    root = tmp_path_factory.mktemp("ops_fixtures")
    models = root / "opmodels.py"
    models.write_text(MODELS)
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    paths = {case: root / case for case in CASES}
    jobs = [(_spec(models, factory), str(paths[case]), foreign) for case, (factory, foreign) in CASES.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(runner), json.dumps(jobs), str(ULPS)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return {"models": models, **paths}


def _model(recorded: dict, factory: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return resolve_model(_spec(recorded["models"], factory))


def _check(recorded: dict, case: str, backend: str, ops: bool = True):  # noqa: ANN202
    factory = CASES[case][0]
    return check_reference(recorded[case], backend, model=_model(recorded, factory), ops=ops)


def _structure(capture: Capture) -> list[dict]:
    """Every field of every record but the values, with node numbers as ranks (what alignment may depend on)."""
    ranks = node_ranks(capture)
    return [{k: v for k, v in record_to_json(r, lambda t: None, ranks).items() if not k.endswith("_values")}
            for r in capture.records]


# -- recorded in another process, checked here -----------------------------------------------------------------
def test_the_stored_capture_is_this_process_live_oracle_capture(recorded: dict) -> None:
    """Alignment depends on nothing process-specific: the capture recorded in the subprocess is, field for field
    (keys, creators, node ranks, layouts, arguments), the one this process makes live, and its values are the same
    float64 numbers; its node numbers are ranks within the capture, not the subprocess's sequence numbers."""
    fixture = read_fixture(recorded["functional"])
    assert fixture.meta["schema"] == SCHEMA_OPS and fixture.ops is not None
    assert fixture.meta["ops"]["records"] == len(fixture.ops) > 0
    live = oracle_capture(_model(recorded, "functional"), fixture.inputs, fixture.targets)
    assert _structure(fixture.ops) == _structure(live)
    assert fixture.ops.creators == {node_ranks(live)[n]: k for n, k in live.creators.items()}
    numbers = {r.node.sequence_nr for r in fixture.ops if r.node is not None} - {2**64 - 1}
    assert numbers and max(numbers) < len(fixture.ops) + len(fixture.ops.creators)
    for stored, now in zip(fixture.ops, live):
        for a, b in zip((stored.input_values or []) + (stored.output_values or []),
                        (now.input_values or []) + (now.output_values or [])):
            if a is not None and b is not None:
                assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-12, atol=1e-300), stored.label


@pytest.mark.parametrize("case", ["functional", "inplace"])
@pytest.mark.parametrize("backend", ["native", "mkldnn"])
def test_a_correct_backend_agrees_op_by_op(recorded: dict, case: str, backend: str) -> None:
    result = _check(recorded, case, backend)
    assert result.verdict == "agree", result.message()
    op_rows = [r for r in result.rows if r.mode == "op"]
    ops = result.settings["ops"]
    assert op_rows and ops["matched"] > 0 and ops["verdict"] == "agree", ops
    assert "per-op check against the fixture's op capture" in result.summary
    if case == "inplace":
        assert any("relu_" in r.layer for r in op_rows), "the in-place ReLU is judged as the op it is"
    assert json.loads(json.dumps(result.to_json()))["verdict"] == "agree"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "no-cudnn", "cudnn+channels_last"])
def test_a_cuda_backend_agrees_op_by_op_with_a_capture_recorded_on_the_cpu(recorded: dict, backend: str) -> None:
    """The stored float64 values are the teacher's inputs wherever the side runs: each op is replayed on CUDA
    in the side's dtype and layout, and compared on the CPU."""
    result = _check(recorded, "functional", backend)
    assert result.verdict == "agree", result.message()
    assert result.settings["ops"]["matched"] > 0


def test_a_planted_side_only_op_is_a_mismatch_at_that_op_only_with_ops(recorded: dict) -> None:
    """The nudge (2**-22, far below the conv's tolerance) passes every unit; op by op it is an op the fixture's
    oracle never ran that changes values, named ``conv1 · aten.mul``."""
    assert _check(recorded, "nudged", "mkldnn", ops=False).verdict == "agree"
    assert _check(recorded, "nudged", "native", ops=True).verdict == "agree"  # oneDNN off: no nudge
    result = _check(recorded, "nudged", "mkldnn", ops=True)
    assert result.verdict == "mismatch", result.message()
    failing = [r for r in result.rows if r.mode == "op" and r.status == "mismatch"]
    assert failing and all(r.layer.startswith("conv1 · aten.mul") for r in failing), [r.layer for r in failing]
    assert "conv1 · aten.mul" in result.summary and result.summary.startswith("mismatch: mkldnn wrong at op")
    assert result.first_divergence["op"] is not None and "mul" in result.first_divergence["op"]
    unit_rows = [r for r in result.rows if r.mode != "op" and r.layer == "conv1" and "failing op inside" in r.note]
    assert unit_rows, "the unit holding the failing op names it"


def test_a_foreign_float64_fixture_agrees_op_by_op(recorded: dict) -> None:
    """Recorded where float64 convolutions and matrix products round a few ulps differently: the stored op values
    are the teacher's inputs, and each bound carries the teacher's own float64 precision, so it still agrees."""
    foreign, plain = read_fixture(recorded["foreign"]).ops, read_fixture(recorded["functional"]).ops
    assert foreign is not None and plain is not None
    differ = [r.label for r, p in zip(foreign, plain)
              if any(not torch.equal(a, b) for a, b in zip(r.output_values or [], p.output_values or [])
                     if a is not None and b is not None)]
    assert any("convolution" in d for d in differ), "the foreign float64 really rounds differently"
    for backend in ("native", "mkldnn"):
        result = _check(recorded, "foreign", backend)
        assert result.verdict == "agree", f"{backend}: {result.message()}"


def test_stored_values_nudged_by_a_few_ulps_still_agree(recorded: dict, tmp_path: Path) -> None:
    """Every float64 array of the fixture moved by up to 2 ulps (deterministic per element), checksums
    re-signed: a float64 that rounds differently is no finding, op by op or unit by unit."""
    target = tmp_path / "nudged-values"
    shutil.copytree(recorded["functional"], target)
    arrays = dict(np.load(target / "trace.npz", allow_pickle=False))
    for key, a in arrays.items():
        if a.dtype == np.float64 and a.size:
            k = (np.arange(a.size).reshape(a.shape) * 2654435761 + 12345) % (2 * ULPS + 1) - ULPS
            arrays[key] = a * (1 + k * 2.0**-52)
    from densenet_debug.reference.format import npz_bytes

    (target / "trace.npz").write_bytes(npz_bytes(arrays))
    _resign(target)
    changed = read_fixture(target).ops
    assert changed is not None
    fixture, model = load_reference(target, _model(recorded, "functional"))
    loaded, shared = (fixture, model, *reference_oracle(fixture, model)), JudgeCache()
    for backend in ("native", "mkldnn"):
        result = check_reference(fixture, backend, loaded=loaded, shared=shared, ops=True)
        op_rows = [r for r in result.rows if r.mode == "op"]
        assert op_rows and not [r for r in op_rows if r.status not in ("ok", "kink")], result.message()


def _refs(data: object) -> set[str]:
    """Every array key a part of index.json names."""
    if isinstance(data, str):
        return {data} if data.startswith("t") and data[1:].isdigit() else set()
    if isinstance(data, dict):
        return set().union(*(_refs(v) for v in data.values())) if data else set()
    if isinstance(data, list):
        return set().union(*(_refs(v) for v in data)) if data else set()
    return set()


def test_a_nonfinite_stored_op_value_never_passes(recorded: dict, tmp_path: Path) -> None:
    """A NaN in a float64 value only the op capture holds (not a unit's truth): the op that produced it fails."""
    target = tmp_path / "nan"
    shutil.copytree(recorded["functional"], target)
    index = json.loads((target / "index.json").read_text())
    arrays = dict(np.load(target / "trace.npz", allow_pickle=False))
    only_ops = _refs(index["ops"]) - _refs(index["steps"])
    key = next(k for r in index["ops"]["records"] for k in r["output_values"] or []
               if k in only_ops and arrays[k].dtype == np.float64 and arrays[k].size)
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] = np.nan
    from densenet_debug.reference.format import npz_bytes

    (target / "trace.npz").write_bytes(npz_bytes(arrays))
    _resign(target)
    result = check_reference(target, "native", model=_model(recorded, "functional"), ops=True)
    assert result.verdict == "mismatch", result.message()
    assert any(r.mode == "op" and r.status == "nonfinite" for r in result.rows), result.message()


# -- the format --------------------------------------------------------------------------------------------------
def _resign(target: Path) -> None:
    """meta.json's size and SHA-256 of each file, after a test edited one."""
    meta = json.loads((target / "meta.json").read_text())
    for name in meta["files"]:
        data = (target / name).read_bytes()
        meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (target / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def test_an_unknown_argument_tag_is_refused_in_one_line(recorded: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "tampered"
    shutil.copytree(recorded["functional"], target)
    index = json.loads((target / "index.json").read_text())
    record = next(r for r in index["ops"]["records"] if r["arguments"])
    record["arguments"][0][1] = {"pickle": "cos\nsystem\n(S'echo hi'\ntR."}
    (target / "index.json").write_text(json.dumps(index, sort_keys=True, separators=(",", ":")) + "\n")
    _resign(target)
    with pytest.raises(FixtureError) as info:
        read_fixture(target)
    message = str(info.value)
    assert "unknown argument tag 'pickle'" in message and "\n" not in message, message
    code = main(["check-reference", str(target), "--ops", "--model", _spec(recorded["models"], "functional")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown argument tag" in err and len(err.splitlines()) == 1, err


def test_without_ops_the_fixture_is_schema_2_and_asking_for_ops_is_one_line(recorded: dict, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    model = _model(recorded, "functional")
    x, y, _ = generate_batch(2, 0, (3, 6, 6), 5)
    path = record_reference(model, x, y, tmp_path / "plain", check_oracle=False)
    meta = json.loads((path / "meta.json").read_text())
    index = json.loads((path / "index.json").read_text())
    assert meta["schema"] == SCHEMA_NO_FUNCTIONS and "ops" not in meta and set(index) == {"schema", "steps"}
    assert check_reference(path, "native", model=model).verdict == "agree"
    relabelled = json.loads((path / "meta.json").read_text())
    (tmp_path / "relabelled").mkdir()
    for f in path.iterdir():
        shutil.copy(f, tmp_path / "relabelled" / f.name)
    (tmp_path / "relabelled" / "meta.json").write_text(json.dumps({**relabelled, "schema": SCHEMA_OPS}))
    with pytest.raises(FixtureError, match="without field ops"):
        read_fixture(tmp_path / "relabelled")
    with pytest.raises(FixtureError, match="recorded without an op capture"):
        check_reference(path, "native", model=model, ops=True)
    code = main(["check-reference", str(path), "--ops", "--model", _spec(recorded["models"], "functional")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "record --ops" in err and len(err.splitlines()) == 1, err


def test_the_cli_records_and_checks_ops(recorded: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = _spec(recorded["models"], "nudged")
    assert main(["record", "--name", "n", "--model", spec, "--input-shape", "3,6,6", "--ops",
                 "--out-dir", str(tmp_path)]) == 0
    assert "ops captured" in capsys.readouterr().out
    assert main(["check-reference", str(tmp_path / "n"), "--model", spec, "--backend", "mkldnn"]) == 0
    assert main(["check-reference", str(tmp_path / "n"), "--model", spec, "--backend", "native", "mkldnn",
                 "--ops", "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "mkldnn wrong at op conv1 · aten.mul" in out, out
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["verdict"] for r in results] == ["agree", "mismatch"]


def test_an_op_capture_over_max_mb_is_refused_in_one_line(recorded: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """The op capture is stored whole (no policy shrinks it): past --max-mb, say so before writing anything."""
    spec = _spec(recorded["models"], "functional")
    code = main(["record", "--name", "big", "--model", spec, "--input-shape", "3,6,6", "--ops", "--max-mb", "0.01",
                 "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "op capture holds" in err and "--max-mb 0.01" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "big").exists()


def test_an_older_toolkit_refuses_schema_4_in_one_line(recorded: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import densenet_debug.reference.meta as meta

    monkeypatch.setattr(meta, "SCHEMA_VERSION", 3)
    with pytest.raises(FixtureError, match="newer than this toolkit reads") as info:
        meta.read_meta(recorded["functional"])
    assert "\n" not in str(info.value)


def test_the_plugin_checks_ops(recorded: dict, tmp_path: Path) -> None:
    from densenet_debug.pytest_plugin import GradReference

    x, y, _ = generate_batch(2, 0, (3, 6, 6), 5)
    model = _model(recorded, "nudged")
    GradReference(tmp_path, "t", update=True, backends=["native"]).check(model, x, y, ops=True)
    results = GradReference(tmp_path, "t", update=False, backends=["native"]).check(model, x, y, ops=True)
    assert results[0].settings["ops"]["matched"] > 0
    with pytest.raises(pytest.fail.Exception, match="conv1 · aten.mul"):
        GradReference(tmp_path, "t", update=False, backends=["mkldnn"]).check(model, x, y, ops=True)
    GradReference(tmp_path, "u", update=True, backends=["native"]).check(model, x, y)
    with pytest.raises(pytest.fail.Exception, match="recorded without an op capture"):
        GradReference(tmp_path, "u", update=False, backends=["native"]).check(model, x, y, ops=True)


# -- the argument encoding ---------------------------------------------------------------------------------------
_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8]
_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=8) | st.sampled_from(_DTYPES)
            | st.sampled_from([torch.device("cpu"), torch.device("cuda:1"), torch.device("meta")])
            | st.sampled_from([torch.strided, torch.sparse_coo])
            | st.sampled_from([torch.contiguous_format, torch.channels_last, torch.preserve_format]))
ARGUMENTS = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner), max_leaves=12)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))  # type: ignore
    return type(a) is type(b) and a == b


@settings(max_examples=200, deadline=None)
@given(ARGUMENTS)
def test_arguments_round_trip_through_json(value: object) -> None:
    text = json.dumps(encode_argument(value), allow_nan=False)
    assert _same(decode_argument(json.loads(text)), value)


@pytest.mark.parametrize("data", [{"pickle": "x"}, {"dtype": "os.system"}, {"float": "1e400x"}, {"tuple": "ab"},
                                  {"device": "cpu; rm"}, {"list": [1], "tuple": [2]}, [1, 2], {"layout": "__class__"}])
def test_anything_else_is_refused_in_one_line(data: object) -> None:
    with pytest.raises(ArgumentError) as info:
        decode_argument(data)
    assert "\n" not in str(info.value)


def test_an_object_with_no_typed_form_is_not_encoded() -> None:
    with pytest.raises(ArgumentError, match="no typed JSON form"):
        encode_argument(object())
