"""A fixture is data: it never runs code, every field is validated, and user fixtures round-trip from anywhere.

The audit's reproduction, end to end: a copied fixture whose meta.json names a ``payload.py`` (checksums of
every other file intact, meta.json edited as an attacker would) must not import it; a payload that ran
would leave a marker file. Then every reader refusal with real damaged files (one line naming the file and
the field, exit 2), and the round trip of a user's ``file.py:factory`` from another directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_debug.cli import main
from densenet_debug.reference.format import load_npz, npz_bytes
from densenet_debug.reference.meta import FILE_NAMES, stored_model_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refs")
    assert main(["record", "--name", "bc10", "--model", "densenet-bc-10", "--input-shape", "3,8,8",
                 "--out-dir", str(out)]) == 0
    return out / "bc10"


@pytest.fixture
def copy_of(recorded: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bc10"
    shutil.copytree(recorded, target)
    return target


def _meta(root: Path) -> dict:
    return json.loads((root / "meta.json").read_text())


def _resign(root: Path, meta: dict | None = None) -> None:
    """What an attacker (or a careless hand) does after an edit: make every checksum match again."""
    meta = _meta(root) if meta is None else meta
    for name in FILE_NAMES:
        if (root / name).is_file() and isinstance(meta["files"].get(name), dict):
            data = (root / name).read_bytes()
            meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (root / "meta.json").write_text(json.dumps(meta))


def _one_line_error(capsys: pytest.CaptureFixture, verb: str = "check-reference") -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith(f"densenet-debug {verb}: error: "), err
    assert "Traceback" not in captured.out + captured.err
    return err


# -- fixtures never run code ------------------------------------------------------------------------------------
PAYLOAD = '''
from pathlib import Path
Path({marker!r}).write_text("the payload ran")


def run(**kwargs):
    Path({marker!r}).write_text("the payload's factory ran")
    raise SystemExit(0)
'''


@pytest.mark.parametrize("kind, spec, cause", [
    ("file", "payload.py:run", "a fixture of a user's model (payload.py:run, class DenseNet); a fixture never runs "
                               "code: pass --model path/to/payload.py:run"),
    ("module", "payload:run", "pass --model payload:run"),
    ("builder", "payload.py:run", "field model.spec must be a builder name"),
    ("file", "{dir}/payload.py:run", "field model.spec must be FILE.py:FACTORY (a file name, no directory)"),
    ("file", "../payload.py:run", "field model.spec must be FILE.py:FACTORY"),
    ("python", "payload.py:run", "field model.spec must be null"),
])
def test_a_fixture_pointing_at_a_payload_never_runs_it(copy_of: Path, tmp_path: Path, kind: str, spec: str,
                                                      cause: str) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    (copy_of / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    meta = _meta(copy_of)
    meta["model"].update(kind=kind, spec=spec.format(dir=copy_of))
    (copy_of / "meta.json").write_text(json.dumps(meta))  # the data files' checksums still match
    env = {**os.environ, "PYTHONPATH": str(copy_of), "OMP_NUM_THREADS": "1"}
    # run from inside the fixture, with it on the import path: the payload is one import away
    proc = subprocess.run([sys.executable, "-m", "densenet_debug", "check-reference", ".", "--backend", "native"],
                          cwd=copy_of, env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the fixture ran its payload"
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("densenet-debug check-reference: error: meta.json: ") and cause in proc.stderr


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The payload above does run when something imports it: the tests above can fail."""
    marker = tmp_path / "PAYLOAD_RAN"
    (tmp_path / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    code = "from densenet_debug.models import resolve_model; resolve_model('payload.py:run')"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, timeout=300)
    assert marker.read_text() == "the payload's factory ran"


def test_with_the_users_own_model_the_payload_is_still_never_imported(copy_of: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    (copy_of / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    meta = _meta(copy_of)
    meta["model"].update(kind="file", spec="payload.py:run")
    (copy_of / "meta.json").write_text(json.dumps(meta))
    env = {**os.environ, "PYTHONPATH": str(copy_of), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "densenet_debug", "check-reference", ".", "--backend", "native",
                           "--model", "densenet-bc-10"], cwd=copy_of, env=env, capture_output=True, text=True,
                          timeout=300)
    assert not marker.exists()
    assert proc.returncode == 0 and "agree: native matches reference bc10" in proc.stdout, proc.stderr


def test_stored_specs_name_no_directory() -> None:
    assert stored_model_spec("densenet-bc-16") == ("builder", "densenet-bc-16")
    assert stored_model_spec("/home/me/proj/models/m.py:good") == ("file", "m.py:good")
    assert stored_model_spec("../m.py:good") == ("file", "m.py:good")
    assert stored_model_spec("mypkg.models:build") == ("module", "mypkg.models:build")


# -- readers validate what they read: one line naming the file and the field, exit 2 --------------------------
def _add_member(root: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(root / "inputs.npz") as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("readme.txt", b"not an array")
    (root / "inputs.npz").write_bytes(buffer.getvalue())
    _resign(root)


def _replace_trace_array(root: Path, pick: Callable[[dict], str], change: Callable[[np.ndarray], np.ndarray]) -> str:
    index = json.loads((root / "index.json").read_text())
    key = pick(index["steps"][0])
    arrays = load_npz(root / "trace.npz")
    arrays[key] = change(arrays[key])
    (root / "trace.npz").write_bytes(npz_bytes(arrays))
    _resign(root)
    return key


def _reshape_param_grad(root: Path) -> str:
    return _replace_trace_array(root, lambda s: s["units"]["stem"]["tensors"]["param_grads"]["weight"],
                         lambda a: a.reshape(-1))


def _reshape_activation(root: Path) -> str:
    return _replace_trace_array(root, lambda s: s["units"]["block1.layer01.conv1"]["tensors"]["inputs"][0],
                         lambda a: a.reshape(a.shape[0], -1))


def _reshape_logits(root: Path) -> str:
    return _replace_trace_array(root, lambda s: s["output"], lambda a: a[:, :3])


def _text_array(root: Path) -> None:
    _replace_trace_array(root, lambda s: s["loss"], lambda a: np.array(["abc"]))


def _meta_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        meta = _meta(root)
        edit(meta)
        (root / "meta.json").write_text(json.dumps(meta))
    return apply


def _labels_out_of_range(root: Path) -> None:
    arrays = load_npz(root / "inputs.npz")
    arrays["targets"] = np.array([0, 99], dtype=np.int64)
    (root / "inputs.npz").write_bytes(npz_bytes(arrays))
    _resign(root)


def _retype(file: str, key: str, dtype: type) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        arrays = load_npz(root / file)
        arrays[key] = arrays[key].astype(dtype)
        (root / file).write_bytes(npz_bytes(arrays))
        _resign(root)
    return apply


def _broken_deflate(root: Path) -> None:
    data = bytearray((root / "trace.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a compressed member: a zlib or CRC error, not a header one
    (root / "trace.npz").write_bytes(bytes(data))
    _resign(root)


def _index_steps(root: Path) -> None:
    index = json.loads((root / "index.json").read_text())
    index["steps"] = index["steps"] * 2
    (root / "index.json").write_text(json.dumps(index))
    _resign(root)


def _index_layout(root: Path) -> None:
    index = json.loads((root / "index.json").read_text())
    index["steps"][0]["units"]["stem"]["input_layouts"] = [["a", "b"]]
    (root / "index.json").write_text(json.dumps(index))
    _resign(root)


BAD_FILES = {
    "npz member not .npy": (_add_member, "inputs.npz: member 'readme.txt' is not a .npy array"),
    "files entry not an object": (_meta_edit(lambda m: m["files"].update({"trace.npz": "0" * 64})),
                                  "meta.json: field files['trace.npz'] must be an object with bytes"),
    "files entry lacks sha256": (_meta_edit(lambda m: m["files"]["state.npz"].pop("sha256")),
                                 "meta.json: field files['state.npz'] must be an object"),
    "files names a path": (_meta_edit(lambda m: m["files"].update({"../../etc/passwd": {}})),
                           "meta.json: field files must list exactly index.json, inputs.npz, state.npz, trace.npz; "
                           "it names '../../etc/passwd'"),
    "param grad reshaped": (_reshape_param_grad, "trace.npz: array t{} (param_grads weight of unit stem, step 0) has "
                                                 "shape (216,), index.json records (8, 3, 3, 3)"),
    # the first unit that holds the array names it (here the ReLU whose output conv1 reads)
    "activation reshaped": (_reshape_activation, "trace.npz: array t{} (output 0 of unit block1.layer01.relu1, step "
                                                 "0) has shape (2, 512), index.json records (2, 8, 8, 8)"),
    "logits reshaped": (_reshape_logits, "trace.npz: array t{} (output 0 of unit head.fc, step 0) has shape (2, 3), "
                                         "index.json records (2, 10)"),
    "text array": (_text_array, "trace.npz: array 't"),
    "integer inputs": (_retype("inputs.npz", "inputs", np.int64),
                       "inputs.npz: array inputs has dtype int64, meta.json records float32"),
    "float64 weights": (_retype("state.npz", "stem.weight", np.float64),
                        "state.npz: array 'stem.weight' has dtype torch.float64, the model's is torch.float32"),
    "broken deflate stream": (_broken_deflate, "trace.npz: not a readable npz file"),
    "labels out of range": (_labels_out_of_range, "inputs.npz: array targets holds labels outside [0, 10)"),
    "index steps vs meta": (_index_steps, "index.json: field steps must list 1 step(s)"),
    "index layout ill-typed": (_index_layout, "index.json: malformed index"),
    "missing field": (_meta_edit(lambda m: m["step"].pop("bn_mode")), "meta.json: field step.bn_mode is missing"),
    "missing section": (_meta_edit(lambda m: m.pop("data")), "meta.json: field data is missing"),
    "ill-typed batch": (_meta_edit(lambda m: m["data"].update(batch="2")),
                        "meta.json: field data.batch must be a positive integer, got '2'"),
    "boolean steps": (_meta_edit(lambda m: m["step"].update(steps=True)),
                      "meta.json: field step.steps must be a positive integer, got true"),
    "policy": (_meta_edit(lambda m: m["storage"].update(policy="everything")),
               "meta.json: field storage.policy must be full or checkpoints"),
    "model kind": (_meta_edit(lambda m: m["model"].update(kind="pickle")),
                   "meta.json: field model.kind must be one of"),
    "factory kwargs": (_meta_edit(lambda m: m["model"].update(factory_kwargs={"num_classes": 10, "cmd": "rm"})),
                       "meta.json: field model.factory_kwargs must be null or an object with at most num_classes"),
    "structure hash": (_meta_edit(lambda m: m["model"].update(structure_sha256=None)),
                       "meta.json: field model.structure_sha256 must be a SHA-256"),
    "state dtype names a torch attribute": (_meta_edit(lambda m: m.update(state_dtypes={"stem.weight": "load"})),
                                            "meta.json: field state_dtypes must be an object mapping state names to "
                                            "bfloat16"),
    "meta is a list": (lambda root: (root / "meta.json").write_text("[]"), "meta.json: not a JSON object"),
}


@pytest.mark.parametrize("damage", list(BAD_FILES))
def test_damaged_fixture_is_refused_in_one_line_naming_file_and_field(copy_of: Path, capsys: pytest.CaptureFixture,
                                                                      damage: str) -> None:
    apply, expected = BAD_FILES[damage]
    key = apply(copy_of)
    assert main(["check-reference", str(copy_of), "--backend", "native"]) == 2
    err = _one_line_error(capsys)
    assert f"{copy_of}/{expected.replace('t{}', str(key))}" in err, err


def test_the_pristine_copy_agrees(copy_of: Path, capsys: pytest.CaptureFixture) -> None:
    """The damage above is the only difference: the same copy, resigned but untouched, is accepted."""
    _resign(copy_of)
    assert main(["check-reference", str(copy_of), "--backend", "native"]) == 0


# -- user fixtures round-trip ----------------------------------------------------------------------------------
USER_MODELS = textwrap.dedent('''
    import torch.nn.functional as F
    from torch import nn


    class Net(nn.Module):
        def __init__(self, classes=3, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            return F.log_softmax(self.fc(F.relu(self.conv(x)).mean((2, 3))), dim=1)


    def good():  # takes no num_classes
        return Net()


    def wide(num_classes):  # needs it
        return Net(classes=num_classes)


    def other():
        return Net(width=5)
''')


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "m.py").write_text(USER_MODELS)
    monkeypatch.chdir(project)
    return project


def test_a_factory_without_num_classes_round_trips_from_another_directory(
        user_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert main(["record", "--name", "u", "--model", "m.py:good", "--input-shape", "3,8,8"]) == 0
    assert "check it with --model m.py:good" in capsys.readouterr().out
    fixture = user_dir / "reference_grads" / "u"
    model = _meta(fixture)["model"]
    assert (model["kind"], model["spec"], model["factory_kwargs"], model["class"]) == ("file", "m.py:good", {}, "m.Net")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["check-reference", str(fixture), "--backend", "native", "--model", str(user_dir / "m.py:good")]) == 0
    assert "agree: native matches reference u" in capsys.readouterr().out
    # without --model: one line that says what to pass; with another model: refused by its structure
    assert main(["check-reference", str(fixture)]) == 2
    assert "pass --model path/to/m.py:good" in _one_line_error(capsys)
    assert main(["check-reference", str(fixture), "--model", str(user_dir / "m.py:other")]) == 2
    err = _one_line_error(capsys)
    assert "a fixture of another model: the structure of" in err and "m.py:other (Net" in err


def test_a_factory_called_with_num_classes_is_called_so_again(user_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["record", "--name", "w", "--model", "m.py:wide", "--num-classes", "5", "--input-shape", "3,8,8"]) == 0
    fixture = user_dir / "reference_grads" / "w"
    assert _meta(fixture)["model"]["factory_kwargs"] == {"num_classes": 5}
    assert main(["check-reference", str(fixture), "--backend", "native", "--model", "./m.py:wide"]) == 0
    # a model of another structure is refused, whatever its name
    assert main(["check-reference", str(fixture), "--model", "densenet-bc-10"]) == 2
    assert "a fixture of another model" in _one_line_error(capsys)


def test_a_module_factory_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    package = tmp_path / "site" / "userpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path)
    assert main(["record", "--name", "mod", "--model", "userpkg.nets:good", "--input-shape", "3,8,8"]) == 0
    fixture = tmp_path / "reference_grads" / "mod"
    model = _meta(fixture)["model"]
    assert (model["kind"], model["spec"], model["factory_kwargs"]) == ("module", "userpkg.nets:good", {})
    assert main(["check-reference", str(fixture)]) == 2
    assert "pass --model userpkg.nets:good" in _one_line_error(capsys)
    assert main(["check-reference", str(fixture), "--backend", "native", "--model", "userpkg.nets:good"]) == 0


# -- the structure hash: the same structure whatever the weights, another one for any change -------------------
@settings(max_examples=12, deadline=None)
@given(width=st.integers(1, 6), classes=st.integers(2, 5), seed=st.integers(0, 2**16),
       change=st.sampled_from(["width", "classes", "dtype", "buffer", "type", "name"]))
def test_structure_hash_ignores_weights_and_sees_every_structural_change(width: int, classes: int, seed: int,
                                                                         change: str) -> None:
    import torch
    from torch import nn

    from densenet_debug.reference.record import model_identity

    def net(w: int, c: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, w, 3), nn.BatchNorm2d(w), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(w, c))

    torch.manual_seed(seed)
    a, b = net(width, classes), net(width, classes)
    assert model_identity(a)["structure_sha256"] == model_identity(b)["structure_sha256"]
    if change == "width":
        b = net(width + 1, classes)
    elif change == "classes":
        b = net(width, classes + 1)
    elif change == "dtype":
        b = b.double()
    elif change == "buffer":
        b.register_buffer("extra", torch.zeros(1))
    elif change == "type":
        b[2] = nn.GELU()  # same parameters, another op
    else:
        b = nn.Sequential(*[m for m in b])  # same modules...
        b.add_module("renamed", b._modules.pop("5"))  # ...one under another name
    assert model_identity(a)["structure_sha256"] != model_identity(b)["structure_sha256"]
