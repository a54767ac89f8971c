"""Layer-by-layer reference suite: every committed fixture x every backend of the machine, by layer group.

Test ids read ``<fixture>-<backend>-<group>`` (``bc100-mkldnn-block2``), so a failure says where. Each
backend is judged once per fixture (cached for the module); the ids split that one verdict by layer group.
CUDA ids carry ``@pytest.mark.gpu`` and skip with a reason here; BC-100 ids carry ``slow``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from densenet_debug.reference.check import ReferenceResult, check_reference, load_reference, reference_oracle
from densenet_debug.verdict.engine import JudgeCache

REFERENCE = Path(__file__).resolve().parents[2] / "reference_grads"
CPU_BACKENDS = ["native", "mkldnn", "fp64", "channels_last"]
# tf32 is judged with TF32's own precision (u = 2^-11 for conv/matmul operands), see densenet_debug.backends.
GPU_BACKENDS = ["cudnn", "no-cudnn", "cudnn-benchmark", "cudnn-deterministic", "channels_last", "tf32"]


def _label(name: str) -> str:
    return name.removeprefix("densenet-").replace("bc-", "bc")


def _groups(path: Path) -> list[str]:
    """Top-level modules of the recorded units, in forward order (stem, block1, trans1 ... head)."""
    units = json.loads((path / "index.json").read_text())["steps"][0]["units"]
    ordered = sorted(units, key=lambda u: units[u]["forward_index"])
    return list(dict.fromkeys(u.split(".")[0] for u in ordered))


def _group(layer: str) -> str:
    return "head" if layer == "loss" else layer.split(".")[0]


FIXTURES = sorted(p.parent for p in REFERENCE.glob("*/meta.json") if not p.parent.name.startswith("."))


def _cases() -> Iterator[object]:
    for path in FIXTURES:
        slow = [pytest.mark.slow] if "bc-100" in path.name else []
        for device, backends, marks in (("cpu", CPU_BACKENDS, []), ("cuda", GPU_BACKENDS, [pytest.mark.gpu])):
            for backend in backends:
                shown = backend if device == "cpu" or backend != "channels_last" else "cuda_channels_last"
                for group in _groups(path):
                    yield pytest.param(path, device, backend, group, marks=slow + marks,
                                       id=f"{_label(path.name)}-{shown}-{group}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Judging is many small ops; on a busy 2-core machine two threads oversubscribe and run ~10x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class _Judged:
    """One load (fixture, model, oracle) at a time, one verdict per (fixture, backend, device)."""

    def __init__(self) -> None:
        self.loaded: tuple | None = None
        self.shared = JudgeCache()
        self.results: dict[tuple, ReferenceResult] = {}

    def __call__(self, path: Path, backend: str, device: str) -> ReferenceResult:
        key = (path, backend, device)
        if key not in self.results:
            if self.loaded is None or self.loaded[0].path != path:
                self.loaded, self.shared = None, JudgeCache()  # frees the previous fixture's oracle (BC-100: ~0.5 GB)
                fixture, model = load_reference(path)
                self.loaded = (fixture, model, *reference_oracle(fixture, model))
            self.results[key] = check_reference(path, backend, device=device, loaded=self.loaded,
                                                shared=self.shared)
        return self.results[key]


@pytest.fixture(scope="module")
def judged() -> _Judged:
    return _Judged()


def test_committed_fixtures_exist_and_fit_the_budget() -> None:
    names = {p.name for p in FIXTURES}
    assert {"densenet-bc-100", "densenet-bc-16"} <= names
    total = sum(f.stat().st_size for p in FIXTURES for f in p.iterdir())
    assert total <= 25e6, f"reference_grads/ holds {total / 1e6:.1f} MB > 25 MB"
    bc100 = json.loads((REFERENCE / "densenet-bc-100" / "meta.json").read_text())
    assert bc100["model"]["config"]["growth_rate"] == 12 and bc100["data"]["batch"] == 2


@pytest.mark.parametrize("path, device, backend, group", list(_cases()))
def test_reference(judged: _Judged, path: Path, device: str, backend: str, group: str) -> None:
    result = judged(path, backend, device)
    rows = [r for r in result.reproduction + result.rows if _group(r.layer) == group]
    assert rows, f"no rows for layer group {group} in {path.name}"
    bad = [r for r in rows if r.status == "mismatch"]
    assert not bad, (f"{len(bad)} mismatch row(s) in {group}; first: {bad[0].layer} {bad[0].pass_} "
                     f"{bad[0].quantity} ({bad[0].mode}, step {bad[0].step}) error {bad[0].error_a:.3g} > "
                     f"tolerance {bad[0].tolerance:.3g}\n{result.message()}")


# -- the suite can fail: planted faults and a drifted truth are caught where they are ------------------------
PLANTED = [
    ("densenet-bc-16", "native+fault:strided_read_as_contiguous@block1.layer02.conv2", "block1.layer02.conv2"),
    ("densenet-bc-10-full", "mkldnn+fault:cat_backward_slice_offset@block2.cat", "block2.cat"),
    ("densenet-bc-10-eval", "native+fault:bn_eval_backward_uses_batch_stats@trans1.norm", "trans1.norm"),
    ("densenet-bc-10-steps2", "native+fault:stale_grad_accumulate@block2.layer01.conv1", "block2.layer01.conv1"),
]


@pytest.mark.parametrize("name, backend, layer", PLANTED, ids=[f"{_label(p[0])}-{p[1].split(':')[1]}"
                                                               for p in PLANTED])
def test_planted_fault_fails_at_its_layer(name: str, backend: str, layer: str) -> None:
    result = check_reference(REFERENCE / name, backend)
    assert result.verdict == "mismatch"
    first = result.first_divergence
    assert first["layer"] == layer and first["mode"] == "local", first
    assert layer in result.message().splitlines()[0]
    # every recorded step is judged (a stale-state fault has a second step to show on)
    assert {r.step for r in result.rows} == set(range(result.settings["steps"]))


def test_drifted_truth_fails_as_reproduction_at_its_unit() -> None:
    fixture, model = load_reference(REFERENCE / "densenet-bc-16")
    rec = fixture.traces[0]["block2.layer01.conv2"]
    # 1e-9 relative: invisible to every float32 check, far above float64 noise
    rec.param_grads["weight"] = rec.param_grads["weight"] * (1 + 1e-9)
    peak = float(rec.param_grads["weight"].abs().max())
    result = check_reference(fixture, "fp64", model=model)
    assert result.verdict == "mismatch"
    first = result.first_divergence
    assert (first["layer"], first["quantity"], first["mode"]) == ("block2.layer01.conv2", "grad_weight",
                                                                   "reproduction")
    row = next(r for r in result.reproduction if (r.layer, r.quantity) == ("block2.layer01.conv2", "grad_weight"))
    # read on the scale of the gradient's terms (sum |terms| >= |sum|): the drift 1e-9 of the peak over that scale
    assert row.scale is not None and row.scale >= peak
    assert math.isclose(first["error"], 1e-9 * peak / row.scale, rel_tol=0.2)
    assert "drifted from the stored truth" in result.summary


def test_an_old_schema_is_refused_in_one_line_saying_how_to_re_record(tmp_path: Path) -> None:
    import shutil

    from densenet_debug.reference.format import read_fixture
    from densenet_debug.reference.meta import FixtureError

    old = tmp_path / "old"
    shutil.copytree(REFERENCE / "densenet-bc-10-eval", old)
    meta = json.loads((old / "meta.json").read_text())
    meta["schema"] = "densenet-debug/reference/0"
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FixtureError) as err:
        read_fixture(old)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "scripts/regen_reference" in message and "older" in message
