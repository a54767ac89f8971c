"""Cost and size of op-level capture: ``scripts/bench.py capture [--model NAME] [--batch B] [--repeat R]``.

Anchor, measured in the same process on the same batch: one plain float32 forward+backward (cross-entropy).
Figures, each the minimum over ``--repeat`` runs after a warm-up, as ratios over the anchor:
``tracer`` (the module-level :class:`densenet_debug.trace.Tracer` recording every quantity, now node hooks and
copy-on-write), ``capture_layouts`` and ``capture_values`` (:func:`densenet_debug.capture.capture` without and
with values). Also the op counts per phase, the memory-efficient variant's counts, and how completely a
oneDNN-off and a channels_last capture align with the default one (ops matched, ops only one side ran).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter


def _timed(step) -> float:  # noqa: ANN001
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run(argv: list[str]) -> dict:
    import torch
    import torch.nn.functional as F

    from densenet_debug.capture import align, capture
    from densenet_debug.models import build_model
    from densenet_debug.models.batch import make_batch
    from densenet_debug.trace import trace_step

    parser = argparse.ArgumentParser(prog="bench.py capture")
    parser.add_argument("--model", default="densenet-bc-100")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model)
    x, y = make_batch(model, (3, 32, 32), args.batch, seed=0, num_classes=10)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def captured(values: bool, net=model, inputs=x):  # noqa: ANN001, ANN202
        net.zero_grad(set_to_none=True)
        with capture(net, values=values) as cap:
            F.cross_entropy(net(inputs), y).backward()
        return cap

    steps = {"plain": plain, "tracer": lambda: trace_step(model, x, y),
             "capture_layouts": lambda: captured(False), "capture_values": lambda: captured(True)}
    for step in steps.values():
        step()  # warm-up
    best = {name: min(_timed(step) for _ in range(args.repeat)) for name, step in steps.items()}
    anchor = best["plain"]

    default = captured(False)
    with torch.backends.mkldnn.flags(enabled=False):
        no_onednn = captured(False)
    cl_model = build_model(args.model).to(memory_format=torch.channels_last)
    channels_last = captured(False, cl_model, x.contiguous(memory_format=torch.channels_last))
    efficient = captured(False, build_model(args.model, memory_efficient=True))

    def aligned(other) -> dict:  # noqa: ANN001
        al = align(default, other)
        return {"matched": len(al.pairs), "only_default": len(al.only_a), "only_other": len(al.only_b),
                "only_other_ops": dict(Counter(r.op for r in al.only_b)), "layout_changes": len(al.layout_changes)}

    backward = default.phase("backward")
    return {
        "model": args.model, "batch": args.batch, "threads": args.threads, "repeat": args.repeat,
        "anchor_plain_s": round(anchor, 4),
        "seconds": {k: round(v, 4) for k, v in best.items()},
        "ratio": {k: round(v / anchor, 3) for k, v in best.items() if k != "plain"},
        "ops": default.counts(), "ops_memory_efficient": efficient.counts(),
        "backward_ops_on_a_leaf_module": sum(r.module in _leaves(model) for r in backward),
        "backward_ops": len(backward),
        "align_onednn_off": aligned(no_onednn), "align_channels_last": aligned(channels_last),
    }


def _leaves(model) -> set[str]:  # noqa: ANN001
    return {n for n, m in model.named_modules() if n and not any(True for _ in m.children())}
