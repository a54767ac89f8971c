"""Gradient audit during training: every N steps, the verdict engine's local check on the current batch.

The backend the run trains with (or ``--audit-backend``) is compared with float64, layer by layer and
teacher-forced (:func:`densenet_debug.verdict.engine.local_check`), on all layers or a seeded random sample. The
worst row of each layer group (``stem``, ``block1``, ``trans1`` ... ``head``, by error/tolerance) goes to
``audit.csv``; a mismatch stops training with :class:`AuditFailure` naming the layer, the pass and the
quantity, at the step where it first shows instead of after hundreds of epochs of slow divergence.

With ``ops`` (``--audit-ops``) each audit also judges every aten op of the audited backend's step on the
float64 oracle's inputs to that op (:func:`densenet_debug.verdict.ops.judge_ops`, the engine of ``diff
--ops``): an op that only the audited backend runs and that changes values, or one kernel outside its derived
bound, stops training too, even where every layer's own check passes. Its worst op row per group is logged
under the group ``GROUP ops`` (the layer column names the module and the op).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor, nn

from densenet_debug.distributed import runtime as ddp
from densenet_debug.training.progress import CsvLog


class AuditFailure(Exception):
    """A layer's gradient (or output) under the audited backend is outside its float64-derived tolerance."""


def default_backend(device: torch.device, *, amp: bool = False, channels_last: bool = False,
                    compile: bool = False) -> str:
    """The backend spec of what training runs: cudnn on CUDA, oneDNN (mkldnn) on CPU when torch has it."""
    if device.type == "cuda":
        parts = ["cudnn"]
    else:
        parts = ["mkldnn" if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else "native"]
    if channels_last:
        parts.append("channels_last")
    if amp:
        parts.append("fp16" if device.type == "cuda" else "bf16")
    if compile:
        parts.append("compile")
    return "+".join(parts)


def layer_group(name: str) -> str:
    """``block2.layer07.conv2`` -> ``block2``; the top-level part of a qualified module name."""
    return name.split(".", 1)[0] if name else "model"


def leaf_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]


class GradientAudit:
    """Decides when to audit, runs the local check on rank 0, logs worst rows per group, stops on a mismatch."""

    def __init__(self, every: int, backend: str, device: torch.device, *, layers: int | None = None, seed: int = 0,
                 log: CsvLog | None = None, info: ddp.DistInfo | None = None, ops: bool = False) -> None:
        self.every = every
        self.ops = ops
        self.backend = backend
        self.device = device
        self.layers = layers
        self.seed = seed
        self.log = log
        self.info = info or ddp.DistInfo()

    @classmethod
    def from_config(cls, config: Any, device: torch.device, log: CsvLog | None, info: ddp.DistInfo) -> GradientAudit:
        backend = config.audit_backend or default_backend(device, amp=config.amp, channels_last=config.channels_last,
                                                          compile=config.compile)
        from densenet_debug.backends import parse_backend

        parse_backend(backend, device)  # an unknown name fails now, in one line, not at the first audit
        return cls(config.audit_every, backend, device, layers=config.audit_layers, seed=config.seed, log=log,
                   info=info, ops=getattr(config, "audit_ops", False))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def units(self, model: nn.Module, step: int) -> list[str] | None:
        if self.layers is None:
            return None
        names = leaf_names(model)
        if self.layers >= len(names):
            return None
        rng = random.Random(self.seed * 1_000_003 + step)
        return sorted(rng.sample(names, self.layers), key=names.index)

    def run(self, net: nn.Module, x: Tensor, y: Tensor, epoch: int, step: int) -> list[Any]:
        """Audit ``net`` on (x, y); return the worst row per group; raise AuditFailure on any mismatch."""
        worst: list[Any] = []
        message = ""
        if self.info.is_main:
            worst, message = self._check(net, x, y, epoch, step)
        if ddp.broadcast_flag(bool(message), self.info):
            raise AuditFailure(message or f"step {step}: rank 0's audit found a mismatch (see its audit.csv)")
        return worst

    def _check(self, net: nn.Module, x: Tensor, y: Tensor, epoch: int, step: int) -> tuple[list[Any], str]:
        from densenet_debug.verdict.engine import local_check

        # A copy: the check must not touch the training model's BN statistics or gradients; SyncBatchNorm
        # becomes BatchNorm so that rank 0 can run it alone.
        model = ddp.revert_sync_batchnorm(ddp.unwrap(net))
        was = model.training
        rows = local_check(model.train(was), x.contiguous(), y, self.backend, units=self.units(model, step))
        if self.ops:
            from densenet_debug.verdict.ops import judge_ops

            rows += judge_ops(model, x.contiguous(), y, self.backend).rows
        groups: dict[str, Any] = {}
        for row in rows:
            g = _group(row)
            if g not in groups or _severity(row) > _severity(groups[g]):
                groups[g] = row
        worst = list(groups.values())
        if self.log is not None:
            for row in worst:
                self.log.append([epoch, step, self.backend, _group(row), row.layer, row.pass_, row.quantity,
                                 _float(row.error_a), float(row.tolerance), row.status])
        bad = [r for r in rows if r.status in ("mismatch", "nonfinite")]  # NaN/Inf never passes
        if not bad:
            return worst, ""
        r = bad[0]
        where = f"; rows in {self.log.path}" if self.log is not None else ""
        return worst, (f"step {step} (epoch {epoch}): {r.layer} {r.pass_} {r.quantity} error {_float(r.error_a):.3g} "
                       f"> tolerance {float(r.tolerance):.3g} under {self.backend} vs float64"
                       f"{f' (and {len(bad) - 1} more rows)' if len(bad) > 1 else ''}{where}")


def _group(row: Any) -> str:
    """A unit row's layer group; an op row's is its module's, marked ``ops`` (``block2 ops``)."""
    if getattr(row, "mode", None) == "op":
        from densenet_debug.verdict.report import unit_of

        return f"{layer_group(unit_of(row.layer))} ops"
    return layer_group(row.layer)


def _float(value: Any) -> float:
    """An error figure for the log: an op row that was not replayed has none (NaN in the CSV)."""
    return float("nan") if value is None else float(value)


def _severity(row: Any) -> float:
    """How far the row is from failing: the verdict's own element ratio when it has one, else error/tolerance."""
    ratio = getattr(row, "ratio_a", None)
    if ratio is not None:
        return float(ratio)
    tol, error = float(row.tolerance), _float(row.error_a)
    if error != error:  # no figure (an op that was not replayed): nothing to rank it by
        return 0.0
    return error / tol if tol > 0 else float("inf") if error > 0 else 0.0
