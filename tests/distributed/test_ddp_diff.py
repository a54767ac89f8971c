"""``diff --a ddp``: DDP on real gloo processes against one process, with the derived all-reduce bound."""

from __future__ import annotations

import json

import pytest
import torch

from densenet_debug import build_model
from densenet_debug.cli import main
from densenet_debug.distributed.diff import ddp_diff, parse_ddp_side
from densenet_debug.errors import UsageError


def test_ddp_equals_one_process_and_in_eval_mode_the_full_batch(tmp_path, capsys):
    out = tmp_path / "ddp.json"
    code = main(["diff", "--a", "ddp", "--b", "mkldnn", "--model", "densenet-bc-10", "--input-shape", "3,8,8",
                 "--batch", "8", "--eval", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "densenet-debug/diff/3" and report["verdict"] == "agree"
    assert report["first_divergence"] is None and report["environment"]["a"] == "ddp:2"
    names = {n.rpartition(".")[0] for n, _ in build_model("densenet-bc-10").named_parameters()}
    assert {r["layer"] for r in report["rows"]} == names
    assert all(r["status"] == "ok" and r["error_a"] <= r["tolerance"] for r in report["rows"])
    # Two processes: scaling by 1/2 is exact and a sum of two is commutative, so DDP is bit-identical.
    assert all(r["error_a"] == 0 for r in report["rows"])
    # Eval mode: BN uses running statistics, so DDP's gradient is the full batch's (fp32 summation order only).
    assert max(r["full_batch_gap"] for r in report["rows"]) < 1e-5
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("agree: ddp:2 equals mkldnn")


def test_train_mode_semantics_and_a_lossy_communication_hook():
    torch.manual_seed(0)
    model = build_model("densenet-bc-10")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    report = ddp_diff(model, x, y, "mkldnn", world_size=2, comm_hook="fp16_compress")
    assert report.verdict == "mismatch"
    bad = [r for r in report.rows if r.status == "mismatch"]
    assert bad and all(r.error > 10 * r.tolerance for r in bad)  # far outside the exact all-reduce bound
    # ...and nothing but fp16 rounding (11 significant bits, two roundings): in training mode DDP is the mean of
    # the shards' gradients (per-process BN), as the one-process reference computes it.
    assert all(r.error <= 2 * 2.0**-11 for r in report.rows)
    # That mean is not the full batch's gradient: reported as BN semantics, never as the mismatch.
    assert max(r.full_batch_gap for r in report.rows) > 1e-2 and "BN semantics, not a fault" in report.summary()
    assert report.summary().startswith("mismatch: ddp:2+fp16_compress differs from mkldnn")


def test_side_parsing():
    assert parse_ddp_side("ddp") == (2, None) and parse_ddp_side("ddp:4+fp16_compress") == (4, "fp16_compress")
    assert parse_ddp_side("mkldnn") is None and parse_ddp_side(None) is None
    for bad in ("ddp:1", "ddp:x", "ddp+nope"):
        with pytest.raises(UsageError):
            parse_ddp_side(bad)


@pytest.mark.parametrize("argv, fragment", [
    (["--a", "ddp", "--b", "ddp"], "give ddp[:N] as one side"),
    (["--a", "ddp", "--steps", "2"], "--steps not supported"),
    (["--a", "ddp:3", "--batch", "8", "--model", "densenet-bc-10"], "does not split evenly over 3"),
])
def test_bad_ddp_diffs_are_one_line_errors(capsys, argv, fragment):
    assert main(["diff", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
