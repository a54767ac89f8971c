"""Showing a :class:`~densenet_debug.verdict.report.DiffReport`: a rich table led by what the verdict rests on
(failing rows, then each side's worst teacher-forced rows by error/tolerance: units, custom Functions and, with
``--ops``, op calls), a line on propagated rows, one on kinks and one per side on the op check; and an HTML page.

The HTML page is self-contained (inline SVG from matplotlib, inline CSS, no scripts or links): per-layer
error over tolerance along depth, forward and backward, local and propagated, both sides.
"""

from __future__ import annotations

import html
import io
import math

from rich.console import Console
from rich.table import Table

from densenet_debug.table import print_table
from densenet_debug.verdict.report import (
    FAILING,
    OP,
    STATUS_ORDER,
    TEACHER_FORCED,
    DiffReport,
    Row,
    Status,
    sortable,
)

STYLE = {"ok": "green", "kink": "yellow", "mismatch": "bold red", "nonfinite": "bold magenta", "math": "bold red",
         "downstream": "red"}


def _e(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, str) or math.isinf(v) or math.isnan(v):
        return str(v)
    return f"{v:.2e}"


DEFAULT_TOP = 15


def _ratio(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.2f}" if v < 1e3 else f"{v:.1e}"


def _failing(report: DiffReport, r: Row) -> bool:
    return r.status in FAILING or (r.status == Status.KINK and report.settings.get("fail_on") == "kink")


def leading_rows(report: DiffReport, top: int = DEFAULT_TOP) -> list[Row]:
    """What the verdict rests on: the failing rows first (units' teacher-forced rows, then op rows, then
    propagated ones; forward before backward, in order), then the worst teacher-forced rows (units, custom
    Functions, op calls alike) of each side by error/tolerance, ``top`` in all.

    A side is wrong at a unit only when a local row fails, so an agreeing report leads with the local rows
    closest to their tolerance, both sides represented (``ceil(top / 2)`` each, then the next worst).
    """
    failing = sorted((r for r in report.rows if _failing(report, r)),
                     key=lambda r: (r.mode not in TEACHER_FORCED, r.mode == OP, r.step, r.pass_ != "forward",
                                    r.order, -sortable(r.worst_ratio)))
    shown = failing[:top]
    local = [r for r in report.rows if r.mode in TEACHER_FORCED and not _failing(report, r)]
    room = top - len(shown)
    if room <= 0:
        return shown
    per_side = math.ceil(room / 2)
    picked: list[Row] = []
    for side in ("a", "b"):
        ranked = sorted((r for r in local if getattr(r, f"ratio_{side}") is not None),
                        key=lambda r, side=side: -sortable(getattr(r, f"ratio_{side}")))
        picked += [r for r in ranked[:per_side] if all(r is not q for q in picked)]
    rest = sorted((r for r in local if all(r is not q for q in picked)), key=lambda r: -sortable(r.worst_ratio))
    picked += rest[:max(0, room - len(picked))]
    return shown + sorted(picked, key=lambda r: -sortable(r.worst_ratio))[:room]


def _table(title: str, rows: list[Row]) -> Table:
    table = Table(title=title)
    for col in ("layer", "pass", "quantity", "mode", "step", "error a", "error b", "tolerance", "ratio", "status"):
        table.add_column(col, justify="right" if col.startswith(("error", "tol", "step", "ratio")) else "left")
    for r in rows:
        table.add_row(r.layer, r.pass_, r.quantity, r.mode, str(r.step), _e(r.error_a), _e(r.error_b),
                      _e(r.tolerance), _ratio(r.worst_ratio), f"[{STYLE[r.status]}]{r.status}[/]")
    return table


def kink_line(report: DiffReport) -> str:
    """One line: how many elements took the other branch, where, and how many propagated rows they explain."""
    sites = {s: [k for k in report.kinks if k.side == s and k.mode == "propagated"] for s in ("a", "b")}
    local = sum(k.count for k in report.kinks if k.mode == "local")
    kink_rows = [r for r in report.rows if r.status == Status.KINK and r.mode not in (OP, "between")]
    between = [r for r in report.rows if r.status == Status.KINK and r.mode == "between"]  # op kinks: ops_lines
    if not any(sites.values()) and not local and not kink_rows and not between:
        return "kinks: none (no ReLU/max-pool input within rounding of its boundary took the other branch)"
    names = {"a": report.a, "b": report.b}
    per_side = ", ".join(f"{names[s]} {sum(k.count for k in ks)} element(s) in {len({k.layer for k in ks})} unit(s)"
                         for s, ks in sites.items())
    worst = max((sortable(r.worst_ratio) for r in kink_rows), default=0.0)
    explained = (f"; the counterfactual oracle (taking that branch) explains {len(kink_rows)} propagated row(s), "
                 f"up to {_ratio(worst)}x their first-order tolerance (status kink)") if kink_rows else ""
    excluded = f"; {local} element(s) left out of local rows" if local else ""
    worst_between = max((sortable(r.worst_ratio) for r in between), default=0.0)
    in_between = (f"; {len(between)} between row(s) explained by a branch the code between units took within "
                  f"rounding of its boundary, up to {_ratio(worst_between)}x their rounding bound") if between else ""
    return (f"kinks (the other branch of a ReLU/max-pool within rounding of its boundary): {per_side}{explained}"
            f"{excluded}{in_between}; --top N lists them, --json has every row")


def propagated_line(report: DiffReport) -> str:
    """One line on the end-to-end rows: within the summed local tolerances, or explained, or failing."""
    prop = [r for r in report.rows if r.mode == "propagated"]
    if not prop:
        return ""
    within = sum(1 for r in prop if r.status == Status.OK and sortable(r.worst_ratio) <= 1)
    kinks = sum(1 for r in prop if r.status == Status.KINK)
    other = sum(1 for r in prop if r.status == Status.OK and sortable(r.worst_ratio) > 1)
    failing = sum(1 for r in prop if r.status in FAILING)
    downstream = sum(1 for r in prop if r.status == Status.DOWNSTREAM)
    parts = [f"{within} within the summed local tolerances"]
    if kinks:
        parts.append(f"{kinks} explained by kinks")
    if other:
        parts.append(f"{other} explained as amplified upstream error (notes: --json)")
    if downstream:
        parts.append(f"{downstream} downstream of a failing check (each names it)")
    if failing:
        parts.append(f"{failing} failing")
    return f"propagated (end to end): {len(prop)} row(s), " + ", ".join(parts)


def ops_lines(report: DiffReport) -> list[str]:
    """``--ops``: one line per side (ops replayed, ops on one side only, own-run kinks, the first failing op)
    and one on op rows whose difference only rounding across a branch boundary explains."""
    lines = [str(side.get("summary", "")) for side in report.settings.get("ops") or []]
    kinks = [r for r in report.rows if r.mode == OP and r.status == Status.KINK]
    if kinks:
        lines.append(f"op kinks: {len(kinks)} op output(s) within tolerance once the element(s) whose input rounds "
                     f"across a branch boundary are left out (status kink), e.g. {kinks[0].layer}")
    return [line for line in lines if line]


def print_report(report: DiffReport, console: Console | None = None, top: int | None = None) -> None:
    """The rows the verdict rests on (failures first, then each side's worst local rows by error/tolerance),
    one line on the propagated rows, one on kinks, and the one-line verdict.

    ``top`` (``--top``) sets the rows per table and adds the worst ``top`` rows of every mode (propagated and
    kink rows included) and the kinks by unit; None shows the leading table of ``DEFAULT_TOP`` rows only.
    """
    console = console or Console()
    n = top or DEFAULT_TOP
    failing = any(_failing(report, r) for r in report.rows)
    lead = "failing rows first, then" if failing else "what the verdict rests on:"
    kinds = "local and op" if any(r.mode == "op" for r in report.rows) else "local"
    print_table(_table(f"diff {report.a} (a) vs {report.b} (b) against the fp64 oracle: {lead} the worst {kinds} "
                       f"rows per side by error/tolerance (ratio > 1 fails)", leading_rows(report, n)), console)
    for line in (propagated_line(report), kink_line(report), *ops_lines(report)):
        if line:
            console.print(line, markup=False, highlight=False)
    if top is not None:
        print_table(_table(f"worst {top} rows of every mode (failures first, then closest to their tolerance)",
                           report.worst_rows(top)), console)
        if report.kinks:
            _print_kinks(report, console, top)
    style = "green" if report.verdict == "agree" else "bold red"
    console.print(f"[{style}]{report.summary}[/]")


def _print_kinks(report: DiffReport, console: Console, top: int) -> None:
    by_layer: dict[tuple[str, str], list] = {}
    for k in report.kinks:
        by_layer.setdefault((k.side, k.layer), []).append(k)
    kt = Table(title="kinks: the side took the other branch of a ReLU/max-pool near its boundary")
    for col in ("side", "layer", "count", "min margin", "relative margin"):
        kt.add_column(col)
    for (side, layer), ks in list(by_layer.items())[:top]:
        kt.add_row(report.a if side == "a" else report.b, layer, str(sum(k.count for k in ks)),
                   _e(min(k.min_margin for k in ks)), _e(min(k.relative_margin for k in ks)))
    if len(by_layer) > top:
        kt.caption = f"{len(by_layer) - top} more in the JSON report"
    print_table(kt, console)


def _plot_svg(report: DiffReport) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=False)
    for ax, pass_ in zip(axes, ("forward", "backward")):
        for mode, marker in (("local", "o"), ("propagated", "x")):
            for side, colour, label in (("a", "tab:blue", report.a), ("b", "tab:orange", report.b)):
                pts = [(r.order, getattr(r, f"ratio_{side}")) for r in report.rows
                       if r.pass_ == pass_ and r.mode == mode and r.step == 0
                       and getattr(r, f"ratio_{side}") is not None]
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ys = [min(max(p[1], 1e-6), 1e6) if math.isfinite(p[1]) else 1e6 for p in pts]
                ax.scatter(xs, ys, s=10 if mode == "local" else 14, marker=marker, color=colour, alpha=0.7,
                           label=f"{label} {mode}")
        ax.axhline(1.0, color="red", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylabel("error / tolerance")
        ax.set_xlabel(f"unit, in {pass_} order")
        ax.set_title(f"{pass_} pass (step 0); above the red line fails")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _row_html(r: Row) -> str:
    cells = [r.layer, r.pass_, r.quantity, r.mode, str(r.step), _e(r.error_a), _e(r.error_b), _e(r.tolerance),
             _ratio(r.worst_ratio), r.status, r.origin, r.note]
    return f'<tr class="{r.status}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def to_html(report: DiffReport, top: int = 40) -> str:
    """The whole page as one string."""
    env = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                  for k, v in report.environment.items())
    kinks = "".join(f"<tr><td>{html.escape(report.a if k.side == 'a' else report.b)}</td><td>{html.escape(k.layer)}"
                    f"</td><td>{k.count}</td><td>{_e(k.min_margin)}</td><td>{k.mode}</td><td>{k.step}</td></tr>"
                    for k in report.kinks)
    head = "".join(f"<th>{h}</th>" for h in ("layer", "pass", "quantity", "mode", "step", "error a", "error b",
                                               "tolerance", "ratio", "status", "origin", "note"))
    rows = "".join(_row_html(r) for r in report.worst_rows(top))
    op_rows = [r for r in report.rows if r.mode == OP]
    ops = ""
    if op_rows:
        ranked = sorted(op_rows, key=lambda r: (-STATUS_ORDER[r.status], -sortable(r.worst_ratio)))[:top]
        lines = "".join(f"<li>{html.escape(line)}</li>" for line in ops_lines(report))
        ops = (f"<h2>Op rows (--ops): each aten op call on the oracle's inputs, worst {len(ranked)} of "
               f"{len(op_rows)}</h2><ul>{lines}</ul><table><tr>{head}</tr>"
               + "".join(_row_html(r) for r in ranked) + "</table>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>densenet-debug diff: {html.escape(report.a)} vs {html.escape(report.b)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; }} tr.mismatch {{ background: #fdd; }}
tr.kink {{ background: #ffd; }} .verdict {{ font-size: 1.3em; font-weight: bold; }}
.agree {{ color: #070; }} .mismatch-v {{ color: #b00; }}
</style></head><body>
<h1>densenet-debug diff: {html.escape(report.a)} (a) vs {html.escape(report.b)} (b)</h1>
<p class="verdict {'agree' if report.verdict == 'agree' else 'mismatch-v'}">{html.escape(report.summary)}</p>
<p>Both sides are judged against a float64 CPU oracle. Local rows re-run each unit on the oracle's own inputs
and grad_outputs (teacher forcing, in the layout the side saw); tolerances are derived from unit roundoffs and an
error model of each op. Propagated rows compare the end-to-end run; kinks are ReLU/max-pool elements whose oracle
input lies within precision noise of the boundary.</p>
{_plot_svg(report)}
<h2>Worst rows</h2><table><tr>{head}</tr>{rows}</table>
{ops}
<h2>Kinks</h2><table><tr><th>side</th><th>layer</th><th>count</th><th>min margin</th><th>mode</th><th>step</th></tr>
{kinks}</table>
<h2>Settings</h2><pre>{html.escape(str(report.settings))}</pre>
<h2>Environment</h2><table>{env}</table>
</body></html>
"""
