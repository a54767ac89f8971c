"""The convergence canary: clean converges, #708 planted does not, diff names the layer."""

from __future__ import annotations

import json

import pytest
import torch

from densenet_debug.cli import main
from densenet_debug.faults.canary import CANARY_FAULT, load_digits_32, run_canary
from densenet_debug.faults.registry import make_fault
from densenet_debug.models import build_model

pytest.importorskip("sklearn", reason="the canary's data ships with scikit-learn (the [canary] extra)")


def test_digits_are_real_resized_and_split_by_seed():
    x_train, y_train, x_test, y_test = load_digits_32(seed=0)
    assert x_train.shape[1:] == (1, 32, 32) and len(x_train) + len(x_test) == 1797
    assert set(y_train.tolist()) == set(range(10)) and set(y_test.tolist()) == set(range(10))
    both = torch.cat([x_train, x_test])
    assert abs(float(both.mean())) < 1e-5 and abs(float(both.std()) - 1) < 1e-4
    again = load_digits_32(seed=0)
    other = load_digits_32(seed=1)
    assert torch.equal(again[1], y_train) and not torch.equal(other[1], y_train)


def test_canary_fault_plants_at_every_cat_slice_conv():
    model = build_model("densenet-bc-16", in_channels=1)
    assert make_fault(CANARY_FAULT).choose(model) == [f"block{b}.layer02.conv2" for b in (1, 2, 3)]


@pytest.mark.parametrize("argv", [["--target", "1.5"], ["--batch", "1"], ["--epochs", "0"], ["--model", "x"],
                                  ["--out", "."], ["--lr", "-1"]])
def test_cli_canary_bad_input_is_one_line_and_exit_two(argv, capsys):
    try:
        code = main(["canary", *argv])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("densenet-debug canary: error:") and "\n" not in err


@pytest.mark.slow
def test_canary_reproduces_non_convergence_and_localizes(tmp_path):
    """A reduced budget (8 epochs, about 40 s on one core): the contrast must already be unmistakable."""
    report = run_canary(epochs=8, target=0.85, seed=0)
    assert report.clean.final_accuracy >= 0.85
    assert report.faulty.final_accuracy < 0.6  # no error, no NaN: it just does not learn
    assert all(l == l for l in report.faulty.losses)
    loc = report.localization
    assert loc["verdict"] == "mismatch" and loc["localized"]
    assert loc["first_divergence"]["layer"] in loc["planted_units"]
    assert report.passed
    png = tmp_path / "canary.png"
    from densenet_debug.faults.canary import save_figure

    save_figure(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = report.to_json()
    assert data["schema"] == "densenet-debug/canary/1" and json.loads(json.dumps(data))["passed"] is True
