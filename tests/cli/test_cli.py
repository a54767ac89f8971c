"""The CLI shell: user-model loading, one-line errors with exit 2, ``info``, both entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from densenet_debug.cli import main

USER_MODEL = """
import torch
from torch import nn

def factory(num_classes=7):
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))

def not_a_module(num_classes=7):
    return 42

def raises():
    raise RuntimeError("boom")

answer = 42
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    return path


def test_info_default_model_shows_bc100_parameter_count(capsys) -> None:
    assert main(["info", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "769,162" in out and "block2" in out


def test_info_on_a_user_model_file(user_file: Path, capsys) -> None:
    assert main(["info", "--model", f"{user_file}:factory", "--input-shape", "1,8,8"]) == 0
    out = capsys.readouterr().out
    assert "75" in out  # 1*4*9+4 + 4*7+7 = 40 + 35 parameters


def test_info_on_a_package_module_factory(user_file: Path, capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert main(["info", "--model", "user_model:factory", "--input-shape", "1,8,8", "--num-classes", "3"]) == 0
    assert "55" in capsys.readouterr().out  # 40 + 4*3+3


@pytest.mark.parametrize("spec, message", [
    ("densenet-bc-99", "known models: densenet-bc-100"),
    ("missing.py:factory", "model file not found"),
    ("{file}:nope", "has no attribute 'nope'"),
    ("{file}:answer", "is not callable"),
    ("{file}:not_a_module", "not a torch.nn.Module"),
    ("{file}:raises", "RuntimeError: boom"),
    ("{file}:factory", "does not accept inputs of shape 3,32,32"),
    ("no_such_pkg_xyz:factory", "cannot import module"),
    ("{file}:1bad", "not a factory name"),
])
def test_bad_model_specs_exit_2_with_one_line(spec: str, message: str, user_file: Path, capsys) -> None:
    assert main(["info", "--model", spec.format(file=user_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_broken_user_file_is_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n")
    assert main(["info", "--model", f"{bad}:f"]) == 2
    err = capsys.readouterr().err
    assert "SyntaxError" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["info", "--batch", "0"], ["info", "--input-shape", "3,x"], ["nope"],
                                  ["info", "--no-such-flag"]])
def test_bad_flags_exit_2_with_one_line(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("cmd", [["densenet-debug"], [sys.executable, "-m", "densenet_debug"]])
def test_entry_points_run_as_real_processes(cmd: list[str]) -> None:
    if cmd[0] == "densenet-debug":
        cmd = [str(Path(sys.executable).with_name("densenet-debug"))]
    env = {**os.environ, "COLUMNS": "120"}
    ok = subprocess.run(cmd + ["info", "--model", "densenet-bc-10", "--batch", "2"], capture_output=True,
                        text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "1,602" in ok.stdout
    bad = subprocess.run(cmd + ["info", "--model", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
