"""``densenet-debug record``: write a reference fixture (float64 CPU truth of one training step)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from densenet_debug.atomic import check_output, exclusive
from densenet_debug.cli._common import (
    add_model_args,
    add_quiet_arg,
    add_seed_arg,
    add_threads_arg,
    load_model,
    positive_int,
)
from densenet_debug.errors import UsageError
from densenet_debug.models.batch import check_batch_of_one, output_classes
from densenet_debug.reference.record import (
    DEFAULT_MAX_MB,
    POLICIES,
    OracleDisagreement,
    generate_batch,
    record_reference,
)

HELP = "record a reference fixture: float64 CPU truth of a training step, layer by layer"
EXIT_CODES = {0: "recorded", 1: "refused: the NumPy oracle disagrees with PyTorch fp64",
              2: "e.g. an existing fixture without --force, another process recording the same name"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="fixture name: the directory OUT_DIR/NAME")
    add_model_args(parser, batch=2)
    add_seed_arg(parser)
    parser.add_argument("--steps", type=positive_int, default=1, help="training steps to record (default 1)")
    parser.add_argument("--eval", action="store_true", help="BN in eval mode (running statistics) during the step")
    parser.add_argument("--out-dir", default="reference_grads", help="where fixtures live (default reference_grads)")
    parser.add_argument("--policy", choices=POLICIES, default="auto",
                        help="full: every quantity of every unit; checkpoints: parameter grads, buffers and the "
                             "tensors feeding multi-input units, the rest recomputed and verified at check time; "
                             "auto: full when it fits in --max-mb (default auto)")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB,
                        help=f"size limit for --policy auto to store everything (default {DEFAULT_MAX_MB:g})")
    parser.add_argument("--ops", action="store_true",
                        help="also store the float64 oracle's op capture of the first step (every aten op forward and "
                             "backward, its layouts, arguments and values; schema 4), so that check-reference --ops "
                             "judges a backend op by op")
    parser.add_argument("--force", action="store_true", help="replace an existing fixture of that name")
    add_threads_arg(parser)
    add_quiet_arg(parser)


def run(args: argparse.Namespace) -> int:
    if not args.name or "/" in args.name or args.name.startswith("."):
        raise UsageError(f"bad fixture name {args.name!r}: use a plain directory name")
    target = Path(args.out_dir) / args.name
    check_output(target, "--out-dir/--name", directory=True)
    with exclusive(target, what=f"fixture {target}"):  # one writer per name, for the whole recording
        return _record(args, target)


def _record(args: argparse.Namespace, target: Path) -> int:
    if target.exists() and not args.force:
        raise UsageError(f"{target} exists; pass --force to replace it")
    torch.manual_seed(args.seed)
    model = load_model(args)
    classes = args.num_classes or output_classes(model, torch.zeros(2, *args.input_shape), args.model)
    if args.batch == 1:
        check_batch_of_one(model, torch.zeros(1, *args.input_shape), classes, args.model)
    model.train()
    x, y, how = generate_batch(args.batch, args.seed, args.input_shape, classes)
    how["weights"] = f"torch.manual_seed({args.seed}) then the model's constructor"
    try:
        # how load_model called the factory: check-reference calls it the same way
        called = {} if args.num_classes is None else {"num_classes": args.num_classes}
        path = record_reference(model, x, y, target, name=args.name, spec=args.model, factory_kwargs=called,
                                data=how, steps=args.steps, eval_mode=args.eval, policy=args.policy,
                                max_mb=args.max_mb, ops=args.ops)
    except OracleDisagreement as exc:
        print(f"densenet-debug record: refused: {exc}")
        return 1
    size = sum(p.stat().st_size for p in path.iterdir())
    from densenet_debug.reference.meta import read_meta

    meta = read_meta(path)
    rebuild = "" if meta["model"]["kind"] == "builder" else (
        f"; check it with --model {args.model} (the fixture stores {meta['model']['spec']} and never imports it)")
    ops = f", {meta['ops']['records']} ops captured" if "ops" in meta else ""
    print(f"recorded {path}: {args.model}, batch {args.batch}, seed {args.seed}, {args.steps} step(s), "
          f"BN {'eval' if args.eval else 'train'}, policy {meta['storage']['policy']}{ops}, "
          f"{size / 1e6:.2f} MB, cross-check {meta['truth']['cross_check']['status']}{rebuild}")
    return 0
