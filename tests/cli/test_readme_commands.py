"""README's command table and the real argparse parsers say the same thing (issue 14).

Every flag the table writes for a verb exists in that verb's parser, and every flag the parser has is in the
table (``--debug``, global, and ``-h`` aside); every verb has a row, and every row a verb.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from densenet_debug.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `densenet-debug ([a-z-]+)([^`]*)` \|")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _table() -> dict[str, set[str]]:
    rows: dict[str, set[str]] = {}
    for line in README.read_text().splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"two README rows for {m.group(1)}"
            rows[m.group(1)] = set(FLAG.findall(m.group(2)))
    return rows


def _verbs() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings
            if s.startswith("--") and s != "--help"}


def test_every_verb_has_a_row_and_every_row_a_verb() -> None:
    assert set(_table()) == set(_verbs())


@pytest.mark.parametrize("verb", sorted(_table()))
def test_readme_flags_are_the_parser_flags(verb: str) -> None:
    parser = _verbs()[verb]
    documented = _table()[verb]
    primary = {a.option_strings[0] for a in parser._actions if a.help != argparse.SUPPRESS and a.option_strings
               and a.option_strings[0].startswith("--") and a.option_strings[0] != "--help"}
    assert documented - _flags(parser) == set(), f"README documents flags {verb} does not take"
    assert primary - documented == set(), f"{verb} takes flags README's table does not list"


def test_the_table_parses_what_it_shows() -> None:
    """Multi-valued flags as README writes them (``--layer NAME …``, ``--backend X …``)."""
    parser = build_parser()
    assert parser.parse_args(["gradcheck", "--layer", "a", "b"]).layer == ["a", "b"]
    assert parser.parse_args(["check-reference", "fx", "--backend", "native", "mkldnn"]).backend == ["native",
                                                                                                     "mkldnn"]
    assert parser.parse_args(["selftest", "--faults", "a", "b=1e-3"]).faults == ["a", "b=1e-3"]
