"""One table renderer for every report: rich on a terminal, plain aligned columns in pipes and CI logs.

rich fits a table to the console's width by folding and eliding cells (``7.34e…``, ``FAIL (culp…``), which
is right for a terminal and wrong for ``| tail`` or a CI log, where a number cut short is a lost number. Off a
terminal the same :class:`rich.table.Table` is written as plain text: markup stripped, each column as wide as
its widest cell, never truncated, one line per row.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _plain(cell: object) -> str:
    if isinstance(cell, Text):
        text = cell.plain
    elif isinstance(cell, str):
        try:
            text = Text.from_markup(cell).plain
        except Exception:  # not valid markup: show it as written
            text = cell
    else:
        text = str(cell)
    return " ".join(text.split("\n"))


def plain_lines(table: Table) -> list[str]:
    """The table as plain text lines (title, header, rule, rows with section breaks, caption)."""
    columns = table.columns
    header = [_plain(c.header) for c in columns]
    body = [[_plain(cell) for cell in c.cells] for c in columns]
    n_rows = max((len(cells) for cells in body), default=0)
    rows = [[body[j][i] if i < len(body[j]) else "" for j in range(len(columns))] for i in range(n_rows)]
    widths = [max([len(header[j])] + [len(r[j]) for r in rows]) for j in range(len(columns))]

    def line(cells: list[str]) -> str:
        out = [cell.rjust(w) if col.justify == "right" else cell.center(w) if col.justify == "center"
               else cell.ljust(w) for cell, w, col in zip(cells, widths, columns)]
        return "  ".join(out).rstrip()

    lines = [_plain(table.title)] if table.title else []
    lines += [line(header), "  ".join("-" * w for w in widths)]
    for i, r in enumerate(rows):
        lines.append(line(r))
        if i < len(table.rows) and table.rows[i].end_section and i + 1 < n_rows:
            lines.append("  ".join("-" * w for w in widths))
    if table.caption:
        lines.append(_plain(table.caption))
    return lines


def print_table(table: Table, console: Console | None = None) -> None:
    """rich's rendering on a terminal; :func:`plain_lines` anywhere else (pipes, files, CI)."""
    console = console or Console()
    if console.is_terminal:
        console.print(table)
        return
    for line in plain_lines(table):  # through the console (recording, capture), never wrapped or cropped
        console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True, crop=False)


def make_console(**kwargs: object) -> Console:
    """A rich Console for reports: on a terminal as usual; elsewhere lines are never wrapped or cut, so
    ``| tail -1`` gives the whole verdict line."""
    probe = Console(**kwargs)
    return probe if probe.is_terminal else Console(soft_wrap=True, **kwargs)
