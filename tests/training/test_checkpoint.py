"""Checkpoints: atomic, loaded with weights_only=True, refused when foreign, compatible-settings check."""

from __future__ import annotations

import pytest
import torch

from densenet_debug.errors import UsageError
from densenet_debug.training.checkpoint import check_compatible, load_checkpoint, save_checkpoint, set_rng_state


class _NotAllowed:
    pass


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path, tiny_model):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    torch.manual_seed(7)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model=model, optimizer=opt, epoch=3, config={"model": "densenet-bc-16"})
    expected = torch.rand(5)  # the draw right after saving
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["config"] == {"model": "densenet-bc-16"}
    fresh = tiny_model(seed=1)
    fresh.load_state_dict(state["model"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(state["optimizer"])
    bufs = [opt2.state[p]["momentum_buffer"] for p in fresh.parameters()]
    assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(bufs, model.parameters()))
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(5), expected)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "densenet-debug/checkpoint/1", "payload": _NotAllowed()}, path)
    with pytest.raises(UsageError, match="not a readable checkpoint"):
        load_checkpoint(path)
    torch.save({"epoch": 1}, path)
    with pytest.raises(UsageError, match="not a densenet-debug checkpoint"):
        load_checkpoint(path)


def test_check_compatible():
    check_compatible({"model": "a", "seed": 1}, {"model": "a", "seed": 1, "lr": 2}, ("model", "seed"))
    with pytest.raises(UsageError, match="model 'a' -> 'b'"):
        check_compatible({"model": "a"}, {"model": "b"}, ("model",))
