#!/usr/bin/env python3
"""Benchmarks, printed as JSON: ``scripts/bench.py NAME [--json PATH] [options]``.

Each benchmark is ``scripts/benches/NAME.py`` with ``run(argv) -> dict``; its figures are ratios against an
anchor measured in the same run (never absolute times judged against a fixed number). ``all`` runs every one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

BENCHES = Path(__file__).with_name("benches")


def _names() -> list[str]:
    return sorted(p.stem for p in BENCHES.glob("*.py") if not p.stem.startswith("_"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_json(path: str, data: dict) -> None:
    """Atomic: a half-written result never appears."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=_names() + ["all"])
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args, rest = parser.parse_known_args(argv)
    names = _names() if args.name == "all" else [args.name]
    results = {name: _load(name).run(rest if args.name != "all" else []) for name in names}
    result = results[args.name] if args.name != "all" else results
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
