"""``scripts/bench.py diff --baseline DIR``: two checkouts' diffs timed side by side in alternating children."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "diff", *args], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=600)


def test_each_side_runs_its_own_package_on_the_same_batch(tmp_path: Path) -> None:
    base = tmp_path / "baseline"
    shutil.copytree(ROOT / "densenet_debug", base / "densenet_debug",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = _bench("--model", "densenet-bc-10", "--batch", "2", "--threads", "1", "--repeat", "1",
                 "--baseline", str(base), "--rounds", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    (round_,) = result["rounds"]
    assert Path(round_["this"]["package"]).parent == ROOT / "densenet_debug"
    assert Path(round_["baseline"]["package"]).parent == base / "densenet_debug"
    for side in ("this", "baseline"):
        assert round_[side]["diff_seconds"] > 0 and round_[side]["anchor_seconds"] > 0
    assert result["this_over_baseline"] == round(result["this"]["ratio"] / result["baseline_median"]["ratio"], 3)


def test_a_baseline_without_the_package_is_refused_in_one_line(tmp_path: Path) -> None:
    out = _bench("--model", "densenet-bc-10", "--batch", "2", "--baseline", str(tmp_path))
    assert out.returncode != 0
    assert "no densenet_debug package there" in out.stderr and "Traceback" not in out.stderr
