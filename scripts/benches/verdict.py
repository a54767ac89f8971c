"""Trustworthiness of diff: ``scripts/bench.py verdict [--configs N] [--seed S] [--device D]``.

Generates ``N`` configurations (model size, batch, seed, backend pair, and one planted fault at an
eligible unit drawn from the seed). For each, two diffs against the fp64 oracle:

* the pair as it is (both backends correct): any ``mismatch`` is a **false positive**;
* side A with the fault planted: ``mismatch`` is a **detection**; a first divergence at the planted
  unit, in the fault's pass, on side A, is a **localization**.

Correct sides include the precision controls (``reordered_sum``, ``tf32_round`` at every conv), which are
correct backends by construction; for the faulty diff such a side drops its control (one fault per unit).
Goal: 100 % detected, >= 95 % localized, 0 false positives.
Anchor, same process: one plain fp32 forward+backward of the same model and batch (``ratio`` = mean diff
time over it). Threads are pinned to 1 for the run: tiny models, and a shared machine.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter, defaultdict

MODELS = ("densenet-bc-10", "densenet-bc-16")
CPU_PAIRS = [
    ("mkldnn", "native"), ("native", "native"), ("native", "mkldnn"), ("channels_last", "native"),
    ("mkldnn+channels_last", "native"), ("fp64", "native"), ("native+fault:reordered_sum@*", "native"),
    ("native+fault:tf32_round@*", "native"), ("mkldnn+fault:reordered_sum@*", "mkldnn"),
]
CUDA_PAIRS = [
    ("cudnn", "no-cudnn"), ("cudnn-benchmark", "no-cudnn"), ("cudnn-deterministic", "cudnn"),
    ("cudnn+channels_last", "no-cudnn"), ("cudnn+fault:reordered_sum@*", "cudnn"),
    ("cudnn+fault:tf32_round@*", "cudnn"),
]


def _configs(n: int, seed: int, pairs: list[tuple[str, str]], bugs: list[str]) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append({
            "index": i, "model": MODELS[rng.randrange(len(MODELS))], "batch": rng.randint(1, 6),
            "seed": rng.randrange(10**6), "pair": pairs[rng.randrange(len(pairs))],
            "fault": bugs[i % len(bugs)],  # every fault equally often
        })
    return out


def _anchor(model, x, y) -> float:  # noqa: ANN001
    import torch.nn.functional as F

    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return time.perf_counter() - start


def run(argv: list[str]) -> dict:
    import torch

    from densenet_debug.faults.registry import BUGS, make_fault
    from densenet_debug.faults.selftest import harness_batch, harness_model, is_localized
    from densenet_debug.verdict.engine import diff
    from densenet_debug.verdict.report import to_json_or_none

    parser = argparse.ArgumentParser(prog="bench.py verdict")
    parser.add_argument("--configs", type=int, default=200, help="generated configurations (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the configuration generator")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    pairs = CUDA_PAIRS if args.device.startswith("cuda") else CPU_PAIRS
    configs = _configs(args.configs, args.seed, pairs, BUGS)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    per_fault: dict[str, Counter] = defaultdict(Counter)
    per_pair: dict[str, Counter] = defaultdict(Counter)
    misses, loose, false_pos = [], [], []
    diff_seconds, anchor_seconds = 0.0, 0.0
    start = time.perf_counter()
    try:
        for c in configs:
            a, b = c["pair"]
            fault = make_fault(c["fault"], seed=c["seed"])
            net = harness_model(c["model"], fault, c["seed"])
            unit = fault.choose(net)[0]
            fault.units = [unit]
            batch = max(c["batch"], int(fault.needs.get("min_batch", 1)))
            x, y = harness_batch(batch, c["seed"])
            anchor_seconds += _anchor(net, x, y)
            t0 = time.perf_counter()
            clean = diff(net, x, y, a, b, device=args.device)
            # One fault per unit: the bug goes on A's backend without its control modifier, if any.
            base = "+".join(p for p in a.split("+") if not p.startswith("fault:"))
            faulty = diff(net, x, y, f"{base}+fault:{c['fault']}@{unit}", b, device=args.device)
            diff_seconds += time.perf_counter() - t0
            key = f"{a} vs {b}"
            per_pair[key]["clean_runs"] += 1
            where = {"model": c["model"], "batch": batch, "seed": c["seed"], "pair": key}
            if clean.verdict != "agree":
                per_pair[key]["false_positives"] += 1
                false_pos.append(where | {"first_divergence": to_json_or_none(clean.first_divergence)})
            first = faulty.first_divergence
            detected = faulty.verdict == "mismatch"
            localized = detected and is_localized(fault, first) and (first or {}).get("side") in ("a", None)
            stats = per_fault[c["fault"]]
            stats["planted"] += 1
            stats["detected"] += detected
            stats["localized"] += localized
            if not detected:
                misses.append(where | {"fault": c["fault"], "layer": unit})
            elif not localized:
                loose.append(where | {"fault": c["fault"], "layer": unit, "first_divergence": to_json_or_none(first)})
    finally:
        torch.set_num_threads(saved_threads)
    n = len(configs)
    detected = sum(s["detected"] for s in per_fault.values())
    localized = sum(s["localized"] for s in per_fault.values())
    return {
        "configs": n,
        "diffs": 2 * n,
        "detection_rate": detected / n if n else None,
        "localization_rate": localized / n if n else None,
        "false_positives": len(false_pos),
        "false_positive_rate": len(false_pos) / n if n else None,
        "goal": {"detection_rate": 1.0, "localization_rate": 0.95, "false_positives": 0},
        "met": bool(n) and detected == n and localized >= 0.95 * n and not false_pos,
        "per_fault": {k: dict(v) for k, v in sorted(per_fault.items())},
        "per_pair": {k: {"clean_runs": v["clean_runs"], "false_positives": v["false_positives"]}
                     for k, v in sorted(per_pair.items())},
        "misses": misses[:20],
        "not_localized": loose[:20],
        "false_positive_examples": false_pos[:20],
        "wall_s": round(time.perf_counter() - start, 2),
        "mean_diff_s": round(diff_seconds / (2 * n), 4) if n else None,
        "anchor_fwd_bwd_s": round(anchor_seconds / n, 4) if n else None,
        "ratio": round(diff_seconds / (2 * anchor_seconds), 2) if anchor_seconds else None,
        "settings": {"seed": args.seed, "device": args.device, "models": list(MODELS), "batch": "1..6",
                     "pairs": [f"{a} vs {b}" for a, b in pairs], "threads": 1},
    }
