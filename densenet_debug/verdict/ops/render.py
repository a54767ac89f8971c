"""Showing an :class:`~densenet_debug.verdict.ops.judge.OpReport`: the worst op rows of one side, and a summary."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from densenet_debug.table import print_table
from densenet_debug.verdict.ops.judge import OpReport
from densenet_debug.verdict.report import Row

STYLE = {"ok": "green", "kink": "yellow", "mismatch": "bold red", "nonfinite": "bold magenta"}


def _e(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v) or math.isnan(v):
        return str(v)
    return f"{v:.2e}"


def summary_line(report: OpReport) -> str:
    """One line: verdict, ops matched, what ran on one side only, kinks, and the worst failing op."""
    listed = [u for u in report.unmatched if u.verdict not in ("glue", "folded")]
    kinks = sum(k.count for k in report.kinks)
    head = (f"ops {report.backend}: {report.verdict} ({report.matched} ops replayed on the oracle's inputs, "
            f"{len(report.unmatched)} on one side only ({len(listed)} not glue), {kinks} element(s) on the other "
            "branch in the side's own run)")
    failing = report.failures
    if failing:
        first = min(failing, key=lambda r: r.order)
        head += f"; first failing op: {first.layer} · {first.quantity} ({first.pass_}, {first.status})"
    return head


def print_ops(report: OpReport, console: Console | None = None, top: int = 15) -> None:
    """The ``top`` worst op rows (failures first, then the closest to their tolerance), then the summary."""
    console = console or Console()
    table = Table(title=f"ops {report.backend} against the fp64 oracle (each op on the oracle's inputs): "
                        f"worst {top}")
    for col in ("op", "pass", "quantity", "error", "tolerance", "error/tol", "status", "note"):
        table.add_column(col, justify="right" if col.startswith(("error", "tol")) else "left")
    for r in report.worst(top):
        table.add_row(r.layer, r.pass_, r.quantity, _e(r.error_a), _e(r.tolerance), _e(r.ratio_a),
                      f"[{STYLE[str(r.status)]}]{r.status}[/]", _note(r))
    print_table(table, console)
    console.print(summary_line(report), highlight=False)


def _note(r: Row) -> str:
    text = r.note or ("generic bound" if "[generic]" in r.origin else "")
    return text if len(text) <= 80 else text[:77] + "..."


def to_settings(report: OpReport) -> dict:
    """What a diff report keeps of a side's op report besides its rows (they are rows of the report,
    :func:`~densenet_debug.verdict.ops.merge_ops`): verdict, counts, the ops run on one side only that are no
    glue, the elements the side's own run put on another branch, what was not judged, one summary line."""
    return {"backend": report.backend, "verdict": report.verdict, "matched": report.matched,
            "second_pass_matched": report.second_pass_matched,
            "unmatched": [u.to_json() for u in report.unmatched if u.verdict not in ("glue", "folded")],
            "kinks": [k.to_json() for k in report.kinks], "skipped": dict(report.skipped),
            "summary": summary_line(report)}
