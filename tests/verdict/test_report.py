"""Report: merging two sides, first divergence, the JSON contract (inf as strings), the rich table and HTML."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from densenet_debug.verdict.render import leading_rows, print_report, to_html
from densenet_debug.verdict.report import SCHEMA, DiffReport, Row, SideResult, UnitKink, first_divergence, merge_sides


def _row(layer: str, pass_: str, quantity: str, error: float | None, tol: float, status: str, order: int,
         mode: str = "local", step: int = 0) -> Row:
    ratio = None if error is None else (error / tol if tol else math.inf)
    return Row(layer, pass_, quantity, error, None, tol, status, "test", step, mode, None, tol, None,
               ratio, None, (0, 1), None, order)


def test_merge_takes_the_worse_side_and_names_it() -> None:
    a = SideResult("mkldnn", [_row("conv", "backward", "grad_weight", 1e-7, 1e-6, "ok", 3)], [], {}, ["conv"])
    b = SideResult("native", [_row("conv", "backward", "grad_weight", 2.0, 1e-6, "mismatch", 3)], [], {}, ["conv"])
    (row,) = merge_sides(a, b)
    assert (row.error_a, row.error_b, row.status, row.side) == (1e-7, 2.0, "mismatch", "b")
    both = merge_sides(b, b)[0]
    assert both.side == "both"


def test_first_divergence_prefers_local_then_forward_then_order() -> None:
    rows = [_row("late", "backward", "grad_input", 1.0, 0.1, "mismatch", 0),
            _row("prop", "forward", "output", 1.0, 0.1, "mismatch", 0, mode="propagated"),
            _row("early_bwd", "backward", "grad_input", 1.0, 0.1, "mismatch", 5),
            _row("fwd", "forward", "output", 1.0, 0.1, "mismatch", 9),
            _row("fine", "forward", "output", 0.0, 0.1, "ok", 1)]
    for r in rows:
        r.side = "a"
    assert first_divergence(rows)["layer"] == "fwd"
    assert first_divergence(rows[:3])["layer"] == "late"
    assert first_divergence([rows[4]]) is None
    kink = _row("relu", "backward", "grad_input", 1.0, 0.1, "kink", 2, mode="propagated")
    assert first_divergence([kink]) is None and first_divergence([kink], kinks_fail=True)["status"] == "kink"


def _report() -> DiffReport:
    rows = [_row("stem", "forward", "output", 1e-7, 1e-6, "ok", 0),
            _row("head.fc", "backward", "grad_weight", math.inf, 0.0, "mismatch", 0)]
    rows[1].side = "a"
    return DiffReport("mismatch", first_divergence(rows), rows, [UnitKink("head.relu", 2, 3e-6, 1e-7, "b")],
                      {"torch": "x"}, "a-backend", "b-backend", {"steps": 1}, "mismatch: a-backend wrong at head.fc")


def test_json_contract_keys_and_non_finite_numbers() -> None:
    data = json.loads(json.dumps(_report().to_json(), allow_nan=False))
    assert data["schema"] == SCHEMA and data["verdict"] == "mismatch"
    assert {"layer", "pass", "quantity", "error", "tolerance"} <= set(data["first_divergence"])
    assert data["first_divergence"]["error"] == "inf"
    assert {"layer", "pass", "quantity", "error_a", "error_b", "tolerance", "status"} <= set(data["rows"][0])
    assert data["kinks"] == [{"layer": "head.relu", "count": 2, "min_margin": 3e-6, "relative_margin": 1e-7,
                              "side": "b", "step": 0, "mode": "propagated"}]


def test_table_shows_failures_first_and_the_verdict_line() -> None:
    console = Console(record=True, width=200)
    print_report(_report(), console)
    text = console.export_text()
    assert text.index("head.fc") < text.index("stem")
    assert "mismatch: a-backend wrong at head.fc" in text and "b-backend 2 element(s) in 1 unit(s)" in text
    assert "head.relu" not in text  # kinks by unit only with --top
    console = Console(record=True, width=200)
    print_report(_report(), console, top=5)
    assert "head.relu" in console.export_text()


def _agreeing() -> DiffReport:
    """An agreeing report whose worst rows by ratio are propagated kink rows (BC-100's shape, made small)."""
    rows = [_row(f"block.{i}", "backward", "grad_input", 2e-4 * (i + 1), 1e-4, "kink", i, mode="propagated")
            for i in range(20)]
    rows += [_row(f"a.{i}", "backward", "grad_weight", 1e-8 * (10 - i), 1e-7, "ok", i) for i in range(10)]
    b_row = _row("b.only", "forward", "output", None, 1e-7, "ok", 3)
    b_row.error_b, b_row.ratio_a, b_row.ratio_b = 2e-8, None, 0.2
    rows += [b_row, _row("p.ok", "forward", "output", 1e-6, 1e-5, "ok", 1, mode="propagated")]
    kinks = [UnitKink(f"relu.{i}", 2, 1e-9, 1e-8, "a") for i in range(20)]
    return DiffReport("agree", None, rows, kinks, {}, "a-backend", "b-backend", {"fail_on": "mismatch"},
                      "agree: a-backend and b-backend match")


def test_an_agreeing_table_leads_with_the_local_rows_and_one_line_on_kinks() -> None:
    console = Console(record=True, width=400)
    print_report(_agreeing(), console)
    text = console.export_text()
    table = text[:text.index("propagated (end to end)")]
    assert "block." not in table and "kink " not in table  # the 40x kink rows are not what the verdict rests on
    assert "a.0" in table and "b.only" in table  # both sides' worst local rows, with their ratio
    assert "ratio" in table and " 0.80 " in table and " 0.20 " in table
    assert ("explains 20 propagated row(s), up to 40.00x their first-order tolerance" in text
            and "a-backend 40 element(s) in 20 unit(s)" in text and "--top N lists them" in text)
    assert "21 row(s), 1 within the summed local tolerances, 20 explained by kinks" in text
    assert text.rstrip().endswith("agree: a-backend and b-backend match")
    console = Console(record=True, width=400)
    print_report(_agreeing(), console, top=3)
    text = console.export_text()
    assert text.count("block.") >= 3 and "relu.0" in text  # --top: every mode's worst rows and the kinks


def test_leading_rows_take_each_sides_worst_local_rows() -> None:
    rows = leading_rows(_agreeing(), 4)
    assert [r.layer for r in rows] == ["a.0", "a.1", "b.only", "a.2"] or {r.layer for r in rows} >= {"a.0", "b.only"}
    assert all(r.mode == "local" for r in rows) and len(rows) == 4
    failing = _report()
    assert leading_rows(failing, 1)[0].layer == "head.fc"


def test_json_rows_carry_the_ratio_and_the_scale() -> None:
    row = _row("conv", "backward", "grad_bias", 2e-7, 1e-6, "ok", 0)
    row.scale = 0.25
    data = row.to_json()
    assert data["ratio"] == pytest.approx(0.2) and data["scale"] == 0.25
    assert {"error_a", "error_b", "tolerance", "ratio_a", "ratio_b", "status"} <= set(data)


def test_html_is_self_contained() -> None:
    page = to_html(_report())
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "head.fc" in page
    assert "<script" not in page and "<link" not in page and 'src="' not in page
