"""Torch-version matrix: the committed reference fixtures and the cat->conv sweep under each PyTorch release.

``make matrix`` (or ``nox -f noxfile.py``) runs, for every version in ``TORCH_VERSIONS`` (default 2.13.0 and
2.14.1; override with the environment variable, e.g. ``TORCH_VERSIONS=2.14.1``), in its own reused
virtualenv under ``.nox/`` (~8 GB of disk for the default two: PyPI's torch wheels bring their CUDA
libraries): ``densenet-debug check-reference`` on every fixture of ``reference_grads/`` with each CPU
backend, and ``densenet-debug sweep cat-conv``. The ``table`` session then writes the versions x checks
table to ``work/matrix.md`` and ``work/matrix.json`` and says what regressed: a cell whose verdict, first
divergence or float64 reproduction differs from the previous version's is marked ``CHANGED``, and the
session (so ``make matrix``) fails when any cell is not ``agree`` (a mismatch, or a check that could not
run). Not part of CI: installing a release takes minutes.
"""

from __future__ import annotations

import json
import os
import re
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
                               "--json", str(target), env=env, silent=True, success_codes=[0, 1, 2, 3])
            checks.append(_summary(f"{fixture.name} {backend}", target, text, time.perf_counter() - start))
    target = out / "sweep-cat-conv.json"
    target.unlink(missing_ok=True)
    start = time.perf_counter()
    text = session.run("densenet-debug", "sweep", "cat-conv", "--json", str(target), env=env, silent=True,
                       success_codes=[0, 1, 2, 3])
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
        detail += f" {first['op']}" if first.get("op") else ""  # diff/3: the aten op inside (diff --ops)
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


def collect(work: Path) -> dict[str, dict[str, dict]]:
    """``{torch version: {check: cell}}`` from ``work/<version>/summary.json`` and the result files beside it."""
    summaries = {}
    for path in sorted(work.glob("*/summary.json")):
        data = json.loads(path.read_text())
        cells = {}
        for c in data["checks"]:  # re-read each result, so the table follows the latest summarising rules
            result = path.parent / str(c.get("file"))
            cells[c["check"]] = _summary(c["check"], result, c.get("detail"), c["seconds"]) if result.is_file() else c
        summaries[data["torch"]] = cells
    return summaries


def version_key(version: str) -> tuple[int, ...]:
    """``2.9.0`` before ``2.13.0`` (numbers, not text); a local suffix (``+cpu``) is ignored."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0]))


def _signature(cell: dict | None) -> tuple | None:
    """What a regression is about: the verdict, where it first diverged, the float64 reproduction."""
    return None if cell is None else (cell.get("verdict"), cell.get("detail") or "", cell.get("reproduction"))


def _describe(cell: dict | None) -> str:
    if cell is None:
        return "not run"
    return str(cell.get("verdict")) + (f" ({cell['detail']})" if cell.get("detail") else "")


def compare(summaries: dict[str, dict[str, dict]]) -> dict:
    """Versions in order, checks, the cells not ``agree`` and the cells that changed from the previous version."""
    versions = sorted(summaries, key=version_key)
    checks = list(dict.fromkeys(c for v in versions for c in summaries[v]))
    failing = [{"check": check, "torch": v, "cell": _describe(summaries[v].get(check))}
               for check in checks for v in versions if (summaries[v].get(check) or {}).get("verdict") != "agree"]
    changed = []
    for check in checks:
        for before, after in zip(versions, versions[1:]):
            old, new = summaries[before].get(check), summaries[after].get(check)
            if _signature(old) != _signature(new):
                changed.append({"check": check, "from": before, "to": after,
                                "was": _describe(old), "now": _describe(new)})
    return {"versions": versions, "checks": checks, "failing": failing, "changed": changed}


def render(summaries: dict[str, dict[str, dict]], verdict: dict) -> str:
    """The markdown table, each changed cell marked, then one line per regression and per failing cell."""
    versions = verdict["versions"]
    changed = {(c["check"], c["to"]) for c in verdict["changed"]}
    lines = ["| check | " + " | ".join(f"torch {v}" for v in versions) + " |", "|---|" + "---|" * len(versions)]
    for check in verdict["checks"]:
        cells = []
        for v in versions:
            c = summaries[v].get(check)
            text = "-" if c is None else _describe(c)
            if c is not None and c.get("kink_elements"):
                text += f", {c['kink_elements']} kink element(s) explained"
            if c is not None and "reproduction" in c:
                text += f"; fp64 reproduction {c['reproduction']} (max {c['reproduction_max_error']:.1e})"
            if (check, v) in changed:
                text = f"**CHANGED** {text}"
            cells.append(text)
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    lines.append("")
    if verdict["changed"]:
        lines.append(f"Changed between torch versions ({len(verdict['changed'])}):")
        lines += [f"- {c['check']}: torch {c['from']} {c['was']} -> torch {c['to']} {c['now']}"
                  for c in verdict["changed"]]
    else:
        lines.append("No cell changed between torch versions.")
    if verdict["failing"]:
        lines.append(f"Not agree ({len(verdict['failing'])}):")
        lines += [f"- {f['check']} under torch {f['torch']}: {f['cell']}" for f in verdict["failing"]]
    else:
        lines.append("Every cell agrees.")
    return "\n".join(lines) + "\n"


def problems(verdict: dict) -> str | None:
    """Why ``make matrix`` fails (any cell not ``agree``), in one line; None when every cell agrees."""
    if not verdict["failing"]:
        return None
    first = verdict["failing"][0]
    regressions = f", {len(verdict['changed'])} changed between torch versions" if verdict["changed"] else ""
    return (f"{len(verdict['failing'])} cell(s) not agree{regressions}; first: {first['check']} under torch "
            f"{first['torch']}: {first['cell']} (see work/matrix.md)")


@nox.session(venv_backend="none")
def table(session: nox.Session) -> None:
    """Combine work/matrix/<version>/summary.json into work/matrix.md and .json; fail on any cell not agree."""
    summaries = collect(WORK)
    if not summaries:
        session.error("no results under work/matrix/: run the reference sessions first")
    verdict = compare(summaries)
    text = render(summaries, verdict)
    write_text(ROOT / "work" / "matrix.md", text)
    write_text(ROOT / "work" / "matrix.json", json.dumps({"schema": "densenet-debug/matrix/2", **verdict,
                                                         "results": summaries}, indent=1))
    session.log(text)
    failure = problems(verdict)
    if failure:
        session.error(failure)
