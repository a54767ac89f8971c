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

As a user meets it: ``--update-reference`` ends with a summary of where each reference went and what it
holds; two tests using one ``name=`` are an error (one would silently replace the other's reference); a
failure prints its message once; with several ``--reference-backend``, every backend is judged and every
failing one reported; a CUDA backend on a machine without CUDA is skipped with the reason (the test is
skipped when no requested backend can run here). A reference recorded from Python stores no code: check it
from the command line with ``densenet-debug check-reference DIR --model test_file.py:ModelClassOrFactory``
(called without arguments; the model must have the recorded structure).
"""

from __future__ import annotations

import re
import warnings
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
                    help="(re)record the fixtures of grad_reference.check, then check them; the run ends "
                         "with where each was written")
    group.addoption("--reference-backend", action="append", default=None, metavar="BACKEND",
                    help="backend grad_reference.check judges, repeatable: every one is judged and every "
                         "failing one reported; a CUDA backend skips without CUDA (default: PyTorch's default on "
                         "the model's device: mkldnn on CPU, cudnn on CUDA)")


class GradReference:
    """Record (``--update-reference``) or check a model's gradients against ``<dir>/reference_grads/<name>/``."""

    def __init__(self, directory: Path, test_name: str, update: bool, backends: list[str] | None,
                 nodeid: str = "", claimed: dict[Path, str] | None = None, written: list[str] | None = None) -> None:
        self.directory = Path(directory)
        self.test_name = test_name
        self.update = update
        self.backends = backends
        self.nodeid = nodeid or test_name
        self._claimed = {} if claimed is None else claimed  # fixture path -> the test that uses it (this session)
        self._written = [] if written is None else written  # what --update-reference wrote, for the summary

    def path(self, name: str) -> Path:
        return self.directory / FOLDER / name

    def check(self, model: nn.Module, inputs: Tensor, targets: Tensor | None = None, *, name: str | None = None,
              backend: str | list[str] | None = None, steps: int = 1, eval_mode: bool = False,
              max_mb: float | None = None, ops: bool = False) -> list:
        """Judge ``model`` on ``inputs`` against the stored reference; fail the test at a divergence.

        ``ops``: the reference also stores the float64 oracle's op capture (``--update-reference`` records it)
        and every aten op of each backend's first step is judged against it too; a reference recorded without
        one fails the test in one line (re-record it with ``--update-reference``).

        ``targets`` default to labels drawn from ``torch.Generator().manual_seed(0)`` over the model's output
        width. ``max_mb``: above it, only checkpoints are stored (see :mod:`densenet_debug.reference.record`).
        Every backend is judged and every failing one reported; a CUDA backend on a machine without CUDA is
        skipped with a reason (the test is skipped when no backend can run). Returns the
        :class:`~densenet_debug.reference.check.ReferenceResult` of each backend judged.
        """
        name = name or _safe(self.test_name)
        target = self.path(name)
        self._claim(target, name)
        if targets is None:
            targets = default_targets(model, inputs)
        if self.update:
            _fail_if(self._record(model, inputs, targets, target, name, steps, eval_mode, max_mb, ops))
        elif not target.exists():
            _fail_if(f"no gradient reference at {target}; run pytest --update-reference to record it")
        loaded, problem = _load(target, model, inputs, targets, steps, eval_mode)
        _fail_if(problem)
        chosen = backend if backend is not None else (self.backends or [None])
        names = [chosen] if isinstance(chosen, str) else list(chosen)
        if ops and loaded[0].ops is None:
            _fail_if(f"{target}: recorded without an op capture, asked to check with ops=True; re-record with "
                     f"pytest --update-reference")
        return self._judge(loaded, names, name, target, _device(model), ops)

    # -- steps of check ------------------------------------------------------------------------------------------
    def _claim(self, target: Path, name: str) -> None:
        """Two tests with one ``name=`` would overwrite each other's reference: an error, not a race."""
        owner = self._claimed.setdefault(target.resolve(), self.nodeid)
        _fail_if(None if owner == self.nodeid else (
            f"grad_reference name {name!r} is already used by {owner}; two tests would record and check the same "
            f"{target} (the later silently replacing the earlier): give each check its own name="))

    def _record(self, model: nn.Module, inputs: Tensor, targets: Tensor, target: Path, name: str, steps: int,
                eval_mode: bool, max_mb: float | None, ops: bool = False) -> str | None:
        from densenet_debug.errors import UsageError
        from densenet_debug.reference.meta import read_meta
        from densenet_debug.reference.record import DEFAULT_MAX_MB, OracleDisagreement, record_reference

        try:
            record_reference(model, inputs, targets, target, name=name, steps=steps, eval_mode=eval_mode,
                             data={"how": f"given by the test {self.test_name}; stored in inputs.npz"},
                             max_mb=DEFAULT_MAX_MB if max_mb is None else max_mb, ops=ops)
        except (UsageError, OracleDisagreement) as exc:
            return f"grad_reference: recording {target} failed: {exc}"
        meta = read_meta(target)
        files = sorted(p.name for p in target.iterdir())
        size = sum((target / f).stat().st_size for f in files)
        calls = sum(len(step) for step in meta.get("functions", {}).get("calls", []))
        functions = f", {calls} custom Function call(s)" if calls else ""
        functions += f", {meta['ops']['records']} ops captured" if "ops" in meta else ""
        self._written.append(
            f"{target}/ for {self.nodeid}: {_qualname(meta['model']['class'])}, {steps} step(s), BN "
            f"{meta['step']['bn_mode']}, {meta.get('units')} units{functions}, policy {meta['storage']['policy']}, "
            f"{size / 1e6:.2f} MB in {', '.join(files)}")
        return None

    def _judge(self, loaded: tuple, names: list[str | None], name: str, target: Path, device: torch.device,
               ops: bool = False) -> list:
        import torch

        from densenet_debug.errors import UsageError
        from densenet_debug.reference.check import check_reference, default_backend, reference_oracle
        from densenet_debug.reference.meta import FixtureError
        from densenet_debug.verdict.engine import JudgeCache

        fixture, model = loaded
        problem = None
        try:
            oracle, recomputed = reference_oracle(fixture, model)
        except FixtureError as exc:  # a checkpoints fixture this model's trace does not fit
            problem = f"{exc}; re-record with pytest --update-reference"
        _fail_if(problem)
        shared = JudgeCache()
        results, failures, skipped = [], [], []
        for b in names:
            b = b or default_backend(device)
            on = device
            if device.type == "cpu" and _needs_cuda(b):
                if not torch.cuda.is_available():
                    skipped.append(b)
                    continue
                on = torch.device("cuda")
            try:
                result = check_reference(target, b, device=on, loaded=(fixture, model, oracle, recomputed),
                                         shared=shared, ops=ops)
            except UsageError as exc:
                failures.append(f"backend {b}: {exc}")
                continue
            results.append(result)
            if result.verdict != "agree":
                failures.append(f"backend {result.backend}:\n{result.message()}")
        judged = [r.backend for r in results]
        if failures:
            agreeing = [r.backend for r in results if r.verdict == "agree"]
            ran = f"; agree: {', '.join(agreeing)}" if agreeing else ""
            gone = f"; skipped without CUDA: {', '.join(skipped)}" if skipped else ""
            pytest.fail(f"gradient reference {name} ({target}): {len(failures)} of {len(names)} backend(s) "
                        f"failed{ran}{gone}\n" + "\n\n".join(failures), pytrace=False)
        if skipped and not results:
            pytest.skip(f"backend(s) {', '.join(skipped)} need CUDA; torch.cuda.is_available() is False here")
        if skipped:
            warnings.warn(f"grad_reference {name}: skipped {', '.join(skipped)} (needs CUDA, absent here); "
                          f"judged {', '.join(judged)}", pytest.PytestWarning, stacklevel=3)
        return results


def _load(target: Path, model: nn.Module, inputs: Tensor, targets: Tensor, steps: int,
          eval_mode: bool) -> tuple[tuple | None, str | None]:
    """``((fixture, model with its weights), None)``, or ``(None, why the test fails)``: one message, no chain."""
    from densenet_debug.reference.check import load_reference
    from densenet_debug.reference.meta import FixtureError

    try:
        fixture, loaded = load_reference(target, model)
    except FixtureError as exc:
        return None, f"{exc}; re-record with pytest --update-reference"
    state = model.state_dict()
    problem = (_differs("inputs", inputs, fixture.inputs, target / "inputs.npz")
               or _differs("targets", targets, fixture.targets, target / "inputs.npz")
               or next((d for key, stored in fixture.state.items()
                        if (d := _differs(f"weight {key}", state[key], stored, target / "state.npz"))), None))
    if problem:
        return None, problem
    step = fixture.meta["step"]
    if step["steps"] != steps or (step["bn_mode"] == "eval") != eval_mode:
        return None, (f"{target}/meta.json: recorded with steps={step['steps']}, BN {step['bn_mode']}; asked "
                      f"steps={steps}, eval_mode={eval_mode}; re-record with --update-reference")
    return (fixture, loaded), None


def _fail_if(message: str | None) -> None:
    """Fail with ``message`` alone, raised outside any ``except`` block (no "During handling" chain)."""
    if message:
        pytest.fail(message, pytrace=False)


def _needs_cuda(backend: str) -> bool:
    from densenet_debug.backends import COMPONENTS

    return any(getattr(COMPONENTS.get(part.strip()), "devices", None) == ("cuda",) for part in backend.split("+"))


def _qualname(cls: str) -> str:
    return cls.rsplit(".", 1)[-1]


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


def _differs(what: str, given: Tensor, stored: Tensor, where: Path) -> str | None:
    """Why ``given`` is not the recorded ``stored`` (None when it is, bit for bit)."""
    import torch

    given = given.detach().cpu()
    if given.shape == stored.shape and given.dtype == stored.dtype and torch.equal(given, stored):
        return None
    detail = (f"shape {tuple(given.shape)} {given.dtype} vs recorded {tuple(stored.shape)} {stored.dtype}"
              if given.shape != stored.shape or given.dtype != stored.dtype
              else f"max |difference| {float((given.double() - stored.double()).abs().max()):.3g}")
    return (f"{where}: the {what} given differ from the recorded ones ({detail}); the check needs the same model "
            "state and batch (seed them), or re-record with --update-reference")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "reference"


_CLAIMED = pytest.StashKey[dict]()
_WRITTEN = pytest.StashKey[list]()


@pytest.fixture
def grad_reference(request: pytest.FixtureRequest) -> GradReference:
    """Check a model's per-layer gradients against a stored float64 reference (see the module docstring)."""
    config = request.config
    return GradReference(Path(request.node.path).parent, request.node.name,
                         bool(config.getoption("--update-reference")), config.getoption("--reference-backend"),
                         nodeid=request.node.nodeid, claimed=config.stash.setdefault(_CLAIMED, {}),
                         written=config.stash.setdefault(_WRITTEN, []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """``--update-reference``: say where each reference went and what it holds."""
    written = config.stash.get(_WRITTEN, [])
    if config.getoption("--update-reference", False):
        terminalreporter.write_sep("-", f"densenet-debug --update-reference wrote {len(written)} gradient "
                                        "reference(s)")
        for line in written:
            terminalreporter.write_line(f"recorded {line}")
