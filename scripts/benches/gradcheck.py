"""Our fast per-unit gradient check of every unit vs torch.autograd.gradcheck(fast_mode=True), same run.

``scripts/bench.py gradcheck [--model densenet-bc-100] [--batch 2] [--seed 0] [--threads N] [--skip-torch]``.
Figures: ``ratio`` = our time / torch's (target <= 0.05, first milestone <= 0.1), both on the same fp64
model, batch and machine; torch's checks every parameter tensor of the model through the whole network
(inputs only, one bool), ours every unit's input and parameter gradients, localized. Also the NumPy
oracle's time for the same model and batch, and how many plain forward+backward passes each costs.

Both sides run with ``--threads`` torch threads, 1 by default: on a shared 2-core machine two OpenMP
threads stall whenever another process takes a core (torch's check on BC-40 took 3 s one minute and
125 s the next), so 1 thread is what gives a reproducible ratio. ``--threads 0`` keeps torch's default.
CPU time (``*_cpu_s``) is reported beside wall time.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from densenet_debug.gradcheck.engine import gradcheck_model
from densenet_debug.models import build_model
from densenet_debug.models.batch import make_batch


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench gradcheck")
    parser.add_argument("--model", default="densenet-bc-100")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-torch", action="store_true", help="skip torch's gradcheck (no ratio)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1, steady on a busy machine; 0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = build_model(args.model)
    x, y = make_batch(model, (3, 32, 32), args.batch, seed=args.seed, num_classes=10)

    fwd_bwd = _time_forward_backward(model, x, y)
    gradcheck_model(model, x, y, layers=["stem"])  # imports
    runs = []
    for _ in range(3):  # best of 3 (run-to-run noise is ~10 %); the first also warms every unit's kernels
        start, cpu = time.perf_counter(), time.process_time()
        report = gradcheck_model(model, x, y)
        runs.append((time.perf_counter() - start, time.process_time() - cpu))
    ours, ours_cpu = min(runs)
    result = {
        "model": args.model, "batch": args.batch, "threads": torch.get_num_threads(),
        "ours_s": round(ours, 3), "ours_cpu_s": round(ours_cpu, 3), "ours_runs_s": [round(w, 3) for w, _ in runs],
        "units": len(report.units),
        "rows": len(report.rows),
        "verdict": report.verdict, "kinks": len(report.kinks),
        "worst_resolution": max((r.resolution for r in report.rows if r.resolution is not None), default=None),
        "worst_error_over_tolerance": max((r.error / r.tolerance for r in report.rows if r.tolerance > 0),
                                          default=0.0),
        "forward_backward_s": round(fwd_bwd, 4), "ours_in_forward_backwards": round(ours / fwd_bwd, 1),
    }
    oracle = _time_oracle(model, x, y)
    if oracle is not None:
        result["oracle_s"] = round(oracle, 3)
        result["oracle_in_forward_backwards"] = round(oracle / fwd_bwd, 1)
    if not args.skip_torch:
        t = _time_torch_gradcheck(model, x, y)
        result.update({k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()})
        result.update(ratio=round(ours / t["theirs_s"], 4), ratio_cpu=round(ours_cpu / t["theirs_cpu_s"], 4),
                      theirs_in_forward_backwards=round(t["theirs_s"] / fwd_bwd, 1))
        if "theirs_failed_on" in t:  # what our check says about the unit torch's check tripped on
            unit = t["theirs_failed_on"].rpartition(".")[0]
            rows = [r for r in report.rows if r.layer == unit]
            result["ours_on_that_unit"] = [{"tensor": r.tensor, "status": r.status, "error": r.error,
                                            "tolerance": r.tolerance, "kinks": r.kinks} for r in rows]
    return result


def _time_forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeat: int = 3) -> float:
    m = copy.deepcopy(model).double()
    x = x.double()
    F.cross_entropy(m(x), y).backward()
    start = time.perf_counter()
    for _ in range(repeat):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
    return (time.perf_counter() - start) / repeat


def _time_oracle(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    try:
        from densenet_debug.numpy_oracle import numpy_forward_backward
    except ImportError:
        return None
    state = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    xn, yn = x.double().numpy(), y.numpy()
    numpy_forward_backward(state, model.config, xn, yn)  # warm up
    start = time.perf_counter()
    numpy_forward_backward(state, model.config, xn, yn)
    return time.perf_counter() - start  # NumPy's BLAS threads are its own; wall time


class _FallbackStarted(Exception):
    pass


def _time_torch_gradcheck(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """torch's fast gradcheck w.r.t. every parameter of the fp64 model (BN in train mode, buffers copied).

    When fast mode fails, gradcheck rebuilds slow-mode Jacobians for its message: thousands of whole-model
    calls (hours for BC-100). That fallback is cut off after 50 calls and not timed; the parameter it
    perturbs is the one fast mode failed on.
    """
    m = copy.deepcopy(model).double()
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    buffers = {k: b.clone() for k, b in m.named_buffers()}
    x = x.double()
    originals = [p.detach().clone() for p in params]  # slow mode perturbs the inputs in place
    fast_calls = 2 * len(params) + 2  # two per input, plus the output check
    calls, failed_on = [0], [None]

    def loss(*ps: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > fast_calls + 50:
            moved = [n for n, p, q in zip(names, ps, originals) if not torch.equal(p.detach(), q)]
            failed_on[0] = moved[0] if moved else None
            raise _FallbackStarted
        bufs = {k: b.clone() for k, b in buffers.items()}  # train-mode BN writes its running stats
        return F.cross_entropy(functional_call(m, {**dict(zip(names, ps)), **bufs}, (x,)), y)

    start, cpu = time.perf_counter(), time.process_time()
    try:
        passed = bool(torch.autograd.gradcheck(loss, params, fast_mode=True, raise_exception=False))
    except _FallbackStarted:
        passed = False
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if calls[0] > fast_calls:  # remove the cut-off fallback's share, at the fast calls' average cost
        wall, cpu = wall * fast_calls / calls[0], cpu * fast_calls / calls[0]
    out = {"theirs_s": wall, "theirs_cpu_s": cpu, "theirs_passed": passed, "theirs_function_calls": min(calls[0],
                                                                                                       fast_calls)}
    if failed_on[0] is not None:
        out["theirs_failed_on"] = failed_on[0]
        out["theirs_note"] = ("fast mode failed on a correct model; its slow-mode fallback (thousands of "
                              "whole-model calls) was cut off and is not timed")
    return out
