"""Small facts about autograd's state that several modules need."""

from __future__ import annotations

import torch


def in_backward() -> bool:
    """True while autograd runs a backward pass (when non-reentrant checkpoint recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1
