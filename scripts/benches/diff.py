"""Cost of a full diff: ``scripts/bench.py diff [--model NAME] [--batch B] [--a X] [--b Y] [--repeat R] [--threads T]
[--no-memory | --memory-only] [--default-malloc] [--baseline DIR [--rounds N]]``.

Side by side (``--baseline DIR``, another checkout): this checkout's diff and the baseline's, each timed against its
own anchor in its own child process, the two alternating for ``--rounds`` rounds; medians per side, and
``this_over_baseline`` = the ratio of the two median ratios (issue 12: a diff no slower than the one it was filed
against).

Time. Anchor, measured in the same process on the same batch: three plain forward+backward passes, one per
backend the diff runs (A, B and the fp64 oracle), each in its own flags. Figure: ``ratio`` = seconds of
one full :func:`densenet_debug.verdict.engine.diff` (oracle, both sides' traces, every unit's teacher-forced
replay, error models, kink counterfactuals, report) over the anchor. Target: <= 3.0 on BC-100, batch 8, one
thread (issue 13). The minimum over ``--repeat`` runs is taken for both, after one warm-up of each;
``--repeat 0`` times the one cold diff of the memory measurement instead (for large batches, where a diff
takes minutes).

``stages_seconds`` splits the timed diff by its progress stages (:class:`densenet_debug.progress.Timings`:
inclusive seconds per stage label, summed over sides), to say where the time goes.

Memory. Each in its own child process, started fresh, its peak resident set read by the parent from the
child's own rusage (``os.wait4``, ``ru_maxrss``): one plain fp32 training step of the same model and batch
(forward, cross-entropy, backward, default flags), and one full diff. Figure: ``memory.ratio`` = the diff's
peak over the plain step's. Target: <= 4.0 on BC-100 at batch 64 (issue 13). Both are whole-process peaks
(interpreter, torch and the model included). Both children run with ``MALLOC_MMAP_THRESHOLD_=65536`` (as
``bench.py train``'s memory processes): glibc then maps every block of 64 KiB or more on its own and unmaps
it when freed, so the peak is of live memory, not of a heap holding freed blocks (with the default malloc a
float64 step of BC-100 shows ~1.5x its live memory at batch 8); ``--default-malloc`` measures as a user runs
it. Where the diff's records go past the trace budget (``DENSENET_DEBUG_TRACE_BUDGET_MB``, inherited by the
child) they are written to an anonymous temporary file: ``memory.diff_spilled_gb`` reports how much.
``memory.diff_warnings`` lists what the diff warned about (a between check left out where its graph would not
fit in the memory available): the figures are of what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

TIME_TARGET = 3.0
MEMORY_TARGET = 4.0


def _plain_pass(backend, model, x, y) -> float:  # noqa: ANN001
    import torch.nn.functional as F

    xs, ys = backend.prepare_input(x), y.to(backend.device)
    start = time.perf_counter()
    with backend.active():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xs), ys).backward()
    return time.perf_counter() - start


def _setup(model_name: str, batch: int, threads: int | None):  # noqa: ANN202
    import torch

    from densenet_debug.models import build_model
    from densenet_debug.models.batch import make_batch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name)
    x, y = make_batch(model, (3, 32, 32), batch, seed=0, num_classes=10)
    return model, x, y


def _child(argv: list[str]) -> None:
    """``diff.py --child plain|diff MODEL BATCH THREADS A B``: one measured run, a JSON line on stdout."""
    what, model_name, batch, threads, a, b = argv
    model, x, y = _setup(model_name, int(batch), int(threads) or None)
    out: dict = {}
    if what == "plain":
        import torch.nn.functional as F

        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    else:
        from densenet_debug import trace
        from densenet_debug.verdict.engine import diff

        start = time.perf_counter()
        report = diff(model, x, y, a, b)
        store = getattr(trace, "TensorStore", None)  # absent before streaming: to bench an older checkout
        out = {"seconds": time.perf_counter() - start, "verdict": report.verdict,
               "kinks": sum(k.count for k in report.kinks),
               "spilled_bytes": store.written_in_process if store is not None else 0}
    print(json.dumps(out))


def _measure(what: str, args: argparse.Namespace) -> dict:
    """Run one child and read its peak RSS from its rusage; the child's JSON line joins the result."""
    cmd = [sys.executable, __file__, "--child", what, args.model, str(args.batch), str(args.threads or 0),
           args.a, args.b]
    env = dict(os.environ) if args.default_malloc else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the children's total
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} child failed:\n{stderr[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
    # what the diff warned about (a between check left out for memory, say): the figures are of what ran
    result["warnings"] = [line.strip() for line in stderr.splitlines() if "Warning" in line or "warning:" in line]
    return result


def _measure_memory(args: argparse.Namespace) -> dict:
    plain = _measure("plain", args)
    full = _measure("diff", args)
    return {
        "ratio": round(full["peak_rss_mb"] / plain["peak_rss_mb"], 3),
        "target": MEMORY_TARGET,
        "plain_step_peak_rss_mb": plain["peak_rss_mb"],
        "diff_peak_rss_mb": full["peak_rss_mb"],
        "diff_spilled_gb": round(full["spilled_bytes"] / 2**30, 3),
        "diff_cold_seconds": round(full["seconds"], 3),
        "verdict": full["verdict"],
        "diff_warnings": full["warnings"],
        "malloc": "default" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=65536",
    }


def _side_by_side(args: argparse.Namespace) -> dict:
    """``--baseline DIR``: per round, this checkout's child then the baseline's (``diff_side_by_side.py``, each
    with its own package first on ``PYTHONPATH``), each timing its own anchor and its diff (best of
    ``--repeat`` after a warm-up). The figures are the medians over rounds of each side's ratio and seconds;
    alternating rounds share the machine's load between the two, where one run of each at different times on a
    shared machine moved either ratio by a fifth."""
    import statistics
    from pathlib import Path

    here = Path(__file__).resolve().parents[2]
    base = Path(args.baseline).resolve()
    if not (base / "densenet_debug" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {args.baseline}: no densenet_debug package there")
    child = Path(__file__).with_name("diff_side_by_side.py")
    rounds: list[dict] = []
    for _ in range(max(args.rounds, 1)):
        entry = {}
        for label, root in (("this", here), ("baseline", base)):
            env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            out = subprocess.run([sys.executable, str(child), args.model, str(args.batch), str(args.threads or 0),
                                  args.a, args.b, str(max(args.repeat, 1))], cwd=root, env=env,
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"{label} child failed:\n{out.stderr[-2000:]}")
            entry[label] = json.loads(out.stdout.strip().splitlines()[-1])
        rounds.append(entry)

    def median(label: str, key: str) -> float:
        return round(statistics.median(r[label][key] for r in rounds), 3)

    return {
        "model": args.model, "batch": args.batch, "a": args.a, "b": args.b, "threads": args.threads,
        "baseline": str(base), "rounds": rounds,
        "this": {"ratio": median("this", "ratio"), "diff_seconds": median("this", "diff_seconds"),
                 "anchor_seconds": median("this", "anchor_seconds")},
        "baseline_median": {"ratio": median("baseline", "ratio"), "diff_seconds": median("baseline", "diff_seconds"),
                            "anchor_seconds": median("baseline", "anchor_seconds")},
        "this_over_baseline": round(median("this", "ratio") / median("baseline", "ratio"), 3),
    }


def run(argv: list[str]) -> dict:
    import torch

    from densenet_debug.backends import default_pair, parse_backend
    from densenet_debug.verdict.engine import diff

    da, db = default_pair()
    parser = argparse.ArgumentParser(prog="bench.py diff")
    parser.add_argument("--model", default="densenet-bc-100")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--a", default=da)
    parser.add_argument("--b", default=db)
    parser.add_argument("--repeat", type=int, default=2, help="timed diffs after a warm-up; 0: time the cold "
                        "diff of the memory child instead")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both the anchor and the diff (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the two memory child processes")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the two memory children (no anchor passes in this process: at batch 64 the "
                        "float64 pass alone holds several GB)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="measure memory with glibc's default malloc (peaks include freed heap blocks)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="another checkout of this repository: time its diff and this one's side by side, in "
                        "alternating child processes (--rounds), instead of the measurements above")
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline: alternating rounds (default 3)")
    args = parser.parse_args(argv)
    if args.baseline:
        return _side_by_side(args)
    if args.no_memory and (args.repeat == 0 or args.memory_only):
        parser.error("--repeat 0 and --memory-only need the memory measurement")

    memory = None if args.no_memory else _measure_memory(args)  # first, in a quiet parent
    if args.memory_only:
        return {"model": args.model, "batch": args.batch, "a": args.a, "b": args.b, "threads": args.threads,
                "memory": memory}

    model, x, y = _setup(args.model, args.batch, args.threads)
    backends = [parse_backend(args.a), parse_backend(args.b), parse_backend("fp64", "cpu")]
    prepared = [b.prepare_model(model) for b in backends]
    anchor_parts = {b.name: [] for b in backends}
    for _ in range(max(args.repeat, 1) + 1):
        for b, m in zip(backends, prepared):
            anchor_parts[b.name].append(_plain_pass(b, m, x, y))
    anchor = {k: min(v[1:]) for k, v in anchor_parts.items()}
    anchor_total = sum(anchor.values())
    del prepared

    report, stages = None, None
    if args.repeat:
        from densenet_debug import progress

        diff_times = []
        for _ in range(args.repeat + 1):
            timings = progress.Timings()
            start = time.perf_counter()
            with progress.installed(timings):
                report = diff(model, x, y, args.a, args.b)
            diff_times.append(time.perf_counter() - start)
            if len(diff_times) > 1 and diff_times[-1] == min(diff_times[1:]):
                stages = timings.seconds  # the stages of the run whose time is reported
        diff_time = min(diff_times[1:])
    else:
        diff_time = memory["diff_cold_seconds"]
    result = {
        "ratio": round(diff_time / anchor_total, 3),
        "target": TIME_TARGET,
        "diff_seconds": round(diff_time, 3),
        "diff_timed": "warm, best of repeats" if args.repeat else "cold, one run (the memory child's)",
        "anchor_seconds": round(anchor_total, 3),
        "anchor_parts_seconds": {k: round(v, 3) for k, v in anchor.items()},
        # where the timed diff's seconds went: progress stages, inclusive (the traced steps, local units,
        # propagated, counterfactual and between stages all lie inside "judging units")
        "stages_seconds": {k: round(v, 3) for k, v in (stages or {}).items()},
        "model": args.model, "batch": args.batch, "a": args.a, "b": args.b,
        "threads": torch.get_num_threads(),
        "verdict": report.verdict if report else memory["verdict"],
        "kinks": sum(k.count for k in report.kinks) if report else None,
        "parent_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if memory is not None:
        result["memory"] = memory
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
    else:
        print(json.dumps(run(sys.argv[1:]), indent=2))
