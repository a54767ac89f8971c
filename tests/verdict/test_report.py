"""Report: merging two sides, first divergence, the JSON contract (inf as strings), the rich table and HTML."""

from __future__ import annotations

import json
import math

from rich.console import Console

from densenet_debug.verdict.render import print_report, to_html
from densenet_debug.verdict.report import SCHEMA, DiffReport, Row, SideResult, UnitKink, first_divergence, merge_sides


def _row(layer: str, pass_: str, quantity: str, error: float, tol: float, status: str, order: int,
         mode: str = "local", step: int = 0) -> Row:
    return Row(layer, pass_, quantity, error, None, tol, status, "test", step, mode, None, tol, None,
               error / tol if tol else math.inf, None, (0, 1), None, order)


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
    assert "mismatch: a-backend wrong at head.fc" in text and "head.relu" in text


def test_html_is_self_contained() -> None:
    page = to_html(_report())
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "head.fc" in page
    assert "<script" not in page and "<link" not in page and 'src="' not in page
