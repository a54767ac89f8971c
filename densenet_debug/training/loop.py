"""Train a DenseNet the way the seed did, resumably, on one process or many, optionally auditing gradients.

The seed's recipe (bamos/densenet.pytorch ``train.py``, matching the paper and the Lua code): batch 64,
300 epochs, SGD lr 0.1 momentum 0.9 weight decay 1e-4 on every parameter, lr x0.1 at epoch 150 and 225
(1-based: 50 % and 75 % of training), random crop with 4-pixel padding + horizontal flip, per-dataset
normalization. Adam and RMSprop keep their library-default lr and, as in the seed, no schedule.

Per epoch: ``train.csv`` rows as batches finish, a ``test.csv`` row, then ``checkpoint.pt`` (atomic), then
``loss-error.png``. Written in that order, a crash anywhere leaves files that ``resume`` can make
consistent: it loads the checkpoint and cuts every CSV back to the checkpoint's epoch.

One writer per work directory: rank 0 holds ``atomic.exclusive`` on it (``.NAME.lock`` beside it) for the whole
run, so a second ``train --save`` of the same directory exits 2 naming the holder, and temporaries left by a
killed run (``.checkpoint.pt.xxxxxxxx.pt``, ...) are removed before anything is read.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug import atomic
from densenet_debug.backends import resolve_device
from densenet_debug.distributed import runtime as ddp
from densenet_debug.errors import UsageError
from densenet_debug.models import BUILDERS, DEFAULT_MODEL, resolve_model
from densenet_debug.training.checkpoint import (
    FILENAME,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from densenet_debug.training.data import (
    NUM_CLASSES,
    ImageSet,
    batches,
    load_dataset,
    num_batches,
    require_dataset,
    synthetic_dataset,
)
from densenet_debug.training.progress import ConsoleProgress, ProgressLogs

OPTIMIZERS = ("sgd", "adam", "rmsprop")
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "rmsprop": 1e-2}  # sgd: the paper's; others: torch's defaults
# Settings a resumed run must share with its checkpoint (they shape the weights or the data order).
RESUME_KEYS = ("model", "num_classes", "dataset", "synthetic", "input_shape", "batch_size", "opt", "seed")


@dataclass
class TrainConfig:
    """Everything a run depends on; the CLI flags map one to one onto these fields."""

    save: str = "work/cifar10.base"
    model: str = DEFAULT_MODEL
    num_classes: int | None = None
    input_shape: tuple[int, ...] = (3, 32, 32)
    dataset: str = "cifar10"
    data_root: str = "data"
    synthetic: bool = False
    synthetic_size: int = 4096
    epochs: int = 300
    batch_size: int = 64
    opt: str = "sgd"
    lr: float | None = None
    lr_schedule: str | None = None  # multistep | constant; None: multistep for sgd, constant otherwise
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    seed: int = 1
    device: str | None = None
    memory_efficient: bool = False
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    resume: bool = False
    limit_batches: int | None = None
    audit_every: int = 0
    audit_backend: str | None = None
    audit_layers: int | None = None
    audit_ops: bool = False
    plot: bool = True
    progress: bool = True

    def schedule(self) -> str:
        return self.lr_schedule or ("multistep" if self.opt == "sgd" else "constant")

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.opt]


@dataclass
class TrainResult:
    epochs_done: int
    test_loss: float
    test_error_pct: float
    workdir: Path


def lr_at(epoch: int, epochs: int, base: float, schedule: str) -> float:
    """Learning rate of 1-based ``epoch``: x0.1 once epoch >= 50 % and again once >= 75 % of ``epochs``.

    For 300 epochs: 0.1 up to 149, 0.01 from 150, 0.001 from 225 (the seed's and Lua's). The first epoch
    always runs at ``base`` (short smoke runs). A pure function of the epoch (the seed mutated the optimizer
    at epochs 150 and 225, which only works when every epoch is visited in order), so resuming is exact.
    """
    if schedule == "constant":
        return base
    if schedule != "multistep":
        raise UsageError(f"unknown lr schedule {schedule!r}; use multistep or constant")
    drops = sum(epoch >= max(2, math.ceil(f * epochs)) for f in (0.5, 0.75))
    return base * 0.1**drops


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    lr, wd = config.base_lr(), config.weight_decay
    if config.opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd, nesterov=config.nesterov)
    if config.opt == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if config.opt == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    raise UsageError(f"unknown optimizer {config.opt!r}; choose one of {', '.join(OPTIMIZERS)}")


def load_data(config: TrainConfig) -> tuple[ImageSet, ImageSet]:
    if config.synthetic:
        classes = config.num_classes or 10
        train = synthetic_dataset(config.synthetic_size, config.input_shape, classes, seed=config.seed)
        test = synthetic_dataset(max(config.synthetic_size // 4, 1), config.input_shape, classes,
                                 seed=config.seed + 1)
        return train, test
    if tuple(config.input_shape) != (3, 32, 32):
        raise UsageError(f"{config.dataset} images are 3,32,32; --input-shape applies to --synthetic only")
    return load_dataset(config.dataset, config.data_root, "train"), load_dataset(config.dataset, config.data_root,
                                                                                  "test")


def build_training_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The model ``config.model`` names, checked to map ``input_shape`` to ``num_classes`` logits."""
    if config.num_classes is not None and config.num_classes != num_classes:
        raise UsageError(f"--num-classes {config.num_classes} but {config.dataset} has {num_classes} classes")
    kwargs = {}
    if config.memory_efficient:
        if config.model not in BUILDERS:
            raise UsageError("--memory-efficient applies to the built-in DenseNets; build your model with "
                             "checkpointing instead")
        kwargs["memory_efficient"] = True
    torch.manual_seed(config.seed)  # same initial weights on every rank and every run with this seed
    model = resolve_model(config.model, num_classes=num_classes, **kwargs)
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *config.input_shape))
    except Exception as exc:
        raise UsageError(f"model {config.model} does not accept inputs of shape "
                         f"{','.join(map(str, config.input_shape))}: {type(exc).__name__}: {exc}") from exc
    model.train(was)
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_classes):
        raise UsageError(f"model {config.model} must return (batch, {num_classes}) logits, "
                         f"got {tuple(getattr(out, 'shape', ()))}")
    return model


WORKDIR_FILES = (FILENAME, "config.json", "train.csv", "test.csv", "audit.csv", "loss-error.png")


def prepare_workdir(config: TrainConfig) -> dict | None:
    """Refuse a non-empty save directory unless resuming; return the checkpoint to resume from, if any.

    Hidden entries (temporaries of a killed writer, which the lock holder removes) do not make it non-empty.
    """
    workdir = Path(config.save)
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--save {workdir} exists and is not a directory")
    entries = sorted(p.name for p in workdir.iterdir() if not p.name.startswith(".")) if workdir.is_dir() else []
    if entries and not config.resume:
        raise UsageError(f"save directory {workdir} is not empty ({len(entries)} entries) and is never deleted: "
                         f"pass --resume to continue it, or choose another --save")
    ckpt = workdir / FILENAME
    if config.resume and ckpt.exists():
        return load_checkpoint(ckpt)
    return None


def resolve_train_device(config: TrainConfig) -> torch.device:
    return resolve_device(config.device)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as ``config`` says; see the module docstring for what is written where."""
    if config.batch_size <= 0 or config.epochs <= 0:
        raise UsageError("--batch-size and --epochs must be positive")
    if config.opt not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {config.opt!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr_at(1, config.epochs, 1.0, config.schedule())  # validates the schedule name
    device = resolve_train_device(config)
    info = ddp.init_from_env(device)
    try:
        return _train(config, ddp.local_device(device, info), info)
    finally:
        ddp.shutdown(info)


def _train(config: TrainConfig, device: torch.device, info: ddp.DistInfo) -> TrainResult:
    workdir = Path(config.save)
    if not info.is_main:
        return _train_locked(config, device, info)
    with atomic.exclusive(workdir, what=f"training directory {workdir}"):
        for name in WORKDIR_FILES:
            atomic.clean_leftovers(workdir / name)
        return _train_locked(config, device, info)


def _train_locked(config: TrainConfig, device: torch.device, info: ddp.DistInfo) -> TrainResult:
    workdir = Path(config.save)
    state = prepare_workdir(config)  # every rank checks before any rank writes
    ddp.barrier(info)
    classes = (config.num_classes or 10) if config.synthetic else NUM_CLASSES.get(config.dataset, 0)
    record = _record(config, classes)
    if state is not None:
        check_compatible(state["config"], record, RESUME_KEYS)
        if int(state["epoch"]) > config.epochs:
            raise UsageError(f"cannot resume: {workdir} has already run {state['epoch']} epochs, more than "
                             f"--epochs {config.epochs}; pass --epochs {state['epoch']} or more")
    if not config.synthetic:
        if tuple(config.input_shape) != (3, 32, 32):
            raise UsageError(f"{config.dataset} images are 3,32,32; --input-shape applies to --synthetic only")
        require_dataset(config.dataset, config.data_root)  # missing files: one line before any real work
    model = build_training_model(config, classes)  # before reading the data: a bad --model fails in seconds
    train_set, test_set = load_data(config)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        start = int(state["epoch"])
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), config)
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if config.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
    net = ddp.wrap(model, info, device, config.sync_bn)
    if config.compile:
        net = torch.compile(net)
    base = ddp.unwrap(net)  # the module whose state we save (SyncBatchNorm-converted when --sync-bn)

    logs = ProgressLogs(workdir) if info.is_main else None
    console = ConsoleProgress(enabled=config.progress and info.is_main)
    auditor = _make_auditor(config, device, logs, info)
    if logs is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        logs.truncate(start)
        atomic.write_text(workdir / "config.json", json.dumps(record, indent=2) + "\n")
        n_params = sum(p.numel() for p in base.parameters())
        where = f"resuming after epoch {start}" if state is not None else "starting"
        console.note(f"{config.model}: {n_params:,} parameters; {where}; {config.epochs} epochs of "
                     f"{num_batches(len(train_set), config.batch_size, config.limit_batches, info.world_size)} "
                     f"batches of {config.batch_size} on {info.world_size} x {device}; writing {workdir}")
    test_loss = test_err = float("nan")
    try:
        for epoch in range(start + 1, config.epochs + 1):
            lr = lr_at(epoch, config.epochs, config.base_lr(), config.schedule())
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            train_loss, train_err = _train_epoch(net, optimizer, scaler, train_set, config, epoch, device, info,
                                                 logs, console, amp_dtype, auditor, lr)
            test_loss, test_err = evaluate(net, test_set, config, device, info, amp_dtype)
            if logs is not None:
                logs.test.append([epoch, test_loss, test_err, train_loss, train_err, lr,
                                  time.perf_counter() - t0])
                save_checkpoint(workdir / FILENAME, model=base, optimizer=optimizer, epoch=epoch, config=record,
                                scaler=scaler)
                console.end_epoch(f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f} err "
                                  f"{train_err:.2f}% | test loss {test_loss:.4f} err {test_err:.2f}% | lr {lr:g}")
                if config.plot:
                    _plot(workdir, console)
            ddp.barrier(info)
    finally:
        if logs is not None:
            logs.close()
    if start == config.epochs and logs is not None:  # resumed a finished run: report its last test row
        last = [r for r in logs.test.rows() if int(r["epoch"]) == start]
        if last:
            test_loss, test_err = float(last[-1]["loss"]), float(last[-1]["error_pct"])
    return TrainResult(max(start, config.epochs), test_loss, test_err, workdir)


def _record(config: TrainConfig, num_classes: int) -> dict:
    record = asdict(config)
    record.update(num_classes=num_classes, input_shape=list(config.input_shape), lr=config.base_lr(),
                  lr_schedule=config.schedule())
    return record


def _train_epoch(net, optimizer, scaler, data, config, epoch, device, info, logs, console, amp_dtype, auditor,
                 lr) -> tuple[float, float]:
    net.train()
    total = num_batches(len(data), config.batch_size, config.limit_batches, info.world_size)
    console.start_epoch(epoch, config.epochs, total)
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, wrong, n over the epoch (all ranks)
    tick = time.perf_counter()
    for i, (x, y) in enumerate(batches(data, config.batch_size, train=True, epoch=epoch, seed=config.seed,
                                       rank=info.rank, world_size=info.world_size, limit=config.limit_batches,
                                       device=device)):
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        step = (epoch - 1) * total + i + 1
        if auditor is not None and auditor.due(step):
            audit_start = time.perf_counter()
            auditor.run(net, x, y, epoch, step)
            tick += time.perf_counter() - audit_start  # the audit's time is not training throughput
        with _autocast(device, amp_dtype):
            out = net(x)
            loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = _grad_norm(net)
        scaler.step(optimizer)
        scaler.update()
        batch = torch.tensor([loss.item() * len(y), (out.argmax(1) != y).sum().item(), len(y)], dtype=torch.float64)
        batch = ddp.all_reduce_sum(batch.to(device), info).cpu()
        sums += batch
        now = time.perf_counter()
        images_per_s = batch[2].item() / max(now - tick, 1e-9)
        tick = now
        b_loss, b_err = batch[0].item() / batch[2].item(), 100.0 * batch[1].item() / batch[2].item()
        if logs is not None:
            partial = f"{epoch - 1 + i / total:.6f}"  # fixed point: plot infers batches per epoch from it
            logs.train.append([epoch, i + 1, partial, b_loss, b_err, lr, images_per_s, grad_norm])
        console.advance(b_loss, b_err, images_per_s)
    return sums[0].item() / max(sums[2].item(), 1), 100.0 * sums[1].item() / max(sums[2].item(), 1)


@torch.no_grad()
def evaluate(net: nn.Module, data: ImageSet, config: TrainConfig, device: torch.device, info: ddp.DistInfo,
             amp_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Mean loss per sample and error in percent over the test set (all ranks' shares summed)."""
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in batches(data, config.batch_size, train=False, rank=info.rank, world_size=info.world_size,
                        limit=config.limit_batches, device=device):
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            out = net(x)
        sums += torch.stack([F.cross_entropy(out.float(), y, reduction="sum").double(),
                             (out.argmax(1) != y).sum().double(), torch.tensor(len(y), device=device).double()])
    sums = ddp.all_reduce_sum(sums, info).cpu()
    n = max(sums[2].item(), 1)
    return sums[0].item() / n, 100.0 * sums[1].item() / n


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _grad_norm(net: nn.Module) -> float:
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


def _plot(workdir: Path, console: ConsoleProgress) -> None:
    from densenet_debug.training.plot import plot_progress

    try:
        plot_progress(workdir)
    except Exception as exc:  # a plot must never stop training
        console.note(f"plot skipped: {type(exc).__name__}: {exc}")


def _make_auditor(config: TrainConfig, device: torch.device, logs: ProgressLogs | None, info: ddp.DistInfo):
    if not config.audit_every:
        return None
    from densenet_debug.training.audit import GradientAudit

    return GradientAudit.from_config(config, device, logs.audit if logs is not None else None, info)


__all__ = ["NUM_CLASSES", "TrainConfig", "TrainResult", "evaluate", "lr_at", "make_optimizer", "train"]
