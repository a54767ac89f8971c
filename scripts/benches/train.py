"""Training-step speed and memory: ``scripts/bench.py train [--rounds N] [--batch B] [--threads T] [--configs C,..]``.

Three configurations, on the same random batch:

- ``ours``: our DenseNet-BC (features kept in a list, one cat per layer, named modules);
- ``seed``: the seed's recursive concatenation (bamos style: every layer returns ``torch.cat((x, out), 1)``,
  log-softmax + NLL), defined here with the same widths and parameter count;
- ``ours-memory-efficient``: ours with cat+BN+ReLU and BN+ReLU recomputed in backward (two
  ``torch.utils.checkpoint`` regions per layer, each stopping before its conv; each BN recomputed as the
  affine map of its forward's batch statistics, the ReLU in place on it).

Reported: seconds per SGD step (forward, backward, update), wall and CPU time of the process, over rounds
interleaved round-robin after a warm-up, all configurations in one process: the best of the rounds, the
median, and the spread of the per-round ratios (memory-efficient / ours within one round, the two steps
back to back, so a neighbour's load hits both alike). With one thread the CPU time leaves out the time the
process waited for a core, so it is the steadier figure on a shared machine; it still pays for memory
bandwidth the neighbours take. Images/s; and, in a separate process per configuration, the peak RSS growth
over one step from before it (activations, gradients, optimizer state, kernel scratch).
The memory processes run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps every tensor of 64 KiB or
more on its own and unmaps it when freed, so peak RSS is the peak of live memory rather than of a heap that
keeps freed blocks (the timing process keeps the default malloc).
Figures are ratios within this run: ours/seed images/s; memory-efficient/normal peak memory and time
(targets: memory <= 0.30x at <= 1.15x time; the Lua optMemory=4 reached 0.30x of its recursive-concatenation
baseline at 1.14x on a GPU).
"""


from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ("ours", "seed", "ours-memory-efficient")


def _seed_model(depth: int = 100, growth: int = 12, reduction: float = 0.5, classes: int = 10):
    """The seed's DenseNet-BC: each bottleneck concatenates its input with its output (quadratic memory)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            inter = 4 * growth
            self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, inter, 1, bias=False)
            self.bn2, self.conv2 = nn.BatchNorm2d(inter), nn.Conv2d(inter, growth, 3, padding=1, bias=False)

        def forward(self, x):
            out = self.conv1(F.relu(self.bn1(x)))
            out = self.conv2(F.relu(self.bn2(out)))
            return torch.cat((x, out), 1)

    class Transition(nn.Module):
        def __init__(self, channels: int, out: int) -> None:
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, out, 1, bias=False)

        def forward(self, x):
            return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)

    class SeedDenseNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            n = (depth - 4) // 6
            channels = 2 * growth
            self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
            stages = []
            for b in range(3):
                layers = []
                for _ in range(n):
                    layers.append(Bottleneck(channels))
                    channels += growth
                stages.append(nn.Sequential(*layers))
                if b < 2:
                    out = int(math.floor(channels * reduction))
                    stages.append(Transition(channels, out))
                    channels = out
            self.features = nn.Sequential(*stages)
            self.bn1 = nn.BatchNorm2d(channels)
            self.fc = nn.Linear(channels, classes)

        def forward(self, x):
            out = self.features(self.conv1(x))
            out = torch.flatten(F.avg_pool2d(F.relu(self.bn1(out)), 8), 1)
            return F.log_softmax(self.fc(out), dim=1)

    return SeedDenseNet()


def _setup(config: str, model_name: str, batch: int):
    import torch
    import torch.nn.functional as F

    from densenet_debug import build_model

    torch.manual_seed(0)
    if config == "seed":
        model, loss_fn = _seed_model(), F.nll_loss
    else:
        model, loss_fn = build_model(model_name, memory_efficient=config.endswith("memory-efficient")), F.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step() -> tuple[float, float]:
        """(wall, CPU) seconds of one step."""
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss_fn(model.train()(x), y).backward()
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    return model, step


def _memory_worker(config: str, model_name: str, batch: int, threads: int) -> dict:
    """Peak RSS growth over one training step, in a process of its own (per-thread scratch counts too)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, step = _setup(config, model_name, batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the peak so far
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"params": sum(p.numel() for p in model.parameters()), "peak_mib": (peak - before) / 1024}


def _time_worker(model_name: str, batch: int, rounds: int, threads: int, configs: list[str]) -> dict:
    """The configurations in one process, their steps interleaved round-robin after one warm-up each, so a
    neighbour's load on a shared machine hits every configuration alike; every step's wall and CPU time."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    steps = {config: _setup(config, model_name, batch)[1] for config in configs}
    for step in steps.values():
        step()
    times: dict[str, list[tuple[float, float]]] = {config: [] for config in configs}
    for _ in range(rounds):
        for config, step in steps.items():
            times[config].append(step())
    out = {}
    for config, t in times.items():
        wall, cpu = [w for w, _ in t], [c for _, c in t]
        out[config] = {"step_s": min(wall), "step_s_median": statistics.median(wall), "step_cpu_s": min(cpu),
                       "step_cpu_s_median": statistics.median(cpu), "wall_s": wall, "cpu_s": cpu,
                       "rounds": rounds, "threads": torch.get_num_threads()}
    return out


def _ratios(num: dict, den: dict) -> dict:
    """Best-of-rounds ratio, and the per-round ratios (steps back to back) with their median and range."""
    out = {}
    for clock in ("wall", "cpu"):
        per_round = [a / b for a, b in zip(num[f"{clock}_s"], den[f"{clock}_s"])]
        out[clock] = {"best_of_rounds": min(num[f"{clock}_s"]) / min(den[f"{clock}_s"]),
                      "per_round_median": statistics.median(per_round), "per_round_min": min(per_round),
                      "per_round_max": max(per_round), "per_round": per_round}
    return out


def _spawn(args: list[str], env: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                          check=True, env={**os.environ, **env})
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py train")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="densenet-bc-100", help="our builder name (the seed baseline is BC-100)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1, as the targets; 0: torch's default). On a machine "
                             "shared with other jobs keep 1: a descheduled OpenMP thread can stall every op ~100x")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {','.join(CONFIGS)} (default all)")
    args = parser.parse_args(argv)
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown or not configs:
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {','.join(CONFIGS)}")
    threads = str(args.threads)
    results = _spawn(["time", args.model, str(args.batch), str(args.rounds), threads, ",".join(configs)], {})
    for config in configs:
        results[config].update(_spawn(["memory", config, args.model, str(args.batch), threads],
                                      {"MALLOC_MMAP_THRESHOLD_": "65536"}))
        results[config]["images_per_s"] = args.batch / results[config]["step_s"]
        results[config]["peak_mib_per_sample"] = results[config]["peak_mib"] / args.batch
    report: dict = {"model": args.model, "batch": args.batch, "device": "cpu", "configs": results}
    ours, seed, eff = (results.get(c) for c in CONFIGS)
    if ours and seed:
        report["images_per_s_ratio_ours_vs_seed"] = ours["images_per_s"] / seed["images_per_s"]
        report["seed_vs_ours_peak_memory_ratio"] = seed["peak_mib"] / ours["peak_mib"]
    if ours and eff:
        ratios = _ratios(eff, ours)
        report.update({
            "memory_efficient_peak_memory_ratio": eff["peak_mib"] / ours["peak_mib"],
            "memory_efficient_time_ratio": ratios["wall"]["best_of_rounds"],
            "memory_efficient_cpu_time_ratio": ratios["cpu"]["best_of_rounds"],
            "memory_efficient_time_ratios": ratios,
            "targets": {"memory_efficient_peak_memory_ratio": "<= 0.30", "memory_efficient_time_ratio": "<= 1.15"},
        })
    return report


if __name__ == "__main__":
    if sys.argv[1:3] == ["--worker", "time"]:
        print(json.dumps(_time_worker(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
                                      sys.argv[7].split(","))))
    elif sys.argv[1:3] == ["--worker", "memory"]:
        print(json.dumps(_memory_worker(sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))))
    else:
        print(json.dumps(run(sys.argv[1:]), indent=2))
