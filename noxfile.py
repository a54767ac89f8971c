"""Torch-version matrix: the committed reference fixtures and the cat->conv sweep under each PyTorch release.

``make matrix`` (or ``nox -f noxfile.py``) runs, for every version in ``TORCH_VERSIONS`` (default 2.13.0 and
2.14.1; override with the environment variable, e.g. ``TORCH_VERSIONS=2.14.1``), in its own reused
virtualenv: ``densenet-debug check-reference`` on every fixture of ``reference_grads/`` with each CPU backend,
and ``densenet-debug sweep cat-conv``. The ``table`` session then writes the versions x checks table
to ``work/matrix.md`` and ``work/matrix.json``. Not part of CI: installing a release takes minutes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nox

from densenet_debug.atomic import write_text

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "matrix"
TORCH_VERSIONS = os.environ.get("TORCH_VERSIONS", "2.13.0,2.14.1").split(",")
BACKENDS = ["mkldnn", "native", "fp64", "channels_last"]

nox.options.sessions = ["reference", "table"]
nox.options.reuse_existing_virtualenvs = True


def _fixtures() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "reference_grads").glob("*/meta.json") if not p.parent.name.startswith("."))


@nox.session(reuse_venv=True)
@nox.parametrize("torch", TORCH_VERSIONS)
def reference(session: nox.Session, torch: str) -> None:
    """Install one torch release, then check every fixture with every CPU backend and run the sweep."""
    session.install(f"torch=={torch}")
    session.install("numpy", "rich", "pytest", "hypothesis")
    session.install("--no-deps", "-e", str(ROOT))
    out = WORK / torch
    out.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": "1"}  # judging is many small ops: one thread is faster on a busy small machine
    version = session.run("python", "-c", "import torch, sys; sys.stdout.write(torch.__version__)", silent=True)
    checks = []
    for fixture in _fixtures():
        for backend in BACKENDS:
            target = out / f"{fixture.name}--{backend}.json"
            target.unlink(missing_ok=True)
            start = time.perf_counter()
            text = session.run("densenet-debug", "check-reference", str(fixture), "--backend", backend,
                               "--json", str(target), env=env, silent=True, success_codes=[0, 1, 2])
            checks.append(_summary(f"{fixture.name} {backend}", target, text, time.perf_counter() - start))
    target = out / "sweep-cat-conv.json"
    target.unlink(missing_ok=True)
    start = time.perf_counter()
    text = session.run("densenet-debug", "sweep", "cat-conv", "--json", str(target), env=env, silent=True,
                       success_codes=[0, 1, 2])
    checks.append(_summary("sweep cat-conv (mkldnn vs native)", target, text, time.perf_counter() - start))
    write_text(out / "summary.json", json.dumps({"torch": str(version).strip(), "checks": checks}, indent=1))


def _summary(check: str, result: Path, output: str | None, seconds: float) -> dict:
    """One cell: verdict, where it first diverged, or the error line when the check could not run."""
    if not result.is_file():
        lines = [ln for ln in (output or "").splitlines() if ln.strip()]
        return {"check": check, "verdict": "error", "detail": lines[-1] if lines else "no output",
                "seconds": round(seconds, 1)}
    data = json.loads(result.read_text())
    if "cases" in data:  # the sweep: one verdict per case
        failing = [c for c in data["cases"] if c.get("verdict") != "agree"]
        detail = f"{len(data['cases'])} cases" + (f"; first failing {failing[0]['case'].get('id')}" if failing else "")
        return {"check": check, "file": result.name, "verdict": "mismatch" if failing else "agree",
                "detail": detail, "seconds": round(seconds, 1), "rows": len(data["cases"]), "kink_elements": 0}
    first = data.get("first_divergence")
    detail = ""
    if first:
        detail = f"{first.get('mode')} {first.get('layer')} {first.get('pass')} {first.get('quantity')}"
    repro = data.get("reproduction") or []
    kinks = sum(k.get("count", 0) for k in data.get("kinks", []))
    cell = {"check": check, "file": result.name, "verdict": data.get("verdict"), "detail": detail,
            "seconds": round(seconds, 1),
            "rows": len(data.get("rows", [])), "kink_elements": kinks}
    if repro:
        cell["reproduction"] = "ok" if all(r["status"] == "ok" for r in repro) else "drifted"
        cell["reproduction_max_error"] = max((r["error_a"] for r in repro if isinstance(r["error_a"], float)),
                                             default=0.0)
    return cell


@nox.session(venv_backend="none")
def table(session: nox.Session) -> None:
    """Combine work/matrix/<version>/summary.json into work/matrix.md and work/matrix.json."""
    summaries = {}
    for path in sorted(WORK.glob("*/summary.json")):
        data = json.loads(path.read_text())
        cells = {}
        for c in data["checks"]:  # re-read each result, so the table follows the latest summarising rules
            result = path.parent / str(c.get("file"))
            cells[c["check"]] = _summary(c["check"], result, c.get("detail"), c["seconds"]) if result.is_file() else c
        summaries[data["torch"]] = cells
    if not summaries:
        session.error("no results under work/matrix/: run the reference sessions first")
    versions = sorted(summaries)
    checks = list(dict.fromkeys(c for v in versions for c in summaries[v]))
    lines = ["| check | " + " | ".join(f"torch {v}" for v in versions) + " |",
             "|---|" + "---|" * len(versions)]
    for check in checks:
        cells = []
        for v in versions:
            c = summaries[v].get(check)
            if c is None:
                cells.append("-")
                continue
            text = str(c["verdict"]) + (f" ({c['detail']})" if c.get("detail") else "")
            if c.get("kink_elements"):
                text += f", {c['kink_elements']} kink element(s) explained"
            if "reproduction" in c:
                text += f"; fp64 reproduction {c['reproduction']} (max {c['reproduction_max_error']:.1e})"
            cells.append(text)
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    write_text(ROOT / "work" / "matrix.md", "\n".join(lines) + "\n")
    write_text(ROOT / "work" / "matrix.json", json.dumps({"schema": "densenet-debug/matrix/1", "versions": versions,
                                                         "results": summaries}, indent=1))
    session.log("\n".join(lines))
