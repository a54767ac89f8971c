"""``densenet-debug diff`` and ``sweep``: exit codes, one-line errors, the JSON contract, the HTML page, bisect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densenet_debug.cli import main

SMALL = ["--model", "densenet-bc-10", "--batch", "2", "--input-shape", "3,16,16"]


def run(argv: list[str]) -> int:
    """main(), with argparse's own exit (bad flags) turned into its return code."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize("argv, needle", [
    (["diff", "--a", "bogus"], "unknown backend 'bogus'; valid:"),
    (["diff", "--a", "mkldnn+native"], "conflicts"),
    (["diff", "--steps", "0"], "positive integer"),
    (["diff", "--fail-on", "sometimes"], "invalid choice"),
    (["diff", "--model", "no-such-model"], "unknown model"),
    (["diff", "--batch", "-1"], "positive integer"),
    (["diff", "--device", "tpu"], "device"),
    (["diff", *SMALL, "--units", "block9.nothing"], "no module named"),
    (["diff", "--a", "native+fault:no_such_fault"], "unknown fault"),
    (["sweep", "everything"], "invalid choice"),
    (["sweep", "cat-conv", "--b", "bogus"], "unknown backend"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], needle: str, capsys) -> None:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
@pytest.mark.parametrize("argv", [["diff", "--a", "cudnn"], ["diff", "--device", "cuda"],
                                  ["sweep", "cat-conv", "--a", "tf32"]])
def test_cuda_requests_without_cuda_are_exit_2(argv: list[str], capsys) -> None:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA" in err and len(err.splitlines()) == 1


def test_report_paths_that_are_directories_fail_before_any_work(tmp_path: Path, capsys) -> None:
    assert main(["diff", *SMALL, "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_agreeing_backends_exit_0_and_write_the_json_contract_and_a_self_contained_page(tmp_path: Path,
                                                                                           capsys) -> None:
    out_json, out_html = tmp_path / "r" / "diff.json", tmp_path / "diff.html"
    assert main(["diff", *SMALL, "--json", str(out_json), "--html", str(out_html)]) == 0
    assert "agree: mkldnn and native" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert report["schema"] == "densenet-debug/diff/3" and report["verdict"] == "agree"
    assert report["first_divergence"] is None
    assert {"layer", "pass", "quantity", "error_a", "error_b", "tolerance", "status"} <= set(report["rows"][0])
    assert {"torch", "onednn", "flags_a", "flags_b"} <= set(report["environment"])
    assert report["environment"]["flags_b"]["mkldnn.enabled"] is False
    page = out_html.read_text()
    assert "<svg" in page and "<script" not in page and 'src="http' not in page and "agree" in page


def test_a_planted_fault_exits_1_and_names_the_layer(tmp_path: Path, capsys) -> None:
    out = tmp_path / "diff.json"
    code = main(["diff", *SMALL, "--b", "native+fault:cat_backward_slice_offset@block2.layer01.cat",
                 "--json", str(out)])
    assert code == 1
    first = json.loads(out.read_text())["first_divergence"]
    assert (first["layer"], first["pass"], first["side"]) == ("block2.layer01.cat", "backward", "b")
    assert {"layer", "pass", "quantity", "error", "tolerance"} <= set(first)
    assert "mismatch" in capsys.readouterr().out


def test_bisect_narrows_a_composed_backend_to_the_faulty_component(tmp_path: Path, capsys) -> None:
    out = tmp_path / "diff.json"
    spec = "native+channels_last+fault:bn_invstd_as_var@block1.layer01.norm2"
    assert main(["diff", *SMALL, "--a", "native", "--b", spec, "--bisect", "--json", str(out)]) == 1
    bisect = json.loads(out.read_text())["settings"]["bisect"]
    assert bisect[0]["culprits"] == ["fault:bn_invstd_as_var@block1.layer01.norm2"]
    assert "culprit fault:bn_invstd_as_var" in capsys.readouterr().out


def test_sweep_exits_1_on_the_708_fault_and_writes_its_matrix(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep.json"
    assert main(["sweep", "cat-conv", "--b", "native+fault:strided_read_as_contiguous@conv",
                 "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    failing = {c["case"]["id"] for c in data["cases"] if c["verdict"] == "mismatch"}
    assert failing and all("grad_sliced" in f and not f.startswith("n1-") for f in failing)
    assert "mismatch" in capsys.readouterr().out
