"""The convergence canary: the 2017 story end to end, on a real image set that ships with scikit-learn.

pytorch#708 (Feb 2017): cuDNN's convolution backward read the gradient slice that ``torch.cat``'s backward
hands it (a non-contiguous view) as if it were contiguous. Sample 0 got the right gradient, every other
sample the gradient of other channels; no error, no NaN, and DenseNet-BC-100 "did not converge".

A small DenseNet-BC trains for a fixed short budget on the 8x8 digits (resized to 32x32), once clean and
once with ``strided_read_as_contiguous`` (the #708 read) planted at every conv whose grad_output is a
cat-backward slice, exactly where the 2017 kernel went wrong. The default model is DenseNet-BC-10, one
dense layer per block: in this DenseNet (a block concatenates the list of its features once) the slice
reaches only the last layer of each block, so with one layer per block every dense layer is hit — as every
layer was in the seed's code, where each bottleneck concatenated its own output. The clean run converges;
the faulty one's training loss stays on a plateau near its start. Then ``diff`` on the faulty configuration
names the layer, in seconds, where a loss curve only says "not converging".

The thresholds of the test (tests/faults/test_canary.py) come from the distribution measured over ten seeds
in ``tests/faults/canary_distribution.json``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from densenet_debug import progress
from densenet_debug.errors import UsageError
from densenet_debug.faults.registry import make_fault
from densenet_debug.models import BUILDERS, build_model
from densenet_debug.verdict.report import to_json_or_none

CANARY_FAULT = "strided_read_as_contiguous@*"


@dataclass
class Run:
    """One training run: per-step training losses and per-epoch test accuracy."""

    label: str
    losses: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    units: list[str] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1] if self.accuracy else float("nan")


@dataclass
class CanaryReport:
    """The three facts: clean accuracy, faulty accuracy, and where diff puts the fault."""

    target: float
    clean: Run
    faulty: Run
    localization: dict | None
    config: dict
    seconds: float = 0.0

    @property
    def clean_converged(self) -> bool:
        return self.clean.final_accuracy >= self.target

    @property
    def faulty_failed(self) -> bool:
        return self.faulty.final_accuracy < self.target

    @property
    def localized(self) -> bool:
        return bool(self.localization and self.localization.get("localized"))

    @property
    def passed(self) -> bool:
        return self.clean_converged and self.faulty_failed and self.localized

    def facts(self) -> list[str]:
        c, f = self.clean, self.faulty
        lines = [
            f"clean: test accuracy {c.final_accuracy:.1%} after {len(c.accuracy)} epochs "
            f"({'reaches' if self.clean_converged else 'MISSES'} the stated {self.target:.0%}; {c.seconds:.1f} s)",
            f"faulty ({CANARY_FAULT.split('@')[0]} at {', '.join(f.units)}): test accuracy "
            f"{f.final_accuracy:.1%} ({'does not reach' if self.faulty_failed else 'REACHES'} {self.target:.0%}; "
            f"no error, no NaN; {f.seconds:.1f} s)",
        ]
        loc = self.localization
        if loc is None:
            lines.append("diff: not run")
        elif loc.get("first_divergence") is None:
            lines.append(f"diff {loc['a']} vs {loc['b']}: verdict {loc['verdict']} (MISSED the planted fault)")
        else:
            fd = loc["first_divergence"]
            lines.append(
                f"diff {loc['a']} vs {loc['b']}: {loc['verdict']}, first divergence at {fd['layer']} "
                f"({fd['pass']} {fd['quantity']}, error {fd['error']:.2e} > tolerance {fd['tolerance']:.2e}) "
                f"{'= a planted unit' if loc['localized'] else 'NOT a planted unit'} ({loc['seconds']:.1f} s)")
        return lines

    def to_json(self) -> dict:
        return {
            "schema": "densenet-debug/canary/1",
            "passed": self.passed,
            "target_accuracy": self.target,
            "fault": CANARY_FAULT,
            "clean": asdict(self.clean) | {"final_accuracy": self.clean.final_accuracy},
            "faulty": asdict(self.faulty) | {"final_accuracy": self.faulty.final_accuracy},
            "localization": self.localization,
            "config": self.config,
            "seconds": self.seconds,
        }


def load_digits_32(seed: int = 0, test_size: int = 397, channels: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits, bilinearly resized to 32x32, standardised, split with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise UsageError("the canary needs scikit-learn (pip install 'densenet-debug[canary]')") from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).expand(-1, channels, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return x[train], y[train], x[test], y[test]


def train_run(
    label: str, data: tuple[Tensor, Tensor, Tensor, Tensor], fault: str | None, *, model: str, epochs: int,
    batch_size: int, lr: float, seed: int, train_samples: int | None = None,
) -> Run:
    """SGD with Nesterov momentum and a cosine schedule; the same seed, order and weights for both runs."""
    x_train, y_train, x_test, y_test = data
    if train_samples is not None:
        x_train, y_train = x_train[:train_samples], y_train[:train_samples]
    torch.manual_seed(seed)
    net = build_model(model, in_channels=x_train.shape[1], num_classes=10)
    run = Run(label)
    if fault:
        planted = make_fault(fault, seed=seed)
        planted.apply(net)
        run.units = planted.units
    steps = epochs * math.ceil(len(y_train) / batch_size)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order_rng = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    task = progress.step(f"canary: {label} run, epochs", total=epochs)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(y_train), generator=order_rng)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run.losses.append(float(loss.detach()))
        run.accuracy.append(evaluate(net, x_test, y_test))
        task.advance()
    task.close()
    run.seconds = time.perf_counter() - start
    return run


@torch.no_grad()
def evaluate(net: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    net.eval()
    correct = sum(int((net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def localize(model: str, data: tuple[Tensor, Tensor, Tensor, Tensor], *, batch: int, seed: int) -> dict:
    """diff of the faulty configuration against the same backend clean, on a batch of real digits."""
    from densenet_debug.verdict.engine import diff

    x, y = data[0][:batch], data[1][:batch]
    torch.manual_seed(seed)
    net = build_model(model, in_channels=x.shape[1], num_classes=10)
    a, b = f"native+fault:{CANARY_FAULT}", "native"
    start = time.perf_counter()
    report = diff(net, x, y, a, b)
    seconds = time.perf_counter() - start
    units = make_fault(CANARY_FAULT).choose(net)
    fd = to_json_or_none(report.first_divergence)
    return {
        "a": a, "b": b, "verdict": report.verdict, "first_divergence": fd, "planted_units": units,
        "localized": bool(fd and fd["layer"] in units and fd["pass"] == "backward"), "seconds": seconds,
    }


def run_canary(
    *, model: str = "densenet-bc-10", epochs: int = 15, batch_size: int = 64, lr: float = 0.2, seed: int = 0,
    target: float = 0.8, train_samples: int | None = None, diff_batch: int = 8, localize_fault: bool = True,
    threads: int | None = 1,
) -> CanaryReport:
    """Train clean and faulty, then localise with diff.

    ``threads`` pins torch's intra-op threads for the run (restored after): CPU reductions split by thread
    count, so a fixed count makes the numbers identical from run to run; one thread also keeps a shared
    machine from oversubscription. None leaves torch's setting alone.
    """
    if epochs < 1 or batch_size < 2:
        raise UsageError("the canary needs epochs >= 1 and batch size >= 2 (#708 is invisible at batch 1)")
    if not 0 < target <= 1:
        raise UsageError(f"target accuracy must be in (0, 1], got {target}")
    if model not in BUILDERS:
        raise UsageError(f"unknown model {model!r}; choose from {', '.join(BUILDERS)}")
    start = time.perf_counter()
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        data = load_digits_32(seed)
        common = dict(model=model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      train_samples=train_samples)
        clean = train_run("clean", data, None, **common)
        faulty = train_run("faulty", data, CANARY_FAULT, **common)
        loc = localize(model, data, batch=diff_batch, seed=seed) if localize_fault else None
        config = common | {"target": target, "diff_batch": diff_batch, "threads": torch.get_num_threads(),
                           "train_size": len(data[1]) if train_samples is None else min(train_samples, len(data[1])),
                           "test_size": len(data[3]), "data": "sklearn digits 8x8 -> 32x32 bilinear, 1 channel"}
    finally:
        torch.set_num_threads(saved_threads)
    return CanaryReport(target, clean, faulty, loc, config, time.perf_counter() - start)


STORY = ("pytorch#708 (2017): cuDNN's conv backward read the gradient slice torch.cat's backward hands it "
         "as if contiguous:\nsample 0 right, every other sample the gradient of other channels. No error, no NaN: "
         "the model just does not learn.")


def loss_figure(report: CanaryReport):
    """Both training-loss curves (raw and per-epoch mean) and the test accuracy, with the story on the plot:
    what #708 was (title), where it was planted (legend) and the layer diff names (arrow on the faulty curve)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8), layout="constrained")
    fig.suptitle(STORY, fontsize=9.5, x=0.01, ha="left")
    ax_loss, ax_acc = fig.subplots(1, 2)
    per_epoch = len(report.clean.losses) // max(len(report.clean.accuracy), 1)
    where = "\n".join(report.faulty.units) or CANARY_FAULT.split("@")[1]
    for run, color in ((report.clean, "tab:blue"), (report.faulty, "tab:red")):
        steps = range(1, len(run.losses) + 1)
        ax_loss.plot(steps, run.losses, color=color, alpha=0.25, linewidth=0.8)
        means = [sum(run.losses[i:i + per_epoch]) / per_epoch for i in range(0, len(run.losses), per_epoch)]
        label = run.label if run is report.clean else "faulty: #708 planted"
        ax_loss.plot([per_epoch * (i + 1) for i in range(len(means))], means, color=color, marker="o",
                     markersize=3, label=f"{label} (test acc {run.final_accuracy:.1%})")
        ax_acc.plot(range(1, len(run.accuracy) + 1), run.accuracy, color=color, marker="o", markersize=3,
                    label=run.label)
    ax_loss.set(xlabel="step", ylabel="training loss (cross-entropy)", yscale="log",
                title=f"{report.config['model']} on digits 32x32, {len(report.clean.accuracy)} epochs")
    ax_loss.legend(fontsize=8, loc="lower left")
    ax_loss.text(0.98, 0.5, f"#708 planted at\n{where}", transform=ax_loss.transAxes, ha="right", va="center",
                 fontsize=8, color="tab:red")
    ax_acc.axhline(report.target, color="gray", linestyle="--", linewidth=1, label=f"stated {report.target:.0%}")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1), title="test accuracy per epoch")
    ax_acc.legend(loc="lower right", fontsize=8)
    loc = report.localization
    fd = loc.get("first_divergence") if loc else None
    if report.faulty.accuracy:
        end = (len(report.faulty.accuracy), report.faulty.final_accuracy)
        if fd:
            text = (f"diff, faulty vs clean, names\n{fd['layer']}\n({fd['pass']} {fd['quantity']}) "
                    f"in {loc['seconds']:.1f} s")
        else:
            text = "diff: not run" if loc is None else "diff: no divergence found"
        ax_acc.annotate(text, xy=end, xytext=(0.04, 0.6), textcoords="axes fraction", fontsize=8.5,
                        color="tab:red", arrowprops={"arrowstyle": "->", "color": "tab:red"})
    return fig


def save_figure(report: CanaryReport, path: str | os.PathLike) -> None:
    from densenet_debug.atomic import writing_file

    fig = loss_figure(report)
    with writing_file(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(str(path))[1].lstrip(".").lower() or "png", dpi=110)
