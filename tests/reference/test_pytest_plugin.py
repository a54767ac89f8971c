"""The pytest plugin from a user's point of view: record, pass, then a planted wrong backward fails by name."""

from __future__ import annotations

import json

import pytest
import torch

pytest_plugins = ["pytester"]
ARGS = ("-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest")

# A user's own model (not a DenseNet): a functional op in a non-leaf forward, and a custom autograd op whose
# backward a test can break. GRADREF_FAULT=1 plants a 1 % error on one channel of that backward only.
USER_TEST = '''
import os

import torch
import torch.nn.functional as F
from torch import nn


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, g):
        g = g * 2.0
        if os.environ.get("GRADREF_FAULT") == "1":
            g = g.clone()
            g[:, 1] *= 1.01
        return g


class Gate(nn.Module):
    def forward(self, x):
        return _Gate.apply(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.gate = Gate()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.gate(F.relu(self.bn(self.conv(x))))
        return self.fc(h.mean((2, 3)))


def test_net_gradients(grad_reference):
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    results = grad_reference.check(model, x, name="tiny-net", backend=["native", "fp64"])
    assert [r.verdict for r in results] == ["agree", "agree"]
'''


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """In-process pytest runs share this process; one thread avoids oversubscription on a busy 2-core box.

    torch._dynamo is imported here, outside the inner runs: pytester drops the modules an inner run imported,
    and a second import of torch._dynamo would register its C++ operator library twice (a RuntimeError).
    The verdict engine imports it for units it has no op model for, such as this user model's Gate.
    """
    import torch
    import torch._dynamo  # noqa: F401

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def user_suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("GRADREF_FAULT", raising=False)
    pytester.makepyfile(test_user=USER_TEST)
    return pytester


def test_record_pass_then_planted_fault_fails_at_its_layer(user_suite: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    missing = user_suite.runpytest(*ARGS)
    missing.assert_outcomes(failed=1)
    missing.stdout.fnmatch_lines(["*no gradient reference at*reference_grads/tiny-net*--update-reference*"])

    recorded = user_suite.runpytest(*ARGS, "--update-reference")
    recorded.assert_outcomes(passed=1)
    fixture = user_suite.path / "reference_grads" / "tiny-net"
    meta = json.loads((fixture / "meta.json").read_text())
    assert meta["storage"]["policy"] == "full" and meta["model"]["class"].endswith("Net")
    assert meta["model"]["spec"] is None  # a user model: checked with the model the test passes
    assert meta["functions"]["calls"] == [["gate · _Gate"]] and meta["functions"]["stored"]  # its custom Function

    user_suite.runpytest(*ARGS).assert_outcomes(passed=1)

    monkeypatch.setenv("GRADREF_FAULT", "1")
    faulty = user_suite.runpytest(*ARGS)
    faulty.assert_outcomes(failed=1)
    out = faulty.stdout.str()
    # the first divergent unit is the custom Function's backward inside gate (the smaller unit, judged against
    # its stored float64 truth), named in the summary; the table shows it and its module failing
    assert ("mismatch: native diverges from reference tiny-net first at custom autograd Function _Gate in gate "
            "(backward grad_input, function") in out
    lines = out.splitlines()
    assert any(line.startswith("gate · _Gate ") and line.rstrip().endswith("mismatch") for line in lines)
    assert any(line.startswith("gate ") and line.rstrip().endswith("mismatch") for line in lines)
    assert "gate (backward, local): explained by failing custom autograd Function _Gate in gate (backward" in out


def test_changed_weights_then_corruption_are_refused_in_one_line(user_suite: pytest.Pytester) -> None:
    user_suite.runpytest(*ARGS, "--update-reference").assert_outcomes(passed=1)
    user_suite.makepyfile(test_user=USER_TEST.replace("torch.manual_seed(0)", "torch.manual_seed(5)"))
    reseeded = user_suite.runpytest(*ARGS)
    reseeded.assert_outcomes(failed=1)
    reseeded.stdout.fnmatch_lines(["*state.npz: the weight conv.* given differ from the recorded ones*"])

    trace = user_suite.path / "reference_grads" / "tiny-net" / "trace.npz"
    data = bytearray(trace.read_bytes())
    data[len(data) // 3] ^= 0x10
    trace.write_bytes(bytes(data))
    corrupted = user_suite.runpytest(*ARGS)
    corrupted.assert_outcomes(failed=1)
    corrupted.stdout.fnmatch_lines(["*trace.npz: SHA-256 mismatch (corrupted or edited)*--update-reference*"])


# -- the plugin as a user meets it ------------------------------------------------------------------------------
def _user_test(name: str, test: str = "test_net_gradients", backend: str | None = None) -> str:
    """USER_TEST's model and check, with another test name, reference name and backends."""
    body = USER_TEST.replace('name="tiny-net", backend=["native", "fp64"])', f'name="{name}", backend={backend!r})')
    body = body.replace('    assert [r.verdict for r in results] == ["agree", "agree"]\n', "    assert results\n")
    return body.replace("def test_net_gradients(", f"def {test}(")


def test_update_reference_says_where_it_wrote_what(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_a=_user_test("net-a"), test_b=_user_test("net-b"))
    result = pytester.runpytest(*ARGS, "--update-reference")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "*densenet-debug --update-reference wrote 2 gradient reference(s)*",
        f"recorded {pytester.path}/reference_grads/net-a/ for test_a.py::test_net_gradients: Net, 1 step(s), "
        "BN train, 5 units, 1 custom Function call(s), policy full, * MB in index.json, inputs.npz, meta.json, "
        "state.npz, trace.npz",
        f"recorded {pytester.path}/reference_grads/net-b/ for test_b.py::test_net_gradients: *",
    ])
    plain = pytester.runpytest(*ARGS)
    plain.assert_outcomes(passed=2)
    assert "--update-reference wrote" not in plain.stdout.str()  # a check run writes nothing and says nothing


def test_two_tests_with_one_name_are_an_error_not_an_overwrite(pytester: pytest.Pytester) -> None:
    second = _user_test("shared", test="test_second").replace("manual_seed(1))", "manual_seed(2))")
    pytester.makepyfile(test_dup=_user_test("shared", test="test_first") + second)
    for flags in (("--update-reference",), ()):
        result = pytester.runpytest(*ARGS, *flags)
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["*grad_reference name 'shared' is already used by "
                                     "test_dup.py::test_first; two tests would record and check the same "
                                     "*reference_grads/shared*give each check its own name=*"])
    # the first test's reference is intact: recorded from its own batch
    meta = json.loads((pytester.path / "reference_grads" / "shared" / "meta.json").read_text())
    assert "test_first" in meta["data"]["generation"]["how"]


def test_failures_print_once(user_suite: pytest.Pytester) -> None:
    user_suite.makepyfile(test_user=_user_test("tiny-net"))
    user_suite.runpytest(*ARGS, "--update-reference").assert_outcomes(passed=1)
    (user_suite.path / "reference_grads" / "tiny-net" / "trace.npz").unlink()
    broken = user_suite.runpytest(*ARGS)
    broken.assert_outcomes(failed=1)
    user_suite.runpytest(*ARGS, "--update-reference").assert_outcomes(passed=1)
    unknown = user_suite.runpytest(*ARGS, "--reference-backend", "warp-drive")
    unknown.assert_outcomes(failed=1)
    for result, message in ((broken, "trace.npz: missing; re-record with pytest --update-reference"),
                            (unknown, "backend warp-drive: unknown backend 'warp-drive'")):
        out = result.stdout.str()
        # Once in the failure report. The short summary repeats the message: truncated to the terminal's width
        # on a terminal, whole under CI=true (pytest does not truncate in CI), so it is not counted.
        report = out.split("short test summary info")[0]
        assert report.count(message) == 1, out
        assert "During handling of the above exception" not in out and "Traceback" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: cudnn runs here")
def test_a_cuda_backend_without_cuda_skips_with_a_reason(user_suite: pytest.Pytester) -> None:
    user_suite.makepyfile(test_user=_user_test("tiny-net"))
    user_suite.runpytest(*ARGS, "--update-reference").assert_outcomes(passed=1)
    alone = user_suite.runpytest(*ARGS, "-rs", "--reference-backend", "cudnn")
    alone.assert_outcomes(skipped=1)
    alone.stdout.fnmatch_lines(["*backend(s) cudnn need CUDA; torch.cuda.is_available() is False here*"])
    mixed = user_suite.runpytest(*ARGS, "--reference-backend", "cudnn", "--reference-backend", "native")
    mixed.assert_outcomes(passed=1, warnings=1)
    mixed.stdout.fnmatch_lines(["*grad_reference tiny-net: skipped cudnn (needs CUDA, absent here); judged native*"])


def test_every_failing_backend_is_reported(user_suite: pytest.Pytester) -> None:
    user_suite.makepyfile(test_user=_user_test("tiny-net"))
    user_suite.runpytest(*ARGS, "--update-reference").assert_outcomes(passed=1)
    backends = ["native+fault:bn_invstd_as_var@bn", "native", "fp64+fault:bn_invstd_as_var@bn"]
    result = user_suite.runpytest(*ARGS, *(a for b in backends for a in ("--reference-backend", b)))
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "tiny-net (" in out and "2 of 3 backend(s) failed; agree: native" in out
    for b in (backends[0], backends[2]):
        assert f"mismatch: {b} diverges from reference tiny-net first at bn (" in out, out


def test_a_reference_recorded_from_python_is_checkable_from_the_cli(user_suite: pytest.Pytester,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from densenet_debug.cli import main

    user_suite.runpytest(*ARGS, "--update-reference").assert_outcomes(passed=1)
    fixture = user_suite.path / "reference_grads" / "tiny-net"
    capsys.readouterr()
    assert main(["check-reference", str(fixture), "--backend", "native"]) == 2
    assert "pass --model FILE.py:FACTORY" in capsys.readouterr().err
    assert main(["check-reference", str(fixture), "--backend", "native", "--model",
                 str(user_suite.path / "test_user.py:Net")]) == 0
    assert "agree: native matches reference tiny-net" in capsys.readouterr().out


@pytest.mark.gpu
def test_a_cuda_backend_judges_a_cpu_model_on_cuda(user_suite: pytest.Pytester) -> None:
    """With CUDA, a CPU-built model checked with --reference-backend cudnn is judged on the GPU, not skipped."""
    user_suite.makepyfile(test_user=_user_test("tiny-net"))
    user_suite.runpytest(*ARGS, "--update-reference").assert_outcomes(passed=1)
    result = user_suite.runpytest(*ARGS, "--reference-backend", "cudnn", "--reference-backend", "native")
    result.assert_outcomes(passed=1)
    assert "skipped cudnn" not in result.stdout.str()
