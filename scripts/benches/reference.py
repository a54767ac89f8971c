"""Cost of ``check-reference`` on BC-100: ``scripts/bench.py reference [--fixture DIR] [--backend X] [--repeat R]``.

Timed: one whole check of the committed ``reference_grads/densenet-bc-100`` fixture (batch 2) the way the CLI
runs it - read and verify the files (SHA-256, no pickle), rebuild the model from its stored weights, rebuild
the float64 oracle (the checkpoints policy recomputes it and checks it against the stored tensors), judge
the backend at every unit, local and propagated. Anchor, measured in the same process: one plain float32
forward+backward of the same model on the same batch under the same backend. Figures: absolute seconds
(target <= 2 s on CPU) and ``ratio`` = check seconds / anchor seconds. Minimum over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(argv: list[str]) -> dict:
    import torch
    import torch.nn.functional as F

    from densenet_debug.backends import parse_backend
    from densenet_debug.reference.check import check_reference, default_backend, load_reference, reference_oracle

    parser = argparse.ArgumentParser(prog="bench.py reference")
    parser.add_argument("--fixture", default=str(ROOT / "reference_grads" / "densenet-bc-100"))
    parser.add_argument("--backend", default=None, help="default: PyTorch's default on the CPU (mkldnn)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.backend or default_backend("cpu")
    backend = parse_backend(name, "cpu")

    fixture, model = load_reference(args.fixture)
    side = backend.prepare_model(model).train()
    x, y = backend.prepare_input(fixture.inputs), fixture.targets
    anchors = []
    for _ in range(args.repeat + 1):
        with backend.active():
            start = time.perf_counter()
            side.zero_grad(set_to_none=True)
            F.cross_entropy(side(x), y).backward()
            anchors.append(time.perf_counter() - start)
    anchor = min(anchors[1:])

    best, parts, result = None, {}, None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fixture, model = load_reference(args.fixture)
        t1 = time.perf_counter()
        loaded = (fixture, model, *reference_oracle(fixture, model))
        t2 = time.perf_counter()
        result = check_reference(fixture, name, loaded=loaded)
        t3 = time.perf_counter()
        if best is None or t3 - t0 < best:
            best = t3 - t0
            parts = {"read_and_verify": t1 - t0, "oracle": t2 - t1, "judge_and_reproduction": t3 - t2}
    return {
        "check_reference_seconds": round(best, 3),
        "target_seconds": 2.0,
        "anchor_fwd_bwd_seconds": round(anchor, 4),
        "ratio": round(best / anchor, 1),
        "parts_seconds": {k: round(v, 3) for k, v in parts.items()},
        "fixture": Path(args.fixture).name, "policy": fixture.meta["storage"]["policy"], "backend": name,
        "batch": int(fixture.inputs.shape[0]), "units": fixture.meta.get("units"),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "verdict": result.verdict if result else None,
    }
