"""The shared table renderer: off a terminal every cell is printed whole, aligned, markup stripped."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table

from densenet_debug.table import make_console, plain_lines, print_table

CELL = st.text(alphabet=st.characters(whitelist_categories=("L", "N", "P", "S"), blacklist_characters="[]\\"),
               min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(st.lists(CELL, min_size=n, max_size=n),
                                                    st.lists(st.lists(CELL, min_size=n, max_size=n), max_size=8))))
def test_every_cell_whole_and_columns_aligned(data) -> None:
    header, rows = data
    table = Table()
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    lines = plain_lines(table)
    assert len(lines) == 2 + len(rows)
    widths = [len(w) for w in lines[1].split("  ")]
    for line, cells in zip([lines[0], *lines[2:]], [header, *rows]):
        start = 0
        for cell, width in zip(cells, widths):
            assert line[start:start + width].rstrip() == cell.rstrip()
            start += width + 2


def test_a_pipe_at_80_columns_gets_the_long_rows_uncut() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=80)
    table = Table(title="t")
    for col in ("unit", "tensor", "error", "status"):
        table.add_column(col)
    table.add_row("block3.layer16.conv2", "block3.layer16.conv2.weight_of_a_long_name", "7.3456789e-05",
                  "[red]FAIL[/] (culprit)")
    print_table(table, console)
    out = buf.getvalue()
    assert "7.3456789e-05" in out and "FAIL (culprit)" in out and "…" not in out
    assert max(len(line) for line in out.splitlines()) > 80  # longer than the width, not folded


def test_make_console_never_wraps_off_a_terminal() -> None:
    console = make_console(file=io.StringIO(), width=40)
    console.print("x" * 100)
    assert console.file.getvalue() == "x" * 100 + "\n"
