"""``densenet-debug train`` from the command line: flags, one-line errors, and resume after SIGKILL."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from densenet_debug.cli import build_parser, main
from densenet_debug.cli.train import config_from_args
from densenet_debug.training.checkpoint import load_checkpoint
from densenet_debug.training.loop import TrainConfig


def _config(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_defaults_are_the_seeds():
    c = _config()
    assert (c.batch_size, c.epochs, c.opt, c.base_lr(), c.momentum, c.weight_decay, c.nesterov, c.seed, c.save) == (
        64, 300, "sgd", 0.1, 0.9, 1e-4, False, 1, "work/cifar10.base")
    assert (c.model, c.dataset, c.schedule(), c.resume, c.audit_every) == (
        "densenet-bc-100", "cifar10", "multistep", False, 0)


def test_flags_map_onto_the_config():
    c = _config("--batchSz", "32", "--nEpochs", "10", "--opt", "adam", "--nesterov", "--seed", "5", "--save", "w",
                "--no-cuda", "--dataset", "svhn", "--data-root", "d", "--model", "densenet-bc-16",
                "--memory-efficient", "--amp", "--channels-last", "--compile", "--resume", "--synthetic",
                "--limit-batches", "3", "--audit-every", "7", "--audit-layers", "2", "--audit-backend", "native",
                "--lr", "0.05", "--lr-schedule", "constant", "--weight-decay", "0", "--input-shape", "3,16,16")
    assert (c.batch_size, c.epochs, c.opt, c.nesterov, c.seed, c.save, c.device) == (
        32, 10, "adam", True, 5, "w", "cpu")
    assert (c.dataset, c.data_root, c.model, c.memory_efficient, c.amp, c.channels_last, c.compile) == (
        "svhn", "d", "densenet-bc-16", True, True, True, True)
    assert (c.resume, c.synthetic, c.limit_batches, c.audit_every, c.audit_layers, c.audit_backend) == (
        True, True, 3, 7, 2, "native")
    assert (c.base_lr(), c.schedule(), c.weight_decay, c.input_shape) == (0.05, "constant", 0.0, (3, 16, 16))


@pytest.mark.parametrize("argv, fragment", [
    (["--epochs", "0"], "expected a positive integer"),
    (["--opt", "lbfgs"], "invalid choice"),
    (["--dataset", "mnist"], "invalid choice"),
    (["--lr", "-1"], "expected a positive number"),
    (["--data-root", "/nonexistent"], "cifar10 train data not found: put data_batch_1.bin"),
    (["--model", "nope", "--synthetic"], "unknown model"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, fragment):
    try:
        code = main(["train", "--save", str(tmp_path / "w"), *argv])
    except SystemExit as exc:  # argparse errors exit from parse_args
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1 and "Traceback" not in err


TINY = ["--model", "densenet-bc-10", "--synthetic", "--input-shape", "3,16,16", "--synthetic-size", "480",
        "--batch-size", "16", "--epochs", "3", "--no-plot", "--quiet"]


def _train_rows(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_resume_after_sigkill_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "densenet_debug", "train", *TINY, "--save", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = killed / "train.csv"
    deadline = time.monotonic() + 120
    try:
        # Kill once epoch 2 is under way: epoch 1's checkpoint exists, epoch 2's rows are half written.
        while not (log.exists() and any(line.startswith("2,5,") for line in log.read_text().splitlines())):
            assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-500:]}"
            assert time.monotonic() < deadline, "no epoch-2 progress within 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = load_checkpoint(killed / "checkpoint.pt")["epoch"]
    assert done < 3 and any(int(r["epoch"]) == done + 1 for r in _train_rows(log))  # died mid-epoch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process, so fp32 sums run in the same order: exact equality
    try:
        assert main(["train", *TINY, "--save", str(killed), "--resume"]) == 0
        reference = tmp_path / "reference"
        assert main(["train", *TINY, "--save", str(reference)]) == 0
    finally:
        torch.set_num_threads(threads)

    got, want = _train_rows(killed / "train.csv"), _train_rows(reference / "train.csv")
    assert [(r["epoch"], r["batch"]) for r in got] == [(str(e), str(b)) for e in (1, 2, 3) for b in range(1, 31)]
    assert [r["epoch"] for r in _train_rows(killed / "test.csv")] == ["1", "2", "3"]
    # Data order, augmentation, RNG, lr, optimizer state: all restored, so the very same trajectory.
    columns = ("epoch", "batch", "partial_epoch", "loss", "error_pct", "lr", "grad_norm")
    assert [[r[c] for c in columns] for r in got] == [[r[c] for c in columns] for r in want]
    sa, sb = load_checkpoint(killed / "checkpoint.pt")["model"], load_checkpoint(reference / "checkpoint.pt")["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
