"""``densenet-debug gradcheck``: exit codes, JSON contract, unit listing, user models, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densenet_debug.cli import main

FAULTY_USER_MODEL = """
import torch
from torch import nn


class Wrong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        g = g * 2
        g[:, 0] *= 1.001  # 0.1 % off on one channel
        return g


class Net(nn.Module):
    def __init__(self, num_classes=10, wrong=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)
        self.wrong = wrong

    def forward(self, x):
        h = self.conv(x)
        h = Wrong.apply(h) if self.wrong else h * 2
        return self.fc(torch.relu(h).mean((2, 3)))


def faulty(num_classes=10):
    return Net(num_classes)


def correct(num_classes=10):
    return Net(num_classes, wrong=False)
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_net.py"
    path.write_text(FAULTY_USER_MODEL)
    return path


def test_pass_exits_0_and_writes_the_json_contract(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "report.json"
    code = main(["gradcheck", "--model", "densenet-bc-10", "--input-shape", "3,8,8", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "densenet-debug/gradcheck/1" and data["verdict"] == "pass"
    assert data["first_failure"] is None and len(data["rows"]) >= 50
    assert all({"layer", "tensor", "error", "tolerance", "status"} <= set(r) for r in data["rows"])
    assert "pass" in capsys.readouterr().out


def test_planted_fault_in_user_model_exits_1_and_names_the_culprit(user_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    code = main(["gradcheck", "--model", f"{user_file}:faulty", "--input-shape", "3,6,6", "--json", str(out)])
    assert code == 1
    data = json.loads(out.read_text())
    # the culprit is the custom Function the model's own forward calls; the model's row fails too
    assert data["verdict"] == "fail" and data["first_failure"]["layer"] == "Wrong"
    assert any(r["layer"] == "" and r["status"] == "fail" and not r["culprit"] for r in data["rows"])
    assert "FAIL" in capsys.readouterr().out
    assert main(["gradcheck", "--model", f"{user_file}:correct", "--input-shape", "3,6,6"]) == 0


def test_list_and_layer_selection(tmp_path: Path, capsys) -> None:
    assert main(["gradcheck", "--model", "densenet-bc-10", "--input-shape", "3,8,8", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "block1.layer01.cat" in names and "head.fc" in names and len(names) == len(set(names))
    out = tmp_path / "r.json"
    assert main(["gradcheck", "--model", "densenet-bc-10", "--input-shape", "3,4,4", "--layer", "trans1",
                 "--layer", "head.fc", "--mode", "full", "--all-rows", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["layer"] for r in rows} == {"trans1.norm", "trans1.relu", "trans1.conv", "trans1.pool", "head.fc"}
    assert {r["mode"] for r in rows} == {"full"}  # small enough for whole Jacobians
    assert "pass: 5 units" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--layer", "block7"], "unknown --layer 'block7'"),
    (["--mode", "slow"], "invalid choice"),
    (["--batch", "0"], "positive integer"),
    (["--model", "nope.py:f"], "model file not found"),
    (["--input-shape", "3,x"], "comma-separated"),
    (["--json", "/proc/forbidden/r.json"], "error"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys) -> None:
    try:  # argparse errors exit(2) from inside the parser; ours return 2
        code = main(["gradcheck", "--model", "densenet-bc-10", "--input-shape", "3,8,8", "--layer", "head.fc", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
