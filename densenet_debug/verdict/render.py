"""Showing a :class:`~densenet_debug.verdict.report.DiffReport`: a rich table of the worst layers, and an HTML page.

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
from densenet_debug.verdict.report import DiffReport, Row

STYLE = {"ok": "green", "kink": "yellow", "mismatch": "bold red", "nonfinite": "bold magenta", "math": "bold red"}


def _e(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, str) or math.isinf(v) or math.isnan(v):
        return str(v)
    return f"{v:.2e}"


def print_report(report: DiffReport, console: Console | None = None, top: int = 15) -> None:
    """The worst rows (failures first, then closest to tolerance), the kinks, and the one-line verdict."""
    console = console or Console()
    table = Table(title=f"diff {report.a} (a) vs {report.b} (b) against the fp64 oracle: worst {top} rows")
    for col in ("layer", "pass", "quantity", "mode", "step", "error a", "error b", "tolerance", "status"):
        table.add_column(col, justify="right" if col.startswith(("error", "tol", "step")) else "left")
    for r in report.worst_rows(top):
        table.add_row(r.layer, r.pass_, r.quantity, r.mode, str(r.step), _e(r.error_a), _e(r.error_b),
                      _e(r.tolerance), f"[{STYLE[r.status]}]{r.status}[/]")
    print_table(table, console)
    if report.kinks:
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
    style = "green" if report.verdict == "agree" else "bold red"
    console.print(f"[{style}]{report.summary}[/]")


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
             r.status, r.origin, r.note]
    return f'<tr class="{r.status}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def to_html(report: DiffReport, top: int = 40) -> str:
    """The whole page as one string."""
    env = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                  for k, v in report.environment.items())
    kinks = "".join(f"<tr><td>{html.escape(report.a if k.side == 'a' else report.b)}</td><td>{html.escape(k.layer)}"
                    f"</td><td>{k.count}</td><td>{_e(k.min_margin)}</td><td>{k.mode}</td><td>{k.step}</td></tr>"
                    for k in report.kinks)
    head = "".join(f"<th>{h}</th>" for h in ("layer", "pass", "quantity", "mode", "step", "error a", "error b",
                                               "tolerance", "status", "origin", "note"))
    rows = "".join(_row_html(r) for r in report.worst_rows(top))
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
<h2>Kinks</h2><table><tr><th>side</th><th>layer</th><th>count</th><th>min margin</th><th>mode</th><th>step</th></tr>
{kinks}</table>
<h2>Settings</h2><pre>{html.escape(str(report.settings))}</pre>
<h2>Environment</h2><table>{env}</table>
</body></html>
"""
