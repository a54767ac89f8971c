"""Model summary: blocks, layers, parameters, and measured activation memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GroupRow:
    name: str
    kind: str
    units: int
    params: int
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class Summary:
    rows: list[GroupRow]
    total_params: int
    activation_bytes: int
    batch: int

    @property
    def param_bytes(self) -> int:
        return 4 * self.total_params


def summarize(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32), batch: int = 64) -> Summary:
    """One row per top-level child of ``model`` (stem, blocks, transitions, head).

    Activation memory is measured, not modelled: the bytes of distinct storages autograd saves for
    backward in a float32 training step at batch 2, scaled linearly to ``batch`` (activations are linear
    in the batch). Parameters are excluded.
    """
    probe_batch = 2
    x = torch.randn(probe_batch, *input_shape)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        child.register_forward_hook(lambda m, a, o, n=name: shapes.__setitem__(n, tuple(o.shape)))
        for name, child in model.named_children()
    ]
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    state = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    try:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        if isinstance(out, torch.Tensor) and out.dim() == 2:
            F.cross_entropy(out, torch.zeros(probe_batch, dtype=torch.long)).detach()
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict(state)
        model.train(was_training)
    rows = []
    for name, child in model.named_children():
        units = sum(1 for m in child.modules() if not any(True for _ in m.children()))
        layers = [n for n, _ in child.named_children() if n.startswith("layer")]
        rows.append(GroupRow(
            name=name, kind=f"{len(layers)} dense layers" if layers else type(child).__name__.lstrip("_"),
            units=units, params=sum(p.numel() for p in child.parameters()),
            output_shape=shapes.get(name, ()),
        ))
    total = sum(p.numel() for p in model.parameters())
    act = int(sum(saved.values()) * batch / probe_batch)
    return Summary(rows, total, act, batch)
