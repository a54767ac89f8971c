"""Training checkpoints: written atomically, read without pickle (``torch.load(weights_only=True)``).

A checkpoint is a plain dict of tensors and JSON-like values: model and optimizer state dicts, the AMP
scaler's state, the number of completed epochs, the RNG states (dropout draws from torch's generator; data
order and augmentation are derived from (seed, epoch) and need no state) and the run's configuration, so
``--resume`` can refuse a checkpoint of a different model or dataset. Reading checks every key and its type
(:func:`validate_checkpoint`): an empty file, a file of another program or one with our tag and a missing or
mistyped field is refused in one line naming the file and the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densenet_debug import atomic
from densenet_debug.errors import UsageError, describe

FORMAT = "densenet-debug/checkpoint/1"
FILENAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
    config: dict[str, Any], scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write the state after ``epoch`` completed epochs; the old file is replaced only once this one is whole."""
    state = {
        "format": FORMAT,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "rng": rng_state(),
        "config": config,
    }
    with atomic.writing_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """The checkpoint dict; a file that is not one of ours (or needs pickle) is a one-line UsageError."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise UsageError(f"{path}: empty file, not a checkpoint (a copy cut short?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt file, or one that would need arbitrary unpickling
        raise UsageError(f"{path}: not a readable checkpoint ({describe(exc)})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path}: not a densenet-debug checkpoint (format {FORMAT})")
    validate_checkpoint(state, path)
    return state


# key -> (type, what it must be); "scaler" may be empty (no AMP) but must be a dict.
_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "epoch": (int, "the number of completed epochs"),
    "model": (dict, "the model's state dict"),
    "optimizer": (dict, "the optimizer's state dict"),
    "scaler": (dict, "the AMP scaler's state (may be empty)"),
    "rng": (dict, "the RNG states"),
    "config": (dict, "the run's configuration"),
}


def validate_checkpoint(state: dict[str, Any], path: str | os.PathLike = "checkpoint") -> None:
    """Every key :func:`save_checkpoint` writes, with its type; a missing or wrong one is named in one line."""
    for key, (kind, what) in _FIELDS.items():
        if key not in state:
            raise UsageError(f"{path}: checkpoint field {key!r} ({what}) is missing")
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UsageError(f"{path}: checkpoint field {key!r} ({what}) is a {type(value).__name__}, "
                             f"not a {kind.__name__}")
    if state["epoch"] < 0:
        raise UsageError(f"{path}: checkpoint field 'epoch' is {state['epoch']}, not a count of epochs")
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise UsageError(f"{path}: checkpoint field 'model' holds values that are not tensors")
    for key in ("state", "param_groups"):
        if key not in state["optimizer"]:
            raise UsageError(f"{path}: checkpoint field 'optimizer' has no {key!r}")
    if not isinstance(state["rng"].get("torch"), torch.Tensor):
        raise UsageError(f"{path}: checkpoint field 'rng' has no 'torch' generator state")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse to resume when a setting that shapes the model or data differs from the checkpoint's."""
    diffs = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise UsageError(f"cannot resume: the checkpoint was made with other settings ({'; '.join(diffs)})")
