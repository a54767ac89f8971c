"""The pytest plugin from a user's point of view: record, pass, then a planted wrong backward fails by name."""

from __future__ import annotations

import json

import pytest

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

    user_suite.runpytest(*ARGS).assert_outcomes(passed=1)

    monkeypatch.setenv("GRADREF_FAULT", "1")
    faulty = user_suite.runpytest(*ARGS)
    faulty.assert_outcomes(failed=1)
    out = faulty.stdout.str()
    # the first divergent layer is the gate's backward (its input gradient), named in the summary and the table
    assert "mismatch: native diverges from reference tiny-net first at gate (backward grad_input, local" in out
    assert any(line.startswith("gate ") and line.rstrip().endswith("mismatch") for line in out.splitlines())


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
