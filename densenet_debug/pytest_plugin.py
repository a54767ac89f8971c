"""pytest plugin (entry point ``pytest11``): the ``grad_reference`` fixture and ``--update-reference``.

In a test of your own model::

    def test_gradients(grad_reference):
        torch.manual_seed(0)
        model = MyNet()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        grad_reference.check(model, x, name="mynet")

``pytest --update-reference`` records ``<test dir>/reference_grads/mynet/``: the float64 CPU truth of one
training step (cross-entropy on ``targets``, or on labels drawn from ``torch.Generator().manual_seed(0)``),
every unit's inputs, outputs and gradients. Plain ``pytest`` then judges the model under the current
PyTorch (default backend of its device, or ``--reference-backend``) against it with the verdict engine,
every unit local and propagated, and fails with the first divergent layer and a table.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # torch is imported when a test asks for grad_reference, not at every pytest start
    import torch
    from torch import Tensor, nn

FOLDER = "reference_grads"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("densenet-debug", "gradient reference fixtures (densenet-debug)")
    group.addoption("--update-reference", action="store_true", default=False,
                    help="(re)record the fixtures of grad_reference.check instead of only checking them")
    group.addoption("--reference-backend", action="append", default=None, metavar="BACKEND",
                    help="backend grad_reference.check judges, repeatable (default: PyTorch's default on the "
                         "model's device: mkldnn on CPU, cudnn on CUDA)")


class GradReference:
    """Record (``--update-reference``) or check a model's gradients against ``<dir>/reference_grads/<name>/``."""

    def __init__(self, directory: Path, test_name: str, update: bool, backends: list[str] | None) -> None:
        self.directory = Path(directory)
        self.test_name = test_name
        self.update = update
        self.backends = backends

    def path(self, name: str) -> Path:
        return self.directory / FOLDER / name

    def check(self, model: nn.Module, inputs: Tensor, targets: Tensor | None = None, *, name: str | None = None,
              backend: str | list[str] | None = None, steps: int = 1, eval_mode: bool = False,
              max_mb: float | None = None) -> list:
        """Judge ``model`` on ``inputs`` against the stored reference; fail the test at a divergence.

        ``targets`` default to labels drawn from ``torch.Generator().manual_seed(0)`` over the model's output
        width. ``max_mb``: above it, only checkpoints are stored (see :mod:`densenet_debug.reference.record`).
        Returns the :class:`~densenet_debug.reference.check.ReferenceResult` of each backend.
        """
        from densenet_debug.errors import UsageError
        from densenet_debug.reference.check import check_reference, default_backend, load_reference, reference_oracle
        from densenet_debug.reference.format import FixtureError
        from densenet_debug.reference.record import DEFAULT_MAX_MB, record_reference

        name = name or _safe(self.test_name)
        target = self.path(name)
        if targets is None:
            targets = default_targets(model, inputs)
        device = _device(model)
        if self.update:
            record_reference(model, inputs, targets, target, name=name, steps=steps, eval_mode=eval_mode,
                             data={"how": f"given by the test {self.test_name}; stored in inputs.npz"},
                             max_mb=DEFAULT_MAX_MB if max_mb is None else max_mb)
        elif not target.exists():
            pytest.fail(f"no gradient reference at {target}; run pytest --update-reference to record it",
                        pytrace=False)
        try:
            fixture, loaded_model = load_reference(target, model)
        except FixtureError as exc:
            pytest.fail(f"{exc}; re-record with pytest --update-reference", pytrace=False)
        _same_or_fail("inputs", inputs, fixture.inputs, target / "inputs.npz")
        _same_or_fail("targets", targets, fixture.targets, target / "inputs.npz")
        state = model.state_dict()
        for key, stored in fixture.state.items():
            _same_or_fail(f"weight {key}", state[key], stored, target / "state.npz")
        step = fixture.meta.get("step", {})
        if int(step.get("steps", 1)) != steps or (step.get("bn_mode") == "eval") != eval_mode:
            pytest.fail(f"{target}/meta.json: recorded with steps={step.get('steps')}, BN {step.get('bn_mode')}; "
                        f"asked steps={steps}, eval_mode={eval_mode}; re-record with --update-reference",
                        pytrace=False)
        names = backend if backend is not None else (self.backends or [default_backend(device)])
        names = [names] if isinstance(names, str) else list(names)
        oracle, recomputed = reference_oracle(fixture, loaded_model)
        shared: dict = {}
        results = []
        for b in names:
            try:
                result = check_reference(target, b, device=device, loaded=(fixture, loaded_model, oracle, recomputed),
                                         shared=shared)
            except UsageError as exc:
                pytest.fail(f"grad_reference: {exc}", pytrace=False)
            results.append(result)
            if result.verdict != "agree":
                pytest.fail(f"gradient reference {name} ({target}):\n{result.message()}", pytrace=False)
        return results


def default_targets(model: nn.Module, inputs: Tensor) -> Tensor:
    """Labels for cross-entropy: ``torch.randint`` over the model's output width, seed 0 (reproducible)."""
    import copy

    import torch

    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        width = int(probe(inputs[:1]).shape[-1])
    return torch.randint(0, width, (inputs.shape[0],), generator=torch.Generator().manual_seed(0))


def _device(model: nn.Module) -> torch.device:
    import torch

    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _same_or_fail(what: str, given: Tensor, stored: Tensor, where: Path) -> None:
    import torch

    given = given.detach().cpu()
    if given.shape != stored.shape or given.dtype != stored.dtype or not torch.equal(given, stored):
        detail = (f"shape {tuple(given.shape)} {given.dtype} vs recorded {tuple(stored.shape)} {stored.dtype}"
                  if given.shape != stored.shape or given.dtype != stored.dtype
                  else f"max |difference| {float((given.double() - stored.double()).abs().max()):.3g}")
        pytest.fail(f"{where}: the {what} given differ from the recorded ones ({detail}); the check needs the "
                    "same model state and batch (seed them), or re-record with --update-reference", pytrace=False)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "reference"


@pytest.fixture
def grad_reference(request: pytest.FixtureRequest) -> GradReference:
    """Check a model's per-layer gradients against a stored float64 reference (see the module docstring)."""
    return GradReference(Path(request.node.path).parent, request.node.name,
                         bool(request.config.getoption("--update-reference")),
                         request.config.getoption("--reference-backend"))
