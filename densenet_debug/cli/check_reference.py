"""``densenet-debug check-reference``: judge the current PyTorch against a stored reference fixture."""

from __future__ import annotations

import argparse
import json
import math

from rich.table import Table

from densenet_debug.atomic import write_text
from densenet_debug.cli._common import add_device_arg, add_quiet_arg, add_threads_arg, check_outputs, resolve_device
from densenet_debug.reference.check import check_reference
from densenet_debug.table import make_console, print_table

HELP = "check the current PyTorch against a reference fixture, every layer local and propagated"
EXIT_CODES = {0: "every backend agrees with the fixture", 1: "a mismatch",
              2: "e.g. a bad or missing fixture"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("fixture", help="fixture directory, e.g. reference_grads/densenet-bc-100")
    parser.add_argument("--backend", action="extend", nargs="+", default=None, metavar="X",
                        help="backends to judge (several names, or the flag repeated; default: PyTorch's default "
                             "on the device, mkldnn on CPU, cudnn on CUDA)")
    add_device_arg(parser)
    parser.add_argument("--model", default=None, metavar="M",
                        help="the model to rebuild: a builder name, path/to/file.py:factory or "
                             "package.module:factory, called as recorded (with or without num_classes) and "
                             "refused unless its structure matches the fixture's. Required for a fixture of a "
                             "user's model (a fixture never runs code); default: the builder it records")
    parser.add_argument("--ops", action="store_true",
                        help="also judge every aten op of each backend's first step, teacher-forced on the fixture's "
                             "float64 op capture (a fixture recorded with record --ops; one without: exit 2)")
    parser.add_argument("--json", default=None, metavar="P", help="also write the result(s) as JSON to P")
    parser.add_argument("--rows", type=int, default=12, help="table rows to print per backend (default 12)")
    add_threads_arg(parser)
    add_quiet_arg(parser)


def run(args: argparse.Namespace) -> int:
    from densenet_debug.reference.check import load_reference, reference_oracle, require_ops
    from densenet_debug.verdict.engine import JudgeCache

    check_outputs(args, json=None)
    device = resolve_device(args.device) if args.device else None
    fixture, model = load_reference(args.fixture, spec=args.model)
    if args.ops:
        require_ops(fixture)  # before any judging: one line, exit 2
    loaded = (fixture, model, *reference_oracle(fixture, model))
    shared = JudgeCache()
    results = [check_reference(fixture, b, device=device, loaded=loaded, shared=shared, ops=args.ops)
               for b in (args.backend or [None])]
    console = make_console()
    for r in results:
        print_table(_table(r, args.rows), console)
        console.print(r.summary, markup=False, highlight=False)
    if args.json:
        data = results[0].to_json() if len(results) == 1 else {
            "schema": "densenet-debug/check-reference-many/1", "results": [r.to_json() for r in results]}
        write_text(args.json, json.dumps(data, indent=1) + "\n")
    return 0 if all(r.verdict == "agree" for r in results) else 1


def _table(result: object, limit: int) -> Table:
    """Failing rows first, then those closest to their tolerance (as the result's own plain table orders them)."""
    def closeness(ratio: float | None) -> float:
        return 0.0 if ratio is None or math.isnan(ratio) else 1e300 if math.isinf(ratio) else ratio

    rows = sorted(result.reproduction + result.rows,
                  key=lambda r: (r.status != "mismatch", r.status != "kink", -closeness(r.ratio_a)))[:limit]
    table = Table(title=f"{result.backend} against the fixture: worst {limit} rows")
    for col in ("layer", "pass", "quantity", "mode", "error", "tolerance", "status"):
        table.add_column(col, justify="right" if col in ("error", "tolerance") else "left")
    for r in rows:
        table.add_row(r.layer, r.pass_, r.quantity, r.mode, _fmt(r.error_a), _fmt(r.tolerance), r.status)
    return table


def _fmt(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
