"""Trustworthiness of diff: ``scripts/bench.py verdict [--configs N] [--seed S] [--device D]``.

Generates ``N`` configurations (model style and size, batch, seed, backend pair, and one planted fault at an
eligible unit drawn from the seed). Styles take turns: ``densenet`` (this package's DenseNet-BC, each op its
own module), ``functional`` (the research-code style: ``F.relu`` and the concatenation inside the layer's
forward, a squeezed log-softmax output) and ``inplace`` (the torchvision style: ``nn.ReLU(inplace=True)``, a
list of features concatenated in a checkpointed bottleneck, an in-place ``F.relu`` before the pool). In the
user styles the concatenation is a custom autograd Function, as user code writes one. For each
configuration, two diffs against the fp64 oracle:

* the pair as it is (both backends correct): any ``mismatch`` is a **false positive**;
* side A with the fault planted: ``mismatch`` is a **detection**; a first divergence at the planted
  unit, in the fault's pass, on side A, is a **localization**.

Faults: the registry's bugs wherever they have an eligible unit in the style's model (the Concat and
pool faults need this package's modules: the user styles stand in two faults of their own) plus, in the user
styles, a wrong custom cat Function at one drawn layer: ``function_cat_onednn_fp32`` (wrong only under oneDNN
in float32; the faulty diff puts oneDNN on side A: localised at that layer, backward, side A) and
``function_cat_every_dtype`` (wrong in float64 too: only the math check sees it; localised at that layer,
backward, status ``math``, both sides).

Correct sides include the precision controls (``reordered_sum``, ``tf32_round`` at every conv), which are
correct backends by construction; for the faulty diff such a side drops its control (one fault per unit).
Goal: 100 % detected, >= 95 % localized, 0 false positives, overall and per style. A diff that raises is
counted (``crashes``, with examples), never hidden, and its configuration counts as not detected.
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

STYLES = ("densenet", "functional", "inplace")
FUNCTION_FAULTS = ("function_cat_onednn_fp32", "function_cat_every_dtype")
USER_SIZES = ((4, 2), (6, 3))  # (growth k, layers): the size of BC-10 and BC-16


def _user_models():  # noqa: ANN202 - torch is imported lazily, as in every bench
    """The two user styles, with the concatenation a custom Function chosen per layer."""
    import torch
    import torch.nn.functional as F
    import torch.utils.checkpoint as cp
    from torch import nn

    class Cat(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *features):  # noqa: ANN001, ANN205
            ctx.sizes = [f.shape[1] for f in features]
            return torch.cat(features, 1)

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            return tuple(g.split(ctx.sizes, 1))

    class OneDNNFloat32WrongCat(Cat):  # the first input's slice handed to the wrong samples, only there
        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            parts = list(g.split(ctx.sizes, 1))
            if torch.backends.mkldnn.enabled and g.dtype == torch.float32:
                parts[0] = parts[0].roll(1, 0)
            return tuple(parts)

    class EveryDtypeWrongCat(Cat):
        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            parts = list(g.split(ctx.sizes, 1))
            parts[0] = parts[0].roll(1, 0)
            return tuple(parts)

    class FunctionalLayer(nn.Module):
        def __init__(self, c: int, k: int, cat: type) -> None:
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, 4 * k, 1, bias=False)
            self.bn2, self.conv2 = nn.BatchNorm2d(4 * k), nn.Conv2d(4 * k, k, 3, padding=1, bias=False)
            self.cat = cat

        def forward(self, x):  # noqa: ANN001, ANN201
            out = self.conv1(F.relu(self.bn1(x)))
            out = self.conv2(F.relu(self.bn2(out)))
            return self.cat.apply(x, out)

    class Functional(nn.Module):
        def __init__(self, k: int, n: int, cats: list[type]) -> None:
            super().__init__()
            c = 2 * k
            self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
            layers = []
            for i in range(n):
                layers.append(FunctionalLayer(c, k, cats[i]))
                c += k
            self.dense = nn.Sequential(*layers)
            self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, 10)

        def forward(self, x):  # noqa: ANN001, ANN201
            out = self.dense(self.stem(x))
            out = torch.squeeze(F.avg_pool2d(F.relu(self.bn(out)), out.shape[-1]))
            return F.log_softmax(self.fc(out), dim=-1)

    class InplaceLayer(nn.Module):
        def __init__(self, c: int, k: int, cat: type) -> None:
            super().__init__()
            self.norm1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
            self.conv1 = nn.Conv2d(c, 4 * k, 1, bias=False)
            self.norm2, self.relu2 = nn.BatchNorm2d(4 * k), nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(4 * k, k, 3, padding=1, bias=False)
            self.cat = cat

        def bottleneck(self, *features):  # noqa: ANN002, ANN201
            return self.conv1(self.relu1(self.norm1(self.cat.apply(*features))))

        def forward(self, *features):  # noqa: ANN002, ANN201
            if any(f.requires_grad for f in features):
                out = cp.checkpoint(self.bottleneck, *features, use_reentrant=False)
            else:
                out = self.bottleneck(*features)
            return self.conv2(self.relu2(self.norm2(out)))

    class Inplace(nn.Module):
        def __init__(self, k: int, n: int, cats: list[type]) -> None:
            super().__init__()
            c = 2 * k
            self.conv0 = nn.Conv2d(3, c, 3, padding=1, bias=False)
            self.layers = nn.ModuleList()
            for i in range(n):
                self.layers.append(InplaceLayer(c, k, cats[i]))
                c += k
            self.norm, self.classifier = nn.BatchNorm2d(c), nn.Linear(c, 10)

        def forward(self, x):  # noqa: ANN001, ANN201
            features = [self.conv0(x)]
            for layer in self.layers:
                features.append(layer(*features))
            out = F.relu(self.norm(torch.cat(features, 1)), inplace=True)
            return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    return {"functional": (Functional, "dense"), "inplace": (Inplace, "layers")}, {
        None: Cat, "function_cat_onednn_fp32": OneDNNFloat32WrongCat, "function_cat_every_dtype": EveryDtypeWrongCat}


def _user_model(style: str, size: int, seed: int, fault: str | None = None, layer: int = 0):  # noqa: ANN202
    import torch

    models, cats = _user_models()
    cls, _ = models[style]
    k, n = USER_SIZES[size]
    torch.manual_seed(seed)
    return cls(k, n, [cats[fault] if i == layer else cats[None] for i in range(n)])


def _user_faults(bugs: list[str]) -> list[str]:
    """The registry's bugs that a user-style model can take, and the two custom-Function faults."""
    from densenet_debug.faults.registry import FAULTS, eligible_units

    net = _user_model("inplace", 0, 0)
    usable = [b for b in bugs if not {"memory_efficient", "pool_padding"} & set(FAULTS[b].needs)
              and eligible_units(b, net)]
    return usable + list(FUNCTION_FAULTS)


def _configs(n: int, seed: int, pairs: list[tuple[str, str]], bugs: list[str]) -> list[dict]:
    rng = random.Random(seed)
    user_bugs = _user_faults(bugs)
    out = []
    for i in range(n):
        style = STYLES[i % len(STYLES)]
        faults = bugs if style == "densenet" else user_bugs
        out.append({
            "index": i, "style": style, "model": MODELS[rng.randrange(len(MODELS))], "batch": rng.randint(1, 6),
            "seed": rng.randrange(10**6), "pair": pairs[rng.randrange(len(pairs))],
            "fault": faults[(i // len(STYLES)) % len(faults)],  # every fault equally often, per style
        })
    return out


def _anchor(model, x, y) -> float:  # noqa: ANN001
    import torch.nn.functional as F

    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return time.perf_counter() - start


def _plan(c: dict, make_fault, harness_model, harness_batch) -> dict:  # noqa: ANN001
    """The model(s), batch and planted unit of one configuration."""
    import random as _random

    style, fault_name, seed = c["style"], c["fault"], c["seed"]
    size = MODELS.index(c["model"])
    if style == "densenet":
        fault = make_fault(fault_name, seed=seed)
        net = harness_model(c["model"], fault, seed)
        unit = fault.choose(net)[0]
        fault.units = [unit]
        batch = max(c["batch"], int(fault.needs.get("min_batch", 1)))
        x, y = harness_batch(batch, seed)
        return {"net": net, "faulty_net": net, "x": x, "y": y, "unit": unit, "fault": fault, "model": c["model"]}
    models, _ = _user_models()
    prefix = models[style][1]
    n_layers = USER_SIZES[size][1]
    name = f"{style}-k{USER_SIZES[size][0]}-{n_layers}layers"
    min_batch = 2 if style == "functional" else 1  # a squeezed output needs a batch dimension to keep
    if fault_name in FUNCTION_FAULTS:
        layer = _random.Random(f"{seed}:{fault_name}").randrange(n_layers)
        x, y = harness_batch(max(c["batch"], min_batch, 2), seed)  # rolled samples: invisible at batch 1
        return {"net": _user_model(style, size, seed), "faulty_net": _user_model(style, size, seed, fault_name, layer),
                "x": x, "y": y, "unit": f"{prefix}.{layer}", "fault": None, "model": name}
    fault = make_fault(fault_name, seed=seed)
    net = _user_model(style, size, seed)
    if fault_name == "strided_read_as_contiguous":  # visible where a conv's grad_output is a cat slice only
        last = n_layers - 1 if style == "inplace" else _random.Random(f"{seed}:{fault_name}").randrange(n_layers)
        unit = f"{prefix}.{last}.conv2"
    else:
        unit = fault.choose(net)[0]
    fault.units = [unit]
    x, y = harness_batch(max(c["batch"], int(fault.needs.get("min_batch", 1)), min_batch), seed)
    return {"net": net, "faulty_net": net, "x": x, "y": y, "unit": unit, "fault": fault, "model": name}


def _function_localized(fault: str, unit: str, first: dict | None) -> bool:
    """A wrong custom Function: first divergence at the layer that applies it, backward; side A for the
    oneDNN-only one, status ``math`` (both sides share it) for the every-dtype one."""
    if not first or first.get("pass") != "backward":
        return False
    layer = first.get("layer") or ""
    if not (layer == unit or layer.startswith(f"{unit}.")):
        return False
    return first.get("side") == "a" if fault == "function_cat_onednn_fp32" else first.get("status") == "math"


def _rates(c: Counter) -> dict:
    n = c["configs"]
    return {"configs": n, "detection_rate": c["detected"] / n if n else None,
            "localization_rate": c["localized"] / n if n else None, "false_positives": c["false_positives"],
            "crashes": c["crashes"],
            "met": bool(n) and c["detected"] == n and c["localized"] >= 0.95 * n and not c["false_positives"]
            and not c["crashes"]}


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
    per_style: dict[str, Counter] = defaultdict(Counter)
    misses, loose, false_pos, crashes = [], [], [], []
    diff_seconds, anchor_seconds = 0.0, 0.0
    start = time.perf_counter()
    try:
        for c in configs:
            a, b = c["pair"]
            plan = _plan(c, make_fault, harness_model, harness_batch)
            net, faulty_net, x, y, unit = plan["net"], plan["faulty_net"], plan["x"], plan["y"], plan["unit"]
            anchor_seconds += _anchor(net, x, y)
            t0 = time.perf_counter()
            key = f"{a} vs {b}"
            per_style[c["style"]]["configs"] += 1
            where = {"style": c["style"], "model": plan["model"], "batch": int(x.shape[0]), "seed": c["seed"],
                     "pair": key}
            # One fault per unit: the bug goes on A's backend without its control modifier, if any.
            base = "+".join(p for p in a.split("+") if not p.startswith("fault:"))
            try:
                clean = diff(net, x, y, a, b, device=args.device)
                if plan["fault"] is None:  # a custom-Function fault: it is in the model, not a backend
                    fa, fb = ("mkldnn" + ("+channels_last" if "channels_last" in a else ""), "native") \
                        if c["fault"] == "function_cat_onednn_fp32" else (base, b)
                    faulty = diff(faulty_net, x, y, fa, fb, device=args.device)
                else:
                    faulty = diff(net, x, y, f"{base}+fault:{c['fault']}@{unit}", b, device=args.device)
            except Exception as exc:  # noqa: BLE001 - a crash is a defect to count and show, not the end of the run
                per_style[c["style"]]["crashes"] += 1
                crashes.append(where | {"fault": c["fault"], "layer": unit, "error": f"{type(exc).__name__}: {exc}"})
                continue
            diff_seconds += time.perf_counter() - t0
            per_pair[key]["clean_runs"] += 1
            if clean.verdict != "agree":
                per_pair[key]["false_positives"] += 1
                per_style[c["style"]]["false_positives"] += 1
                false_pos.append(where | {"first_divergence": to_json_or_none(clean.first_divergence)})
            first = faulty.first_divergence
            detected = faulty.verdict == "mismatch"
            if plan["fault"] is None:
                localized = detected and _function_localized(c["fault"], unit, to_json_or_none(first))
            else:
                localized = detected and is_localized(plan["fault"], first) and (first or {}).get("side") in ("a", None)
            stats = per_fault[c["fault"]]
            stats["planted"] += 1
            stats["detected"] += detected
            stats["localized"] += localized
            per_style[c["style"]]["detected"] += detected
            per_style[c["style"]]["localized"] += localized
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
        "met": bool(n) and detected == n and localized >= 0.95 * n and not false_pos and not crashes
        and all(_rates(v)["met"] for v in per_style.values()),
        "per_style": {k: _rates(per_style[k]) for k in STYLES if per_style[k]["configs"]},
        "per_fault": {k: dict(v) for k, v in sorted(per_fault.items())},
        "per_pair": {k: {"clean_runs": v["clean_runs"], "false_positives": v["false_positives"]}
                     for k, v in sorted(per_pair.items())},
        "misses": misses[:20],
        "not_localized": loose[:20],
        "false_positive_examples": false_pos[:20],
        "crashes": len(crashes),
        "crash_examples": crashes[:20],
        "wall_s": round(time.perf_counter() - start, 2),
        "mean_diff_s": round(diff_seconds / (2 * n), 4) if n else None,
        "anchor_fwd_bwd_s": round(anchor_seconds / n, 4) if n else None,
        "ratio": round(diff_seconds / (2 * anchor_seconds), 2) if anchor_seconds else None,
        "settings": {"seed": args.seed, "device": args.device, "models": list(MODELS), "styles": list(STYLES),
                     "user_sizes (k, layers)": [list(t) for t in USER_SIZES], "batch": "1..6 (functional: >= 2)",
                     "pairs": [f"{a} vs {b}" for a, b in pairs], "threads": 1},
    }
