"""Cost of a full diff: ``scripts/bench.py diff [--model NAME] [--batch B] [--a X] [--b Y] [--repeat R] [--threads T]``.

Anchor, measured in the same process on the same batch: three plain forward+backward passes, one per
backend the diff runs (A, B and the fp64 oracle), each in its own flags. Figure: ``ratio`` = seconds of
one full :func:`densenet_debug.verdict.engine.diff` (oracle, both sides' traces, every unit's teacher-forced
replay, error models, kink counterfactuals, report) over the anchor. Target: <= 2.0 on BC-100, batch 8.
The minimum over ``--repeat`` runs is taken for both, after one warm-up of each.
"""

from __future__ import annotations

import argparse
import time


def _plain_pass(backend, model, x, y) -> float:  # noqa: ANN001
    import torch.nn.functional as F

    xs, ys = backend.prepare_input(x), y.to(backend.device)
    start = time.perf_counter()
    with backend.active():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xs), ys).backward()
    return time.perf_counter() - start


def run(argv: list[str]) -> dict:
    import torch

    from densenet_debug.backends import default_pair, parse_backend
    from densenet_debug.models import build_model
    from densenet_debug.models.batch import make_batch
    from densenet_debug.verdict.engine import diff

    da, db = default_pair()
    parser = argparse.ArgumentParser(prog="bench.py diff")
    parser.add_argument("--model", default="densenet-bc-100")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--a", default=da)
    parser.add_argument("--b", default=db)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both the anchor and the diff (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model(args.model)
    x, y = make_batch(model, (3, 32, 32), args.batch, seed=0, num_classes=10)
    backends = [parse_backend(args.a), parse_backend(args.b), parse_backend("fp64", "cpu")]
    prepared = [b.prepare_model(model) for b in backends]
    anchor_parts = {b.name: [] for b in backends}
    for _ in range(args.repeat + 1):
        for b, m in zip(backends, prepared):
            anchor_parts[b.name].append(_plain_pass(b, m, x, y))
    anchor = {k: min(v[1:]) for k, v in anchor_parts.items()}
    anchor_total = sum(anchor.values())

    diff_times = []
    report = None
    for _ in range(args.repeat + 1):
        start = time.perf_counter()
        report = diff(model, x, y, args.a, args.b)
        diff_times.append(time.perf_counter() - start)
    diff_time = min(diff_times[1:])
    return {
        "ratio": round(diff_time / anchor_total, 3),
        "target": 2.0,
        "diff_seconds": round(diff_time, 3),
        "anchor_seconds": round(anchor_total, 3),
        "anchor_parts_seconds": {k: round(v, 3) for k, v in anchor.items()},
        "model": args.model, "batch": args.batch, "a": args.a, "b": args.b,
        "threads": torch.get_num_threads(),
        "verdict": report.verdict if report else None,
        "kinks": sum(k.count for k in report.kinks) if report else None,
    }
