"""``densenet-debug record`` and ``check-reference``: exit codes, JSON, and one-line refusals of bad fixtures."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from densenet_debug.cli import main


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refs")
    assert main(["record", "--name", "bc10", "--model", "densenet-bc-10", "--input-shape", "3,16,16",
                 "--out-dir", str(out)]) == 0
    return out / "bc10"


@pytest.fixture
def copy_of(recorded: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bc10"
    shutil.copytree(recorded, target)
    return target


def _one_line_error(capsys: pytest.CaptureFixture, verb: str = "check-reference") -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"densenet-debug {verb}: error: "), err
    return err


def test_record_writes_a_described_fixture(recorded: Path, capsys: pytest.CaptureFixture) -> None:
    meta = json.loads((recorded / "meta.json").read_text())
    assert meta["schema"] == "densenet-debug/reference/2"
    assert meta["model"]["spec"] == "densenet-bc-10" and meta["model"]["config"]["growth_rate"] == 4
    assert meta["data"]["batch"] == 2 and meta["data"]["generation"]["seed"] == 0
    assert "torch.randn(2, 3, 16, 16" in meta["data"]["generation"]["inputs"]
    assert meta["step"] == {"steps": 1, "bn_mode": "train", "loss": meta["step"]["loss"],
                            "between_steps": meta["step"]["between_steps"]}
    assert meta["truth"]["computed_by"].startswith("PyTorch float64 on the CPU")
    assert meta["truth"]["cross_check"]["status"] == "agree"  # the independent NumPy oracle agrees
    assert meta["provenance"]["torch"] == torch.__version__ and meta["provenance"]["git_commit"]
    assert set(meta["files"]) == {"inputs.npz", "state.npz", "trace.npz", "index.json"}
    for name, info in meta["files"].items():
        assert hashlib.sha256((recorded / name).read_bytes()).hexdigest() == info["sha256"]
    assert not [p for p in recorded.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_record_is_reproducible_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    for out in ("a", "b"):
        assert main(["record", "--name", "x", "--model", "densenet-bc-10", "--input-shape", "3,8,8", "--seed", "3",
                     "--out-dir", str(tmp_path / out)]) == 0
    files = sorted(p.name for p in (tmp_path / "a" / "x").iterdir())
    assert files == ["index.json", "inputs.npz", "meta.json", "state.npz", "trace.npz"]
    for name in files:
        assert (tmp_path / "a" / "x" / name).read_bytes() == (tmp_path / "b" / "x" / name).read_bytes(), name


def test_record_refuses_a_truth_the_numpy_oracle_contradicts(tmp_path: Path) -> None:
    from densenet_debug import build_model
    from densenet_debug.backends import parse_backend
    from densenet_debug.reference.record import OracleDisagreement, generate_batch, record_reference

    torch.manual_seed(0)
    # a wrong BN backward planted in the float64 model itself: PyTorch's "truth" would be wrong
    planted = parse_backend("fp64+fault:bn_invstd_as_var@block1.layer01.norm1")
    model = planted.prepare_model(build_model("densenet-bc-10"))
    x, y, _ = generate_batch(2, 0, (3, 8, 8), 10)
    with pytest.raises(OracleDisagreement, match="block1.layer01.norm1"):
        record_reference(model, x, y, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_record_refuses_to_overwrite_and_bad_names(recorded: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["record", "--name", "bc10", "--model", "densenet-bc-10", "--out-dir", str(recorded.parent)]) == 2
    assert "exists; pass --force" in _one_line_error(capsys, "record")
    assert main(["record", "--name", "../x", "--model", "densenet-bc-10", "--out-dir", str(recorded.parent)]) == 2
    assert "bad fixture name" in _one_line_error(capsys, "record")


def test_check_reference_agrees_and_writes_json(recorded: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    assert main(["check-reference", str(recorded), "--backend", "native", "--json", str(out)]) == 0
    assert "agree: native matches reference bc10" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["schema"] == "densenet-debug/check-reference/1" and data["verdict"] == "agree"
    assert data["first_divergence"] is None
    layers = {r["layer"] for r in data["rows"]}
    index = json.loads((recorded / "index.json").read_text())
    assert layers == set(index["steps"][0]["units"])  # every unit judged
    assert {r["mode"] for r in data["rows"]} == {"local", "propagated", "between"}


def test_check_reference_fails_at_a_planted_fault(recorded: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["check-reference", str(recorded), "--backend",
                 "native+fault:strided_read_as_contiguous@block1.layer01.conv2"])
    assert code == 1
    assert "mismatch: native+fault:" in capsys.readouterr().out
    # and the default (PyTorch's own configuration) still agrees
    assert main(["check-reference", str(recorded)]) == 0


# -- bad inputs: exit 2, one line naming the file and the cause -----------------------------------------------
def test_truncated_file(copy_of: Path, capsys: pytest.CaptureFixture) -> None:
    data = (copy_of / "state.npz").read_bytes()
    (copy_of / "state.npz").write_bytes(data[:100])
    assert main(["check-reference", str(copy_of)]) == 2
    assert f"{copy_of / 'state.npz'}: truncated" in _one_line_error(capsys)


def test_flipped_byte(copy_of: Path, capsys: pytest.CaptureFixture) -> None:
    data = bytearray((copy_of / "trace.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy_of / "trace.npz").write_bytes(bytes(data))
    assert main(["check-reference", str(copy_of)]) == 2
    assert f"{copy_of / 'trace.npz'}: SHA-256 mismatch" in _one_line_error(capsys)


def test_missing_meta(copy_of: Path, capsys: pytest.CaptureFixture) -> None:
    (copy_of / "meta.json").unlink()
    assert main(["check-reference", str(copy_of)]) == 2
    assert f"{copy_of / 'meta.json'}: missing" in _one_line_error(capsys)


def test_schema_from_the_future(copy_of: Path, capsys: pytest.CaptureFixture) -> None:
    meta = json.loads((copy_of / "meta.json").read_text())
    meta["schema"] = "densenet-debug/reference/9"
    (copy_of / "meta.json").write_text(json.dumps(meta))
    assert main(["check-reference", str(copy_of)]) == 2
    assert "schema densenet-debug/reference/9 is newer than this toolkit reads" in _one_line_error(capsys)


def test_fixture_of_another_model_than_asked(recorded: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check-reference", str(recorded), "--model", "densenet-bc-16"]) == 2
    err = _one_line_error(capsys)
    assert "meta.json: a fixture of model densenet-bc-10" in err and "not of densenet-bc-16" in err


def test_fixture_of_another_config(copy_of: Path, capsys: pytest.CaptureFixture) -> None:
    meta = json.loads((copy_of / "meta.json").read_text())
    meta["model"]["config"]["growth_rate"] = 12
    (copy_of / "meta.json").write_text(json.dumps(meta))
    assert main(["check-reference", str(copy_of)]) == 2
    assert "meta.json: a fixture of another configuration" in _one_line_error(capsys)


def test_object_array(copy_of: Path, capsys: pytest.CaptureFixture) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        member = io.BytesIO()
        np.lib.format.write_array(member, np.array([object()], dtype=object), allow_pickle=True)
        zf.writestr("inputs.npy", member.getvalue())
        zf.writestr("targets.npy", member.getvalue())
    data = buffer.getvalue()
    (copy_of / "inputs.npz").write_bytes(data)
    meta = json.loads((copy_of / "meta.json").read_text())
    meta["files"]["inputs.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (copy_of / "meta.json").write_text(json.dumps(meta))
    assert main(["check-reference", str(copy_of)]) == 2
    assert "inputs.npz: holds an object (pickled) array; refused" in _one_line_error(capsys)


@pytest.mark.parametrize("args, cause", [
    (["--backend", "warp-drive"], "unknown backend 'warp-drive'"),
    (["--backend", "cudnn"], "CUDA"),
    (["--backend", "native+fault:stale_grad_accumulate@block1.layer01.conv1"], "recorded with 1 step(s)"),
])
def test_unusable_backend(recorded: Path, capsys: pytest.CaptureFixture, args: list[str], cause: str) -> None:
    if "cudnn" in args and torch.cuda.is_available():
        pytest.skip("CUDA is present: cudnn is a valid backend here")
    assert main(["check-reference", str(recorded), *args]) == 2
    assert cause in _one_line_error(capsys)


def test_not_a_fixture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check-reference", str(tmp_path / "nothing")]) == 2
    assert "no such fixture directory" in _one_line_error(capsys)


def test_python_recorded_builder_model_is_checkable_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from densenet_debug import DenseNet, build_model
    from densenet_debug.reference.record import builder_of, generate_batch, record_reference

    torch.manual_seed(0)
    model = build_model("densenet-bc-10")
    assert builder_of(model) == "densenet-bc-10"
    assert builder_of(DenseNet(depth=10, growth_rate=3, bn_size=2)) is None  # no builder makes that config
    x, y, _ = generate_batch(2, 0, (3, 8, 8), 10)
    path = record_reference(model, x, y, tmp_path / "py", check_oracle=False)
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["model"]["spec"], meta["model"]["spec_from"]) == ("densenet-bc-10", "config")
    assert main(["check-reference", str(path), "--backend", "native"]) == 0
