"""False alarms on models nobody here wrote: ``scripts/bench.py zoo [--models N] [--seed S] [--a X] [--b Y]``.

Draws ``N`` small models from a zoo of layers users combine (seeded: the same ``--seed`` draws the same
models): per block a conv (1x1 or 3x3, dense or depthwise, with or without bias), a normalisation (batch,
group, instance or none), a module activation (ReLU, in-place ReLU, leaky ReLU, GELU, SiLU, hardswish, ELU,
tanh, sigmoid, ReLU6, softplus, mish, hardtanh, PReLU), then code written in the forward (``F.relu``,
``F.leaky_relu``, a product by 0.3, + 0.1, a clamp, ``F.gelu``, ``x * sigmoid(x)``, or nothing), and maybe a
residual sum or a concatenation squeezed back by a 1x1 conv; a global average or max pool and a linear head.
Both sides are correct backends, so every ``mismatch`` is a **false alarm** and every exception a crash.

Reported: how many models agree, and each false alarm or crash with the model drawn and the summary line,
plus how often each ingredient appears among them (what to look at first). Threads pinned to 1.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

ACTS = ("ReLU", "ReLU(inplace=True)", "LeakyReLU(0.1)", "GELU", "SiLU", "Hardswish", "ELU", "Tanh", "Sigmoid",
        "ReLU6", "Softplus", "Mish", "Hardtanh(-0.5, 0.5)", "PReLU")
NORMS = ("BatchNorm2d", "GroupNorm", "InstanceNorm2d", "Identity")
CODE = ("relu", "leaky_relu", "scale", "add_const", "clamp", "gelu", "x_sigmoid_x", "none")


def _model(rng: random.Random):  # noqa: ANN202 - torch is imported lazily
    import torch
    import torch.nn.functional as F
    from torch import nn

    code = {"relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2), "scale": lambda t: t * 0.3,
            "add_const": lambda t: t + 0.1, "clamp": lambda t: t.clamp(-1.5, 1.5), "gelu": F.gelu,
            "x_sigmoid_x": lambda t: t * torch.sigmoid(t), "none": lambda t: t}

    acts = {"ReLU": nn.ReLU, "ReLU(inplace=True)": lambda: nn.ReLU(inplace=True),
            "LeakyReLU(0.1)": lambda: nn.LeakyReLU(0.1), "Hardtanh(-0.5, 0.5)": lambda: nn.Hardtanh(-0.5, 0.5)}

    def act(name: str) -> nn.Module:
        return acts[name]() if name in acts else getattr(nn, name)()

    def norm(name: str, c: int) -> nn.Module:
        return {"BatchNorm2d": lambda: nn.BatchNorm2d(c), "GroupNorm": lambda: nn.GroupNorm(2, c),
                "InstanceNorm2d": lambda: nn.InstanceNorm2d(c, affine=True), "Identity": nn.Identity}[name]()

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.recipe = (rng.choice(NORMS), rng.choice(ACTS), rng.choice(CODE), rng.random() < 0.5,
                           rng.random() < 0.3)
            n, a, self.code, self.res, self.cat = self.recipe
            self.conv = nn.Conv2d(c, c, rng.choice([1, 3]), padding="same", groups=rng.choice([1, c]),
                                  bias=rng.random() < 0.5)
            self.norm, self.act = norm(n, c), act(a)
            self.squeeze = nn.Conv2d(2 * c, c, 1) if self.cat else None

        def forward(self, x):  # noqa: ANN001, ANN202
            h = code[self.code](self.act(self.norm(self.conv(x))))
            if self.squeeze is not None:
                h = self.squeeze(torch.cat([x, h], 1))
            return x + h if self.res else h

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = rng.choice([4, 6])
            self.stem = nn.Conv2d(3, c, 3, padding=1)
            self.blocks = nn.Sequential(*[Block(c) for _ in range(rng.choice([2, 3]))])
            self.pool = rng.choice([nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)])
            self.fc = nn.Linear(c, 5)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))

    net = Net()
    return net, [list(b.recipe) for b in net.blocks]


def run(argv: list[str]) -> dict:
    import torch

    from densenet_debug.verdict.engine import diff

    parser = argparse.ArgumentParser(prog="bench.py zoo")
    parser.add_argument("--models", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--a", default="mkldnn")
    parser.add_argument("--b", default="native")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    findings, ingredients = [], Counter()
    agree = 0
    start = time.perf_counter()
    for i in range(args.models):
        seed = args.seed + i
        torch.manual_seed(seed)
        model, recipe = _model(random.Random(seed))
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(3, 3, 8, 8, generator=g), torch.randint(0, 5, (3,), generator=g)
        try:
            report = diff(model, x, y, args.a, args.b)
            if report.verdict == "agree":
                agree += 1
                continue
            what = {"seed": seed, "kind": "false alarm", "summary": report.summary[:300]}
        except Exception as e:  # noqa: BLE001 - a crash is counted, never hidden
            what = {"seed": seed, "kind": "crash", "summary": f"{type(e).__name__}: {str(e)[:300]}"}
        what["blocks"] = recipe
        findings.append(what)
        ingredients.update({part for block in recipe for part in map(str, block[:3])})
    return {"models": args.models, "seed": args.seed, "a": args.a, "b": args.b, "agree": agree,
            "false_alarms": sum(f["kind"] == "false alarm" for f in findings),
            "crashes": sum(f["kind"] == "crash" for f in findings),
            "ingredients_of_findings": dict(ingredients.most_common()), "findings": findings,
            "seconds": round(time.perf_counter() - start, 1)}
