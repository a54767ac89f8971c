"""``densenet-debug check-reference``: judge the current PyTorch against a stored reference fixture."""

from __future__ import annotations

import argparse
import json

from densenet_debug.atomic import write_text
from densenet_debug.cli._common import add_device_arg, resolve_device
from densenet_debug.reference.check import check_reference

HELP = "check the current PyTorch against a reference fixture, every layer local and propagated (exit 0/1/2)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("fixture", help="fixture directory, e.g. reference_grads/densenet-bc-100")
    parser.add_argument("--backend", action="append", default=None, metavar="X",
                        help="backend to judge (repeatable; default: PyTorch's default on the device, "
                             "mkldnn on CPU, cudnn on CUDA)")
    add_device_arg(parser)
    parser.add_argument("--model", default=None, metavar="M",
                        help="the model to rebuild: a builder name, path/to/file.py:factory or "
                             "package.module:factory, called as recorded (with or without num_classes) and "
                             "refused unless its structure matches the fixture's. Required for a fixture of a "
                             "user's model (a fixture never runs code); default: the builder it records")
    parser.add_argument("--json", default=None, metavar="P", help="also write the result(s) as JSON to P")
    parser.add_argument("--rows", type=int, default=12, help="table rows to print per backend (default 12)")


def run(args: argparse.Namespace) -> int:
    from densenet_debug.reference.check import load_reference, reference_oracle

    device = resolve_device(args.device) if args.device else None
    fixture, model = load_reference(args.fixture, spec=args.model)
    loaded = (fixture, model, *reference_oracle(fixture, model))
    shared: dict = {}
    results = [check_reference(fixture, b, device=device, loaded=loaded, shared=shared)
               for b in (args.backend or [None])]
    for r in results:
        print(r.table(args.rows))
        print(r.summary)
    if args.json:
        data = results[0].to_json() if len(results) == 1 else {
            "schema": "densenet-debug/check-reference-many/1", "results": [r.to_json() for r in results]}
        write_text(args.json, json.dumps(data, indent=1) + "\n")
    return 0 if all(r.verdict == "agree" for r in results) else 1
