"""``densenet-debug oracle``: agreement exits 0 with the JSON contract; an op without a NumPy rule exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densenet_debug.cli import main


def test_agree_exits_0_with_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "oracle.json"
    assert main(["oracle", "--model", "densenet-bc-10", "--input-shape", "3,16,16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "densenet-debug/oracle/1" and data["verdict"] == "agree"
    assert data["first_divergence"] is None
    assert {"layer", "pass", "quantity", "error", "tolerance", "status"} <= set(data["rows"][0])
    assert {r["pass"] for r in data["rows"]} == {"forward", "backward"}
    assert "agree" in capsys.readouterr().out


def test_eval_mode_agrees(capsys) -> None:
    assert main(["oracle", "--model", "densenet-bc-10", "--input-shape", "3,8,8", "--eval", "--batch", "1"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "{file}:factory"], "no NumPy rule for aten.gelu.default (at 1"),  # any model runs, op by op
    (["--batch", "-1"], "positive integer"),
    (["--model", "densenet-bc-7"], "unknown model"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    user = tmp_path / "m.py"
    user.write_text("from torch import nn\n\ndef factory(num_classes=10):\n"
                    "    return nn.Sequential(nn.Flatten(), nn.GELU(), nn.Linear(3 * 8 * 8, num_classes))\n")
    argv = [a.replace("{file}", str(user)) for a in argv]
    try:  # argparse errors exit(2) from inside the parser; ours return 2
        code = main(["oracle", "--input-shape", "3,8,8", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
