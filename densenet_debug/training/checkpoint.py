"""Training checkpoints: written atomically, read without pickle (``torch.load(weights_only=True)``).

A checkpoint is a plain dict of tensors and JSON-like values: model and optimizer state dicts, the AMP
scaler's state, the number of completed epochs, the RNG states (dropout draws from torch's generator; data
order and augmentation are derived from (seed, epoch) and need no state) and the run's configuration, so
``--resume`` can refuse a checkpoint of a different model or dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densenet_debug import atomic
from densenet_debug.errors import UsageError

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
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt file, or one that would need arbitrary unpickling
        raise UsageError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") \
            from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path}: not a densenet-debug checkpoint (format {FORMAT})")
    return state


def check_compatible(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse to resume when a setting that shapes the model or data differs from the checkpoint's."""
    diffs = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise UsageError(f"cannot resume: the checkpoint was made with other settings ({'; '.join(diffs)})")
