"""``make matrix``: the table says what regressed between torch versions, and the run fails on any mismatch.

Synthetic raw results (what the ``reference`` sessions leave under ``work/matrix/<version>/``) go through the
noxfile's own functions; nox itself is not run (installing torch releases takes minutes and gigabytes).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("nox")
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("densenet_debug_noxfile", ROOT / "noxfile.py")
assert _spec is not None and _spec.loader is not None
noxfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(noxfile)


def _result(verdict: str, layer: str | None = None, repro: list[str] | None = None) -> dict:
    """A check-reference JSON result, reduced to what the matrix reads."""
    first = None if layer is None else {"mode": "local", "layer": layer, "pass": "backward",
                                        "quantity": "grad_input"}
    return {"schema": "densenet-debug/check-reference/1", "verdict": verdict, "first_divergence": first,
            "rows": [{}] * 3, "kinks": [{"count": 2}],
            "reproduction": [{"status": s, "error_a": 1e-16} for s in (repro or [])]}


def _write_version(work: Path, version: str, results: dict[str, dict | None]) -> None:
    """One reference session's output: a result file per check (None: the check could not run)."""
    out = work / version
    out.mkdir(parents=True)
    checks = []
    for check, data in results.items():
        name = check.replace(" ", "--") + ".json"
        if data is None:
            checks.append({"check": check, "verdict": "error", "detail": "error: no such fixture", "seconds": 1.0})
            continue
        (out / name).write_text(json.dumps(data))
        checks.append({"check": check, "file": name, "verdict": data["verdict"], "seconds": 1.0})
    (out / "summary.json").write_text(json.dumps({"torch": version, "checks": checks}))


def _run(work: Path) -> tuple[dict, str, str | None]:
    summaries = noxfile.collect(work)
    verdict = noxfile.compare(summaries)
    return verdict, noxfile.render(summaries, verdict), noxfile.problems(verdict)


def test_all_agree_and_unchanged_passes(tmp_path: Path) -> None:
    for v in ("2.13.0", "2.14.1"):
        _write_version(tmp_path, v, {"bc10 native": _result("agree"), "bc16 mkldnn": _result("agree", repro=["ok"]),
                                     "sweep cat-conv": {"verdict": "agree", "cases": [{"verdict": "agree"}] * 72}})
    verdict, text, failure = _run(tmp_path)
    assert failure is None and verdict["failing"] == [] and verdict["changed"] == []
    assert "CHANGED" not in text and "Every cell agrees." in text and "No cell changed" in text
    assert "agree, 2 kink element(s) explained; fp64 reproduction ok (max 1.0e-16)" in text


def test_a_regression_fails_the_run_and_marks_the_cell_that_changed(tmp_path: Path) -> None:
    _write_version(tmp_path, "2.13.0", {"bc10 native": _result("agree"), "bc10 mkldnn": _result("agree")})
    _write_version(tmp_path, "2.14.1", {"bc10 native": _result("mismatch", "block1.layer01.conv2"),
                                        "bc10 mkldnn": _result("agree")})
    verdict, text, failure = _run(tmp_path)
    assert verdict["changed"] == [{"check": "bc10 native", "from": "2.13.0", "to": "2.14.1", "was": "agree",
                                   "now": "mismatch (local block1.layer01.conv2 backward grad_input)"}]
    row = next(line for line in text.splitlines() if line.startswith("| bc10 native |"))
    old, new = row.split(" | ")[1:3]
    assert "CHANGED" not in old and new.startswith("**CHANGED** mismatch (local block1.layer01.conv2")
    assert "| bc10 mkldnn |" in text and "CHANGED" not in text.split("| bc10 mkldnn |")[1].splitlines()[0]
    assert "- bc10 native: torch 2.13.0 agree -> torch 2.14.1 mismatch" in text
    assert failure is not None and "1 cell(s) not agree, 1 changed between torch versions" in failure
    assert "first: bc10 native under torch 2.14.1: mismatch (local block1.layer01.conv2" in failure


def test_a_mismatch_in_every_version_fails_without_being_a_change(tmp_path: Path) -> None:
    for v in ("2.13.0", "2.14.1"):
        _write_version(tmp_path, v, {"bc10 fp64": _result("mismatch", "trans1.pool")})
    verdict, text, failure = _run(tmp_path)
    assert verdict["changed"] == [] and "CHANGED" not in text
    assert failure is not None and failure.startswith("2 cell(s) not agree; first: bc10 fp64 under torch 2.13.0")


def test_a_check_that_could_not_run_fails_and_a_drifted_reproduction_is_a_change(tmp_path: Path) -> None:
    _write_version(tmp_path, "2.13.0", {"bc100 native": _result("agree", repro=["ok", "ok"]),
                                        "bc16 native": _result("agree")})
    _write_version(tmp_path, "2.14.1", {"bc100 native": _result("agree", repro=["ok", "mismatch"]),
                                        "bc16 native": None})
    verdict, text, failure = _run(tmp_path)
    assert {c["check"] for c in verdict["changed"]} == {"bc100 native", "bc16 native"}
    assert "**CHANGED** agree, 2 kink element(s) explained; fp64 reproduction drifted" in text
    assert "**CHANGED** error (error: no such fixture)" in text
    assert failure is not None and "bc16 native under torch 2.14.1: error" in failure


def test_versions_are_ordered_as_numbers() -> None:
    assert sorted(["2.13.0", "2.9.1", "2.14.1+cpu", "2.10.0"], key=noxfile.version_key) == [
        "2.9.1", "2.10.0", "2.13.0", "2.14.1+cpu"]


@settings(max_examples=40, deadline=None)
@given(grid=st.lists(st.lists(st.sampled_from(["agree", "mismatch", "error"]), min_size=3, max_size=3),
                     min_size=1, max_size=4))
def test_the_run_fails_iff_a_cell_disagrees_and_changes_are_consecutive_differences(grid: list[list[str]]) -> None:
    versions = [f"2.{10 + i}.0" for i in range(len(grid))]
    checks = ["a", "b", "c"]
    summaries = {v: {c: {"check": c, "verdict": row[j], "detail": ""} for j, c in enumerate(checks)}
                 for v, row in zip(versions, grid)}
    verdict = noxfile.compare(summaries)
    assert (noxfile.problems(verdict) is None) == all(x == "agree" for row in grid for x in row)
    expected = {(c, versions[i + 1]) for i in range(len(grid) - 1) for j, c in enumerate(checks)
                if grid[i][j] != grid[i + 1][j]}
    assert {(c["check"], c["to"]) for c in verdict["changed"]} == expected
    text = noxfile.render(summaries, verdict)
    assert text.count("**CHANGED**") == len(expected)
