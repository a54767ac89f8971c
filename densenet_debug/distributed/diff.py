"""``densenet-debug diff --a ddp[:N] --b BACKEND``: DistributedDataParallel against one process.

DDP changes no operator: each of N processes runs the model on its shard of the batch, scales its parameter
gradients by 1/N and all-reduces (sums) them. So the reference is exact and needs no float64 oracle: the
same backend in one process, one thread (as each DDP process computes), shard by shard, gives every
process's gradient bit for bit; scaled and summed in rank order it is what DDP must return, up to

- the all-reduce's summation order: at most gamma(N-1) * sum_r |g_r| / N per element (Higham's bound for
  a sum of N terms, gamma(k) = k u / (1 - k u), u the gradient dtype's unit roundoff), plus u * sum_r |g_r| / N
  for where the 1/N scaling happens (before or after the sum; exact for N a power of two);
- the backend's own run-to-run nondeterminism, measured by computing each shard twice (zero for
  deterministic kernels; cuDNN's atomic-add weight gradients are not).

The per-element bound is their sum; a row fails when any element of a parameter's gradient exceeds it. A
broken DDP (a bucket left out of the all-reduce, a wrong scale, buffers not synchronized, a gradient hook
firing on the wrong tensor) errs by the size of the gradient itself.

Plain DDP keeps BatchNorm per process: in training mode each process normalizes its shard with its own
statistics, so DDP computes the mean of the shards' gradients, not the full batch's; the report shows that
gap separately, as BN semantics (SyncBatchNorm, CUDA-only in PyTorch, removes it), never as a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug.backends import Backend, one_thread, parse_backend, unit_roundoff
from densenet_debug.distributed.runtime import COMM_HOOKS, batch_gradients, ddp_gradients, shards
from densenet_debug.errors import UsageError
from densenet_debug.verdict.report import SCHEMA

ORIGIN = ("DDP vs the same backend in one process, shard by shard: all-reduce summation bound "
          "(gamma(N-1) + u) * sum|g_r| / N plus measured run-to-run spread")


@dataclass
class DdpRow:
    layer: str
    quantity: str
    error: float
    tolerance: float
    status: str
    full_batch_gap: float  # max |DDP - full-batch gradient| / max |full-batch gradient| (BN semantics)


@dataclass
class DdpDiffReport:
    backend: str
    world_size: int
    training: bool
    comm_hook: str | None = None
    rows: list[DdpRow] = field(default_factory=list)

    @property
    def side(self) -> str:
        return f"ddp:{self.world_size}" + (f"+{self.comm_hook}" if self.comm_hook else "")

    @property
    def verdict(self) -> str:
        return "mismatch" if any(r.status == "mismatch" for r in self.rows) else "agree"

    def summary(self) -> str:
        gap = max((r.full_batch_gap for r in self.rows), default=0.0)
        bn = (f"; without SyncBatchNorm each process normalizes its own shard, so DDP differs from the full "
              f"batch's gradient by up to {gap:.3g} (relative): BN semantics, not a fault") if self.training else ""
        if self.verdict == "agree":
            return (f"agree: {self.side} equals {self.backend} in one process for every "
                    f"parameter gradient within the all-reduce bound{bn}")
        bad = [r for r in self.rows if r.status == "mismatch"]
        r = max(bad, key=lambda row: row.error / row.tolerance if row.tolerance else float("inf"))
        return (f"mismatch: {self.side} differs from {self.backend} in one process at {r.layer} (backward "
                f"{r.quantity}): error {r.error:.3g} > tolerance {r.tolerance:.3g}; {len(bad)} gradient(s) outside "
                f"the all-reduce bound{bn}")

    def to_json(self) -> dict:
        """The diff JSON contract (its schema, :data:`~densenet_debug.verdict.report.SCHEMA`), with side a = ddp and b =
        the backend; no op rows (``op`` null)."""
        bad = [r for r in self.rows if r.status == "mismatch"]
        first = None
        if bad:
            first = {"layer": bad[0].layer, "pass": "backward", "quantity": bad[0].quantity,
                     "error": bad[0].error, "tolerance": bad[0].tolerance, "op": None}
        return {
            "schema": SCHEMA, "verdict": self.verdict, "first_divergence": first,
            "rows": [{"layer": r.layer, "pass": "backward", "quantity": r.quantity, "error_a": r.error,
                      "error_b": 0.0, "tolerance": r.tolerance, "status": r.status, "origin": ORIGIN,
                      "mode": "ddp", "full_batch_gap": r.full_batch_gap} for r in self.rows],
            "kinks": [],
            "environment": {"a": self.side, "b": self.backend, "torch": torch.__version__,
                            "distributed_backend": "gloo", "training": self.training},
            "summary": self.summary(),
        }


def shard_gradients_under(model: nn.Module, x: Tensor, y: Tensor, world_size: int,
                          backend: Backend) -> list[dict[str, Tensor]]:
    """Each shard's gradient of its mean loss, in this process under ``backend`` (one thread)."""
    out = []
    with one_thread():
        for xs, ys in zip(shards(x, world_size), shards(y, world_size)):
            side = backend.prepare_model(model)
            with backend.active():
                F.cross_entropy(side(backend.prepare_input(xs)), ys.to(backend.device)).backward()
            out.append({n: p.grad.detach().cpu() for n, p in side.named_parameters() if p.grad is not None})
    return out


def ddp_diff(model: nn.Module, x: Tensor, y: Tensor, backend: str = "mkldnn", *, world_size: int = 2,
             comm_hook: str | None = None, spec: str | None = None,
             device: torch.device | str | None = None) -> DdpDiffReport:
    """Compare one DDP step on ``world_size`` gloo processes with ``backend`` in one process, per parameter."""
    if world_size < 2:
        raise UsageError(f"ddp needs at least 2 processes, got {world_size}")
    side = parse_backend(backend, device)
    if side.device.type != "cpu":
        raise UsageError("diff with ddp runs on CPU (gloo); use a CPU backend for --b")
    got = ddp_gradients(model, x, y, world_size=world_size, spec=spec, backend=backend, comm_hook=comm_hook)
    first = shard_gradients_under(model, x, y, world_size, side)
    again = shard_gradients_under(model, x, y, world_size, side)
    full = batch_gradients(model, x, y)
    report = DdpDiffReport(side.name, world_size, model.training, comm_hook)
    scale = 1.0 / world_size
    for name in first[0]:
        if name not in got:
            report.rows.append(_row(name, float("inf"), 0.0, float("inf")))
            continue
        want = sum((g[name] * scale for g in first), torch.zeros_like(first[0][name]))
        u = unit_roundoff(want.dtype)
        k = world_size - 1
        gamma = k * u / (1 - k * u)
        magnitude = sum(g[name].abs() for g in first) * scale
        spread = sum((a[name] - b[name]).abs() for a, b in zip(first, again)) * scale
        bound = (gamma + u) * magnitude + 2 * spread
        diff = (got[name].to(want.dtype) - want).abs()
        ref_scale = float(want.abs().max()) or 1.0
        excess = torch.where(bound > 0, diff / bound, torch.where(diff > 0, torch.inf, 0.0))
        worst = int(excess.flatten().argmax())
        gap = float((got[name] - full[name]).abs().max()) / (float(full[name].abs().max()) or 1.0)
        report.rows.append(_row(name, float(diff.flatten()[worst]) / ref_scale, float(bound.flatten()[worst])
                                / ref_scale, gap, ok=bool((diff <= bound).all())))
    return report


def _row(name: str, error: float, tolerance: float, gap: float, ok: bool = False) -> DdpRow:
    layer, _, pname = name.rpartition(".")
    return DdpRow(layer, f"grad_{pname}", error, tolerance, "ok" if ok else "mismatch", gap)


def parse_ddp_side(spec: str | None) -> tuple[int, str | None] | None:
    """``ddp[:N][+HOOK]`` -> (N, HOOK) (N = 2 by default); any other backend spec -> None."""
    if spec is None or not (spec == "ddp" or spec.startswith(("ddp:", "ddp+"))):
        return None
    head, _, hook = spec.partition("+")
    n = 2
    if head != "ddp":
        try:
            n = int(head.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"bad backend {spec!r}: use ddp[:N][+HOOK], N >= 2 processes") from None
    if n < 2:
        raise UsageError(f"bad backend {spec!r}: ddp needs N >= 2 processes")
    if hook and hook not in COMM_HOOKS:
        raise UsageError(f"bad backend {spec!r}: unknown DDP communication hook {hook!r}; valid: "
                         f"{', '.join(COMM_HOOKS)}")
    return n, hook or None
