"""Training loop (in-process): seed settings, CSV schema, checkpoints, refusals, modes that must not change math."""

from __future__ import annotations

import csv

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_debug.distributed.runtime import DistInfo
from densenet_debug.errors import UsageError
from densenet_debug.training.checkpoint import load_checkpoint
from densenet_debug.training.data import synthetic_dataset
from densenet_debug.training.loop import TrainConfig, evaluate, lr_at, make_optimizer, train
from densenet_debug.training.progress import TEST_COLUMNS, TRAIN_COLUMNS


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(save=str(tmp_path / "run"), model="densenet-bc-10", synthetic=True, input_shape=(3, 8, 8),
                synthetic_size=64, batch_size=16, epochs=2, limit_batches=3, progress=False, plot=False)
    return TrainConfig(**{**base, **kw})


def _rows(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_seed_schedule_for_300_epochs():
    lrs = {e: lr_at(e, 300, 0.1, "multistep") for e in (1, 149, 150, 224, 225, 300)}
    assert lrs == pytest.approx({1: 0.1, 149: 0.1, 150: 0.01, 224: 0.01, 225: 0.001, 300: 0.001})
    assert lr_at(299, 300, 1e-3, "constant") == 1e-3


@settings(max_examples=30, deadline=None)
@given(epochs=st.integers(1, 500))
def test_schedule_steps_down_twice_by_ten(epochs):
    lrs = [lr_at(e, epochs, 0.1, "multistep") for e in range(1, epochs + 1)]
    assert lrs[0] == 0.1 and all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert {round(v / 0.1, 6) for v in lrs} <= {1.0, 0.1, 0.01}
    assert lrs[-1] == pytest.approx(0.001 if epochs >= 2 else 0.1)


def test_optimizers_use_the_seed_settings(tiny_model):
    params = list(tiny_model().parameters())
    sgd = make_optimizer(params, TrainConfig(nesterov=True))
    g = sgd.param_groups[0]
    assert (type(sgd), g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (
        torch.optim.SGD, 0.1, 0.9, 1e-4, True)
    adam = make_optimizer(params, TrainConfig(opt="adam"))
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["lr"] == 1e-3
    assert TrainConfig(opt="rmsprop").schedule() == "constant" and TrainConfig().schedule() == "multistep"


def test_run_writes_csvs_checkpoint_and_plot(tmp_path):
    result = train(tiny(tmp_path, epochs=3, plot=True))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "loss-error.png", "test.csv",
                                                    "train.csv"]
    assert (run / "train.csv").read_text().splitlines()[0] == ",".join(TRAIN_COLUMNS)
    assert (run / "test.csv").read_text().splitlines()[0] == ",".join(TEST_COLUMNS)
    rows = _rows(run / "train.csv")
    assert [(int(r["epoch"]), int(r["batch"])) for r in rows] == [(e, b) for e in (1, 2, 3) for b in (1, 2, 3)]
    partial = [float(r["partial_epoch"]) for r in rows]
    assert partial == pytest.approx([e + b / 3 for e in range(3) for b in range(3)], abs=1e-5)
    assert all(float(r["images_per_s"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)
    assert all(0 <= float(r["error_pct"]) <= 100 and float(r["loss"]) > 0 for r in rows)
    assert [float(r["lr"]) for r in rows[::3]] == pytest.approx([0.1, 0.01, 0.001])
    tests = _rows(run / "test.csv")
    assert [int(r["epoch"]) for r in tests] == [1, 2, 3]
    assert float(tests[-1]["error_pct"]) == pytest.approx(result.test_error_pct, abs=1e-3)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 3 and state["config"]["model"] == "densenet-bc-10"
    assert (run / "loss-error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_empty_save_dir_is_never_touched(tmp_path):
    (tmp_path / "run").mkdir()
    keep = tmp_path / "run" / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(UsageError, match="is not empty .* never deleted: pass --resume"):
        train(tiny(tmp_path))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"] and keep.read_text() == "mine"


def test_resume_without_checkpoint_restarts_and_drops_partial_rows(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.csv").write_text(",".join(TRAIN_COLUMNS) + "\n1,1,0,2.3,90,0.1,10,1\n1,2,0.3,2.")  # died in epoch 1
    train(tiny(tmp_path, resume=True, epochs=1))
    assert [(r["epoch"], r["batch"]) for r in _rows(run / "train.csv")] == [("1", "1"), ("1", "2"), ("1", "3")]


def test_resume_continues_and_refuses_other_settings(tmp_path):
    train(tiny(tmp_path, epochs=1))
    train(tiny(tmp_path, epochs=2, resume=True))
    assert [r["epoch"] for r in _rows(tmp_path / "run" / "test.csv")] == ["1", "2"]
    with pytest.raises(UsageError, match="cannot resume.*batch_size 16 -> 32"):
        train(tiny(tmp_path, epochs=3, resume=True, batch_size=32))


@pytest.mark.parametrize("kw, message", [
    (dict(synthetic=False, input_shape=(3, 32, 32), data_root="/nonexistent"), "cifar10 train data not found"),
    (dict(synthetic=False, input_shape=(3, 16, 16)), "3,32,32"),
    (dict(model="tests/nowhere.py:make", memory_efficient=True), "built-in DenseNets"),
    (dict(synthetic=False, input_shape=(3, 32, 32), dataset="svhn", data_root="/nonexistent"), "svhn train data"),
    (dict(num_classes=7, model="densenet-bc-10"), None),
    (dict(sync_bn=True), "needs CUDA"),
])
def test_bad_settings_are_usage_errors(tmp_path, kw, message):
    if message is None:  # a valid variation: synthetic data follow --num-classes
        assert train(tiny(tmp_path, epochs=1, **kw)).epochs_done == 1
        return
    with pytest.raises(UsageError, match=message):
        train(tiny(tmp_path, **kw))
    assert not (tmp_path / "run").exists()  # refused before writing anything


def test_memory_efficient_trains_the_same_numbers(tmp_path):
    train(tiny(tmp_path / "a", epochs=1))
    train(tiny(tmp_path / "b", epochs=1, memory_efficient=True))
    a, b = _rows(tmp_path / "a" / "run" / "train.csv"), _rows(tmp_path / "b" / "run" / "train.csv")
    # Same ops in the same order, recomputed: identical up to the CSV's 6 significant digits.
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


@pytest.mark.parametrize("kw", [dict(amp=True), dict(channels_last=True), dict(opt="adam"), dict(nesterov=True)])
def test_modes_train(tmp_path, kw):
    result = train(tiny(tmp_path, epochs=1, **kw))
    assert result.epochs_done == 1 and 0 < result.test_loss < 10


def test_evaluate_is_a_per_sample_mean(tiny_model):
    data = synthetic_dataset(10, (3, 32, 32), seed=0)
    model = tiny_model().eval()
    config = TrainConfig(batch_size=4)  # batches of 4, 4, 2: a mean of batch means would be wrong
    loss, err = evaluate(model, data, config, torch.device("cpu"), DistInfo())
    from densenet_debug.training.data import normalize

    with torch.no_grad():
        out = model(normalize(data.images, data.mean, data.std))
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(out, data.labels).item(), rel=1e-5)
    assert err == pytest.approx(100.0 * (out.argmax(1) != data.labels).float().mean().item())


@pytest.mark.gpu
def test_cuda_fp16_amp_channels_last_checkpoint_and_resume(tmp_path):
    cuda = dict(device="cuda", amp=True, channels_last=True, memory_efficient=True)
    train(tiny(tmp_path, epochs=1, **cuda))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["scaler"] and "scale" in state["scaler"]  # fp16 gradient scaling resumes where it was
    result = train(tiny(tmp_path, epochs=2, resume=True, **cuda))
    assert result.epochs_done == 2 and 0 < result.test_loss < 10
    assert [r["epoch"] for r in _rows(tmp_path / "run" / "test.csv")] == ["1", "2"]
