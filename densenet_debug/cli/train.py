"""``densenet-debug train``: the seed's training script, resumable, multi-process, self-auditing."""

from __future__ import annotations

import argparse
import sys

from densenet_debug.atomic import check_output
from densenet_debug.cli._common import add_device_arg, add_model_args, add_threads_arg, positive_int
from densenet_debug.training.data import DATASETS
from densenet_debug.training.loop import OPTIMIZERS, TrainConfig, train

HELP = ("train a DenseNet on CIFAR-10/100 or SVHN (or synthetic data) with CSV progress, plots, checkpoints, "
        "resume, torchrun and a gradient audit")
EXIT_CODES = {0: "trained (or resumed) to --epochs", 1: "the gradient audit found a mismatch",
              2: "e.g. missing data, another process writing the same --save"}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    for action in parser._actions:  # the shared option means something more specific here
        if "--num-classes" in action.option_strings:
            action.help = "classes (default: the dataset's; 10 for --synthetic); must match the dataset"
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="cifar10", help="(default cifar10)")
    data.add_argument("--data-root", default="data",
                      help="folder holding cifar-10-batches-bin/, cifar-100-binary/ or svhn/ (default data)")
    data.add_argument("--synthetic", action="store_true",
                      help="random images with a learnable class signal instead of a dataset (smoke runs)")
    data.add_argument("--synthetic-size", type=positive_int, default=4096, help="training images (default 4096)")
    data.add_argument("--limit-batches", type=positive_int, default=None,
                      help="stop each epoch's training and test pass after N batches")
    opt = parser.add_argument_group("optimization (defaults: the seed's and the paper's)")
    opt.add_argument("--epochs", "--nEpochs", type=positive_int, default=300, help="(default 300)")
    opt.add_argument("--batch-size", "--batchSz", type=positive_int, default=64,
                     help="global batch, split over torchrun processes (default 64)")
    opt.add_argument("--opt", choices=OPTIMIZERS, default="sgd", help="(default sgd)")
    opt.add_argument("--lr", type=_positive_float, default=None,
                     help="base learning rate (default 0.1 for sgd, torch's default for adam/rmsprop)")
    opt.add_argument("--lr-schedule", choices=("multistep", "constant"), default=None,
                     help="multistep: x0.1 at 50%% and 75%% of the epochs (default for sgd); constant (default "
                          "for adam and rmsprop, as in the seed)")
    opt.add_argument("--momentum", type=_nonnegative_float, default=0.9, help="SGD momentum (default 0.9)")
    opt.add_argument("--weight-decay", type=_nonnegative_float, default=1e-4,
                     help="on every parameter, as in the seed (default 1e-4)")
    opt.add_argument("--nesterov", action="store_true", help="Nesterov momentum (the Lua code's and gpleiss')")
    opt.add_argument("--seed", type=int, default=1, help="weights, data order and augmentation (default 1, the "
                                                          "seed's)")
    run = parser.add_argument_group("run")
    run.add_argument("--save", default="work/cifar10.base",
                     help="work directory for CSVs, checkpoint and plot; never deleted (default work/cifar10.base)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --save from its last checkpoint (or from scratch if it has none)")
    add_device_arg(run)
    run.add_argument("--no-cuda", action="store_true", help="train on the CPU even when CUDA is present")
    run.add_argument("--memory-efficient", action="store_true",
                     help="recompute cat+BN+ReLU+1x1 conv in backward (torch.utils.checkpoint)")
    run.add_argument("--amp", action="store_true", help="autocast: float16 + grad scaling on CUDA, bfloat16 on CPU")
    run.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes (CUDA only)")
    run.add_argument("--no-plot", action="store_true", help="do not redraw loss-error.png after each epoch")
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    add_threads_arg(run)
    audit = parser.add_argument_group("gradient audit")
    audit.add_argument("--audit-every", type=positive_int, default=0, metavar="N",
                       help="every N steps, check each layer's gradients on the current batch against float64 "
                            "(teacher-forced); stop on a mismatch")
    audit.add_argument("--audit-backend", default=None, metavar="SPEC",
                       help="backend to audit (default: the one this run trains with, e.g. mkldnn on CPU, "
                            "cudnn[+channels_last][+bf16] on CUDA)")
    audit.add_argument("--audit-layers", type=positive_int, default=None, metavar="K",
                       help="check a random sample of K layers per audit instead of all")
    audit.add_argument("--audit-ops", action="store_true",
                       help="each audit also replays every aten op of the audited backend's step on the float64 "
                            "oracle's inputs to that op (the op engine of diff --ops); a failing op stops training")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    device = "cpu" if args.no_cuda else args.device
    return TrainConfig(
        save=args.save, model=args.model, num_classes=args.num_classes, input_shape=tuple(args.input_shape),
        dataset=args.dataset, data_root=args.data_root, synthetic=args.synthetic,
        synthetic_size=args.synthetic_size, epochs=args.epochs, batch_size=args.batch_size, opt=args.opt,
        lr=args.lr, lr_schedule=args.lr_schedule, momentum=args.momentum, weight_decay=args.weight_decay,
        nesterov=args.nesterov, seed=args.seed, device=device, memory_efficient=args.memory_efficient,
        amp=args.amp, channels_last=args.channels_last, compile=args.compile, sync_bn=args.sync_bn,
        resume=args.resume, limit_batches=args.limit_batches, audit_every=args.audit_every,
        audit_backend=args.audit_backend, audit_layers=args.audit_layers, audit_ops=args.audit_ops,
        plot=not args.no_plot, progress=not args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    from densenet_debug.training.audit import AuditFailure

    check_output(args.save, "--save", directory=True)
    try:
        result = train(config_from_args(args))
    except AuditFailure as exc:
        print(f"densenet-debug train: gradient audit failed: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"done: {result.epochs_done} epochs, test loss {result.test_loss:.4f}, "
              f"test error {result.test_error_pct:.2f}%; see {result.workdir}")
    return 0
