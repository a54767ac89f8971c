"""``densenet-debug``: thin command-line shells over the library.

Each verb is a module in this package with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
verbs are discovered, so adding one touches no other file. Exit codes: 0 ok, 1 a finding (mismatch, fail),
2 bad usage or environment, 130 interrupted. User errors print one line; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from densenet_debug import __version__
from densenet_debug.errors import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _verbs() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="densenet-debug", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"densenet-debug {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for name in _verbs():
        module = importlib.import_module(f"{__name__}.{name}")
        verb = name.replace("_", "-")
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"densenet-debug {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave: missing, unreadable, a directory
        if args.debug:
            raise
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"densenet-debug {args.verb}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
