"""False-alarm check at BC-100 size in the ways users write DenseNets: ``scripts/bench.py styles
[--styles S ...] [--seeds N] [--batch B] [--a X] [--b Y] [--threads T]``.

A correct backend must agree on every seed. Styles (each DenseNet-BC-100, k = 12, CIFAR-sized input):

* ``seed``: the 2017 seed's own code shape (``tests/models/user_models/seed_style.py``, loaded from its file
  as a user's ``--model file.py:factory`` is): ``F.relu`` and ``torch.cat((x, out), 1)`` inside each
  bottleneck's ``forward``, a squeezed pool and ``log_softmax`` out.
* ``torchvision``: torchvision's shape, written here: ``nn.ReLU(inplace=True)`` modules, each layer's
  ``forward(*prev_features)`` concatenating the list it is handed, the block collecting the list, a final
  ``F.relu(features, inplace=True)``; ``torchvision-checkpointed`` runs each bottleneck under
  ``torch.utils.checkpoint`` (non-reentrant).
* ``torchvision-list``: torchvision as it is written today: the block hands each layer the *list* of feature
  maps (``layer(features)``; such a layer is no unit, its children are), and each layer ends in
  ``F.dropout(new, p=0.2, training=self.training)`` (off while judging, as every dropout).
* ``twice``: ``torchvision`` whose final batch norm is applied a second time after the last block's norm
  (a module called twice in one forward).
* ``branch``: ``torchvision`` with Python branches in ``forward``: a layer concatenates only when it is handed
  more than one tensor (each block's first layer takes its input as it is), and the head pools by the
  feature map's size when the input is CIFAR-sized, adaptively otherwise (``if`` on a shape, as user code does).
* ``channels_last``: our BC-100 with both sides in channels_last (``--a``/``--b`` get ``+channels_last``).

Figures: per style, the verdict of every seed and the wall time of each diff; ``agree`` = all seeds agree.
The anchor (three plain forward+backward passes of the same model and batch, one per backend and fp64) is
measured once per style, in the same process: ``ratio`` = mean diff time over it.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections import OrderedDict
from pathlib import Path

STYLES = ("seed", "torchvision", "torchvision-checkpointed", "torchvision-list", "twice", "branch", "channels_last")
SEED_STYLE = Path(__file__).resolve().parents[2] / "tests" / "models" / "user_models" / "seed_style.py"


def _torchvision_style(checkpointed: bool, twice: bool, branch: bool = False,  # noqa: ANN202 - torch lazily
                       as_list: bool = False):
    import torch
    import torch.nn.functional as F
    import torch.utils.checkpoint as cp
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, c: int, k: int) -> None:
            super().__init__()
            self.norm1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
            self.conv1 = nn.Conv2d(c, 4 * k, 1, bias=False)
            self.norm2, self.relu2 = nn.BatchNorm2d(4 * k), nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(4 * k, k, 3, padding=1, bias=False)

        def forward(self, *prev):  # noqa: ANN002, ANN201
            if as_list:  # torchvision today: one argument, the list of feature maps so far
                (prev,) = prev

            def bottleneck(*inputs):  # noqa: ANN002, ANN202
                x = inputs[0] if branch and len(inputs) == 1 else torch.cat(inputs, 1)
                return self.conv1(self.relu1(self.norm1(x)))

            if checkpointed and any(t.requires_grad for t in prev):
                out = cp.checkpoint(bottleneck, *prev, use_reentrant=False)
            else:
                out = bottleneck(*prev)
            new = self.conv2(self.relu2(self.norm2(out)))
            return F.dropout(new, p=0.2, training=self.training) if as_list else new

    class Block(nn.ModuleDict):
        def __init__(self, n: int, c: int, k: int) -> None:
            super().__init__({f"denselayer{i + 1}": Layer(c + i * k, k) for i in range(n)})

        def forward(self, x):  # noqa: ANN001, ANN201
            features = [x]
            for layer in self.values():
                features.append(layer(features) if as_list else layer(*features))
            return torch.cat(features, 1)

    class Transition(nn.Sequential):
        def __init__(self, c: int, out: int) -> None:
            super().__init__(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, out, 1, bias=False),
                             nn.AvgPool2d(2))

    class DenseNet(nn.Module):
        def __init__(self, k: int = 12, n: int = 16, num_classes: int = 10) -> None:
            super().__init__()
            c = 2 * k
            parts: list[tuple[str, nn.Module]] = [("conv0", nn.Conv2d(3, c, 3, padding=1, bias=False))]
            for b in range(3):
                parts.append((f"denseblock{b + 1}", Block(n, c, k)))
                c += n * k
                if b < 2:
                    parts.append((f"transition{b + 1}", Transition(c, c // 2)))
                    c //= 2
            parts.append(("norm5", nn.BatchNorm2d(c)))
            self.features = nn.Sequential(OrderedDict(parts))
            self.classifier = nn.Linear(c, num_classes)

        def forward(self, x):  # noqa: ANN001, ANN201
            out = self.features(x)
            if twice:  # the final norm once more: a module called twice, BN statistics updated twice
                out = self.features.norm5(out)
            out = F.relu(out, inplace=True)
            if branch and x.shape[-1] >= 32:  # CIFAR-sized: pool by the map's size (the seed's avg_pool2d(., 8))
                return self.classifier(torch.flatten(F.avg_pool2d(out, out.shape[-1]), 1))
            return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))

    return DenseNet()


def _model(style: str, seed: int):  # noqa: ANN202
    import torch

    torch.manual_seed(seed)
    if style == "seed":
        spec = importlib.util.spec_from_file_location("seed_style", SEED_STYLE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(seed)
        return module.DenseNet(growthRate=12, depth=100, reduction=0.5, nClasses=10, bottleneck=True)
    if style == "channels_last":
        from densenet_debug.models import build_model

        return build_model("densenet-bc-100")
    return _torchvision_style(style == "torchvision-checkpointed", style == "twice", style == "branch",
                              as_list=style == "torchvision-list")


def _anchor(model, x, y, names: list[str]) -> float:  # noqa: ANN001
    import torch.nn.functional as F

    from densenet_debug.backends import parse_backend

    total = 0.0
    for name in names:
        backend = parse_backend(name)
        m, xs = backend.prepare_model(model), backend.prepare_input(x)
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            with backend.active():
                m.zero_grad(set_to_none=True)
                F.cross_entropy(m(xs), y).backward()  # diff's loss (log-probabilities in: the same loss)
            best = min(best, time.perf_counter() - start)
        total += best
    return total


def run(argv: list[str]) -> dict:
    import torch

    from densenet_debug.backends import default_pair
    from densenet_debug.models.batch import make_batch
    from densenet_debug.verdict.engine import diff

    da, db = default_pair()
    parser = argparse.ArgumentParser(prog="bench.py styles")
    parser.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES))
    parser.add_argument("--seeds", type=int, default=5, help="seeds per style (default 5)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--a", default=da)
    parser.add_argument("--b", default=db)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result: dict = {"batch": args.batch, "seeds": args.seeds, "threads": torch.get_num_threads(), "styles": {}}
    for style in args.styles:
        a, b = (f"{args.a}+channels_last", f"{args.b}+channels_last") if style == "channels_last" else (args.a, args.b)
        runs = []
        anchor = None
        for seed in range(args.seeds):
            model = _model(style, seed)
            x, y = make_batch(model, (3, 32, 32), args.batch, seed=seed, num_classes=10)
            if anchor is None:
                anchor = _anchor(model, x, y, [a, b, "fp64"])
            start = time.perf_counter()
            report = diff(model, x, y, a, b)
            seconds = time.perf_counter() - start
            runs.append({"seed": seed, "verdict": report.verdict, "seconds": round(seconds, 2),
                         **({} if report.verdict == "agree" else {"summary": report.summary[:300]})})
        mean = sum(r["seconds"] for r in runs) / len(runs)
        result["styles"][style] = {"a": a, "b": b, "agree": all(r["verdict"] == "agree" for r in runs),
                                   "agreeing_seeds": sum(r["verdict"] == "agree" for r in runs), "runs": runs,
                                   "anchor_seconds": round(anchor, 3), "ratio": round(mean / anchor, 2)}
    result["agree"] = all(s["agree"] for s in result["styles"].values())
    return result
