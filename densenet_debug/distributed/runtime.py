"""Multi-process data parallelism (torch.distributed): setup under torchrun, and a gradient check.

Under ``torchrun --nproc_per_node N -m densenet_debug train ...`` every process calls :func:`init_from_env`
(gloo on CPU, NCCL on CUDA, one GPU per local rank); rank 0 alone writes logs, checkpoints and plots.

:func:`ddp_gradients` runs one forward+backward of a model under ``DistributedDataParallel`` in real
processes (spawned, localhost, gloo) and returns the parameter gradients, to compare with a single process:

- with every BatchNorm synchronized (``sync_bn=True``; PyTorch's SyncBatchNorm runs on CUDA only) or in eval
  mode, DDP's averaged gradients equal the single-process full-batch gradients (:func:`batch_gradients`);
- with plain BatchNorm in training mode, each process normalizes its own shard with that shard's statistics,
  so DDP computes the mean over shards of each shard's own gradient (:func:`shard_gradients`), which differs
  from the full batch's by the difference in batch statistics: that is BN semantics, not a DDP fault.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from densenet_debug import atomic
from densenet_debug.errors import UsageError

LossFn = Callable[[Tensor, Tensor], Tensor]
# PyTorch's stock DDP communication hooks (torch.distributed.algorithms.ddp_comm_hooks.default_hooks).
COMM_HOOKS = {"allreduce": "allreduce_hook", "fp16_compress": "fp16_compress_hook",
              "bf16_compress": "bf16_compress_hook"}


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment; a single process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return DistInfo(rank, world, local)


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if device.type == "cuda" and info.enabled else device


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's decision, on every rank (used so all processes stop together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def wrap(model: nn.Module, info: DistInfo, device: torch.device, sync_bn: bool) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (after SyncBatchNorm conversion when asked)."""
    if sync_bn:
        if device.type != "cuda":
            raise UsageError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on CPU; without it each "
                             "process normalizes its own shard")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP and/or torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every SyncBatchNorm turned back into a BatchNorm2d (same state): safe to run on one rank."""
    model = copy.deepcopy(model)

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            bn.load_state_dict(m.state_dict())
            bn.train(m.training)
            return bn.to(next(iter(m.state_dict().values())).device)
        for name, child in m.named_children():
            setattr(m, name, convert(child))
        return m

    return convert(model)


# -- the gradient check -------------------------------------------------------------------------------------


def batch_gradients(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = F.cross_entropy) -> dict[str, Tensor]:
    """Single process, whole batch: parameter gradients of ``loss_fn(model(x), y)`` (model left untouched)."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def shard_gradients(
    model: nn.Module, x: Tensor, y: Tensor, world_size: int, loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Tensor]:
    """Single process, what unsynchronized BN under DDP computes: the mean of each shard's own gradient."""
    total: dict[str, Tensor] = {}
    for xs, ys in zip(shards(x, world_size), shards(y, world_size)):
        for name, g in batch_gradients(model, xs, ys, loss_fn).items():
            total[name] = total[name] + g if name in total else g
    return {name: g / world_size for name, g in total.items()}


def shards(t: Tensor, world_size: int) -> list[Tensor]:
    """``t`` split along the batch into ``world_size`` equal contiguous shards, one per rank."""
    if t.shape[0] % world_size:
        raise UsageError(f"batch of {t.shape[0]} does not split evenly over {world_size} processes")
    return list(t.chunk(world_size))


def ddp_gradients(
    model: nn.Module, x: Tensor, y: Tensor, *, world_size: int = 2, sync_bn: bool = False, spec: str | None = None,
    num_classes: int | None = None, device: str = "cpu", backend: str | None = None, comm_hook: str | None = None,
    timeout: float = 300.0,
) -> dict[str, Tensor]:
    """Parameter gradients of one DDP step on ``world_size`` real processes, each taking a contiguous shard.

    The children rebuild the model from ``spec`` (a ``--model`` string) or, for a :class:`DenseNet`, from its
    ``config``; weights, BN buffers, train/eval mode, inputs and labels travel in a ``torch.save`` file read
    back with ``weights_only=True``. ``device="cuda"`` uses NCCL with one GPU per process. ``backend`` (a
    ``diff`` backend spec) prepares each process's model and runs its step under that backend's flags. Each
    process computes with one thread, so a single process with one thread reproduces its shard bit for bit.
    ``comm_hook`` names one of PyTorch's DDP communication hooks (:data:`COMM_HOOKS`), e.g. ``fp16_compress``.
    """
    if comm_hook is not None and comm_hook not in COMM_HOOKS:
        raise UsageError(f"unknown DDP communication hook {comm_hook!r}; valid: {', '.join(COMM_HOOKS)}")
    shards(y, world_size)
    build = spec if spec is not None else getattr(model, "config", None)
    if build is None:
        raise UsageError("ddp_gradients needs spec= (a --model string) to rebuild this model in each process")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise UsageError(f"DDP on CUDA needs {world_size} GPUs, {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="densenet-debug-ddp-") as tmp:
        bundle = {"state": model.state_dict(), "training": model.training, "x": x.detach().cpu(),
                  "y": y.detach().cpu(), "build": build, "num_classes": num_classes, "sync_bn": sync_bn,
                  "device": device, "backend": backend,
                  "comm_hook": comm_hook}
        torch.save(bundle, Path(tmp) / "input.pt")
        # Plain child processes (not multiprocessing's spawn, which re-imports the caller's __main__).
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        logs = [Path(tmp) / f"rank{rank}.log" for rank in range(world_size)]
        procs = []
        for rank, log in enumerate(logs):
            with open(log, "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "densenet_debug.distributed.runtime", tmp, str(rank), str(world_size)],
                    env=env, stdout=subprocess.DEVNULL, stderr=err))
        try:
            for proc in procs:
                proc.wait(timeout=timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        for rank, (proc, log) in enumerate(zip(procs, logs)):
            # gloo can abort in its own teardown (a C++ thread left joinable at exit) after the step is done;
            # a rank that passed the final barrier and wrote its marker has delivered its result.
            if proc.returncode and not (Path(tmp) / f"rank{rank}.done").exists():
                lines = log.read_text().strip().splitlines()
                raise RuntimeError(f"DDP process {rank} exited with code {proc.returncode}: "
                                   f"{lines[-1] if lines else 'no output'}")
        return torch.load(Path(tmp) / "grads.pt", weights_only=True)


def _worker(tmp: str, rank: int, world_size: int) -> None:
    from densenet_debug.backends import parse_backend
    from densenet_debug.models import DenseNet, resolve_model

    torch.set_num_threads(1)
    bundle = torch.load(Path(tmp) / "input.pt", weights_only=True)
    device = torch.device("cuda", rank) if bundle["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/rendezvous",
                            rank=rank, world_size=world_size, timeout=timedelta(minutes=5))
    try:
        build = bundle["build"]
        model = resolve_model(build, bundle["num_classes"]) if isinstance(build, str) else DenseNet(**build)
        model.load_state_dict(bundle["state"])
        model.train(bundle["training"])
        x = bundle["x"].chunk(world_size)[rank]
        y = bundle["y"].chunk(world_size)[rank].to(device)
        if bundle["backend"]:
            backend = parse_backend(bundle["backend"], device)
            model, x, active = backend.prepare_model(model), backend.prepare_input(x), backend.active()
        else:
            model, x, active = model.to(device), x.to(device), nullcontext()
        if bundle["sync_bn"]:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if bundle["comm_hook"]:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, getattr(default_hooks, COMM_HOOKS[bundle["comm_hook"]]))
        with active:
            F.cross_entropy(ddp(x), y).backward()
        if rank == 0:
            grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
            with atomic.writing_file(Path(tmp) / "grads.pt") as out:
                torch.save(grads, out)
        dist.barrier()
        (Path(tmp) / f"rank{rank}.done").touch()
    finally:
        dist.destroy_process_group()


# One process of ddp_gradients: python -m densenet_debug.distributed.runtime TMPDIR RANK WORLD_SIZE
if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
