"""DistributedDataParallel in real processes (gloo, localhost): gradients vs one process, and torchrun training."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from densenet_debug import build_model
from densenet_debug.distributed.runtime import (
    batch_gradients,
    ddp_gradients,
    revert_sync_batchnorm,
    shard_gradients,
    unwrap,
)
from densenet_debug.training.checkpoint import load_checkpoint


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in a)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("densenet-bc-10")
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_shard_gradients_reduce_to_the_batch_gradient_without_batch_statistics(setup):
    model, x, y = setup
    # One shard is the batch; in eval mode BN uses running statistics, so the shards' mean is the batch's.
    torch.testing.assert_close(shard_gradients(model, x, y, 1), batch_gradients(model, x, y), rtol=0, atol=0)
    model.eval()
    try:
        want, got = batch_gradients(model, x, y), shard_gradients(model, x, y, 4)
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)
    finally:
        model.train()
    # In training mode they differ: each shard is normalized with its own statistics.
    assert _max_rel(shard_gradients(model, x, y, 2), batch_gradients(model, x, y)) > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm across processes needs 2 GPUs")
def test_sync_bn_ddp_equals_the_full_batch_gradient_on_cuda(setup):
    model, x, y = setup
    got = ddp_gradients(model.train(), x, y, world_size=2, sync_bn=True, device="cuda")
    gpu = model.to("cuda")
    try:
        full = batch_gradients(gpu, x.cuda(), y.cuda())
        ghost = shard_gradients(gpu, x.cuda(), y.cuda(), 2)
    finally:
        model.cpu()
    full = {k: v.cpu() for k, v in full.items()}
    # Synchronized statistics remove the per-shard BN effect: what is left is the summation-order (and TF32)
    # noise of the kernels, orders of magnitude below the unsynchronized difference it replaces.
    assert _max_rel(got, full) < 1e-2 * _max_rel({k: v.cpu() for k, v in ghost.items()}, full)


def test_revert_sync_batchnorm_and_unwrap(tiny_model, batch):
    model = tiny_model()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    plain = revert_sync_batchnorm(synced)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    assert plain.state_dict().keys() == synced.state_dict().keys()
    x, _ = batch(4)
    torch.testing.assert_close(plain.eval()(x), tiny_model().eval()(x), rtol=0, atol=0)
    assert unwrap(plain) is plain


def test_torchrun_two_processes_train_with_rank0_logging(tmp_path):
    save = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "densenet_debug", "train", "--model", "densenet-bc-10", "--synthetic", "--input-shape", "3,8,8",
           "--synthetic-size", "96", "--batch-size", "16", "--epochs", "2", "--limit-batches", "3", "--no-plot",
           "--quiet", "--save", str(save)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(save / "train.csv") as f:
        rows = list(csv.DictReader(f))
    # Rank 0 alone writes: each (epoch, batch) once; the logged loss covers the global batch of 16.
    assert [(r["epoch"], r["batch"]) for r in rows] == [(str(e), str(b)) for e in (1, 2) for b in (1, 2, 3)]
    assert load_checkpoint(save / "checkpoint.pt")["epoch"] == 2
    with open(save / "test.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
