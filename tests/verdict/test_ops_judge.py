"""Per-op teacher forcing (verdict.ops): correct backends pass on models in every user style; planted and
user-written wrong ops are caught at the op that is wrong; kinks are explained; non-finite never passes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.capture.records import TensorLayout
from densenet_debug.cli import main
from densenet_debug.errors import UsageError
from densenet_debug.faults.registry import eligible_units
from densenet_debug.verdict.ops import judge_ops, module_of, oracle_capture, rollup
from densenet_debug.verdict.ops.replay import in_layout
from densenet_debug.verdict.report import FAILING, Status

BACKENDS = ["native", "mkldnn", "channels_last"]
USER_STYLES = Path("/work/shared/models/user_styles.py")


# -- models written the way users write them ---------------------------------------------------------------
class FunctionalLayer(nn.Module):
    """The seed's style: F.relu inside forward, torch.cat((x, out), 1) in the same forward."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, 2 * k, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(2 * k), nn.Conv2d(2 * k, k, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat((x, out), 1)


class Functional(nn.Module):
    """Stem with a max pool, functional dense layers, a squeezed, log-softmaxed output."""

    def __init__(self, k: int = 3, n: int = 3, classes: int = 5) -> None:
        super().__init__()
        c = 2 * k
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.dense = nn.Sequential(*[FunctionalLayer(c + i * k, k) for i in range(n)])
        c += n * k
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(F.max_pool2d(self.stem(x), 3, 2, 1))
        out = torch.squeeze(F.avg_pool2d(F.relu(self.bn(out)), out.shape[-1]))
        return F.log_softmax(self.fc(out), dim=-1)


class TorchvisionLayer(nn.Module):
    """torchvision's style: nn.ReLU(inplace=True), a cat of the feature list, a checkpointed bottleneck."""

    def __init__(self, c: int, k: int, efficient: bool) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c, 2 * k, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * k), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * k, k, 3, padding=1, bias=False)
        self.efficient = efficient

    def bottleneck(self, *features: Tensor) -> Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))

    def forward(self, *features: Tensor) -> Tensor:
        if self.efficient and any(f.requires_grad for f in features):
            out = cp.checkpoint(self.bottleneck, *features, use_reentrant=False)
        else:
            out = self.bottleneck(*features)
        return self.conv2(self.relu2(self.norm2(out)))


class Torchvision(nn.Module):
    def __init__(self, k: int = 3, n: int = 3, classes: int = 5, efficient: bool = False) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 2 * k, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([TorchvisionLayer(2 * k + i * k, k, efficient) for i in range(n)])
        c = 2 * k + n * k
        self.norm, self.classifier = nn.BatchNorm2d(c), nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.conv0(x)]
        for layer in self.layers:
            features.append(layer(*features))
        out = F.relu(self.norm(torch.cat(features, 1)), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Twice(nn.Module):
    """One module called twice in a forward, and a Python branch on the batch."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = self.conv(h) + x if x.shape[0] > 1 else self.conv(h)
        return self.fc(h.mean((2, 3)))


class CatFn(torch.autograd.Function):
    """A user's cat with a hand-written backward; ``wrong_under_onednn`` rolls the channels of samples >= 1
    in the float32 oneDNN backward only (the roll runs on that side only)."""

    @staticmethod
    def forward(ctx, wrong: bool, a: Tensor, b: Tensor) -> Tensor:
        ctx.split, ctx.wrong = a.shape[1], wrong
        return torch.cat((a, b), 1)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        if ctx.wrong and torch.backends.mkldnn.enabled and g.dtype == torch.float32:
            g = g.clone()
            g[1:] = g[1:].roll(1, 1)
        return None, g[:, :ctx.split], g[:, ctx.split:]


class WithCatFn(nn.Module):
    def __init__(self, wrong: bool = False, classes: int = 5) -> None:
        super().__init__()
        self.wrong = wrong
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.conv1(x))
        out = CatFn.apply(self.wrong, a, self.conv2(a))
        return self.fc(out.mean((2, 3)))


def _user_style(name: str) -> nn.Module:
    spec = importlib.util.spec_from_file_location("user_styles", USER_STYLES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return getattr(module, name)(num_classes=5)


MODELS = {
    "functional": lambda: Functional(),
    "torchvision": lambda: Torchvision(),
    "torchvision-checkpointed": lambda: Torchvision(efficient=True),
    "twice": lambda: Twice(),
    "catfn": lambda: WithCatFn(),
}


def _data(n: int = 3, seed: int = 0, size: int = 8, classes: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _failing(report) -> list[str]:  # noqa: ANN001
    return [f"{r.layer} · {r.quantity}: {r.status} {r.note}" for r in report.failures]


# -- correct backends pass -------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", MODELS)
def test_correct_backends_pass_on_every_user_style(style: str) -> None:
    torch.manual_seed(0)
    model = MODELS[style]()
    x, y = _data()
    oracle = oracle_capture(model, x, y)
    for backend in BACKENDS:
        report = judge_ops(model, x, y, backend, oracle_capture=oracle)
        assert report.verdict == "agree", (backend, _failing(report))
        assert report.rows and all(r.mode == "op" for r in report.rows)
        assert not [r for r in report.rows if r.note.startswith("not replayed")], backend
        # every side op either matched the oracle's or is listed with what it does
        assert all(u.verdict in ("glue", "folded", "not judged") for u in report.unmatched)


@pytest.mark.skipif(not USER_STYLES.exists(), reason=f"{USER_STYLES} is not on this machine")
@pytest.mark.parametrize("name", ["functional", "inplace", "inplace_efficient"])
def test_shared_user_styles_pass(name: str) -> None:
    model = _user_style(name)
    x, y = _data(4, seed=1)
    oracle = oracle_capture(model, x, y)
    for backend in BACKENDS:
        report = judge_ops(model, x, y, backend, oracle_capture=oracle)
        assert report.verdict == "agree", (name, backend, _failing(report))


def test_densenet_ops_all_have_error_models(tiny_model, batch) -> None:  # noqa: ANN001
    model = tiny_model(0)
    x, y = batch(3, shape=(3, 8, 8))
    oracle = oracle_capture(model, x, y)
    for backend in BACKENDS:
        report = judge_ops(model, x, y, backend, oracle_capture=oracle)
        assert report.verdict == "agree", (backend, _failing(report))
        assert not [r.layer for r in report.rows if "[generic]" in r.origin]
        conv_bwd = [r for r in report.rows if "aten.convolution_backward" in r.layer]
        assert {r.quantity for r in conv_bwd} == {"grad_input", "grad_weight"}
        assert all(0 < r.tolerance < 1e-4 and r.ratio_a <= 1 for r in conv_bwd)
    glue = [u for u in report.unmatched if u.side == "side"]  # channels_last's as_strided_ after the pool
    assert glue and all(u.verdict == "glue" for u in glue)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 4))
def test_functional_style_passes_for_any_seed_and_batch(seed: int, n: int) -> None:
    torch.manual_seed(seed)
    model = Functional(k=2, n=2)
    x, y = _data(n, seed)
    report = judge_ops(model, x, y, "mkldnn")
    assert report.verdict == "agree", _failing(report)


# -- wrong ops are caught where they are -------------------------------------------------------------------------
def test_planted_708_is_localized_to_that_convolution_backward(tiny_model, batch) -> None:  # noqa: ANN001
    model = tiny_model(0)
    x, y = batch(3, shape=(3, 8, 8))
    layer = eligible_units("strided_read_as_contiguous", model)[0]
    report = judge_ops(model, x, y, f"native+fault:strided_read_as_contiguous@{layer}")
    assert report.verdict == "mismatch"
    failing = report.failures
    assert {module_of(r) for r in failing} == {layer}
    assert {r.layer for r in failing} == {f"{layer} · aten.convolution_backward"}
    assert "grad_input" in {r.quantity for r in failing}
    first = min(failing, key=lambda r: r.order)
    assert first.pass_ == "backward" and "as_strided" in first.note and "#708-style read" in first.note
    module_rows = {r.layer: r for r in rollup(report.rows) if r.pass_ == "backward"}
    assert module_rows[layer].status in FAILING and "convolution_backward" in module_rows[layer].note
    assert all(r.status not in FAILING for name, r in module_rows.items() if name != layer)


def test_user_function_wrong_only_under_onednn_is_caught_there() -> None:
    torch.manual_seed(0)
    model = WithCatFn(wrong=True)
    x, y = _data()
    oracle = oracle_capture(model, x, y)
    assert judge_ops(model, x, y, "native", oracle_capture=oracle).verdict == "agree"
    report = judge_ops(model, x, y, "mkldnn", oracle_capture=oracle)
    assert report.verdict == "mismatch"
    assert any("aten.roll" in r.layer and r.pass_ == "backward" for r in report.failures), _failing(report)
    assert any(u.verdict == "finding" and "roll" in u.unit for u in report.unmatched)


def test_wrong_slice_arguments_are_caught_at_that_cat(tiny_model, batch) -> None:  # noqa: ANN001
    model = tiny_model(0)
    x, y = batch(3, shape=(3, 8, 8))
    unit = eligible_units("cat_backward_slice_offset", model)[-1]
    report = judge_ops(model, x, y, f"native+fault:cat_backward_slice_offset@{unit}")
    assert report.verdict == "mismatch"
    assert {module_of(r) for r in report.failures} == {unit}
    assert any("aten.slice" in r.layer for r in report.failures)


# -- non-finite, kinks ---------------------------------------------------------------------------------------------
class TinyDivisor(nn.Module):
    """Divides by a parameter that is a normal number in float64 and zero in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.d = nn.Parameter(torch.tensor(1e-50, dtype=torch.float64))
        self.fc = nn.Linear(3, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)) / self.d.to(x.dtype) * 1e-50)


def test_nonfinite_never_passes() -> None:
    torch.manual_seed(0)
    x, y = _data()
    report = judge_ops(TinyDivisor(), x, y, "native")
    bad = [r for r in report.rows if r.status == Status.NONFINITE]
    assert bad and report.verdict == "mismatch"
    assert bad[0].layer.endswith("aten.div.Tensor") and "#708" not in bad[0].note  # an overflow, no stray read


class TinyReLU(nn.Module):
    """Pre-activations of +-1e-50 (fp64 normal, fp32 zero) in front of a ReLU and a max-pool tie made by rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1e-50, dtype=torch.float64))
        self.fc = nn.Linear(20, 5)

    def forward(self, x: Tensor) -> Tensor:
        h1 = F.relu(x * self.scale)
        steps = 1e-12 * torch.arange(4.0, dtype=x.dtype).view(1, 1, 2, 2)  # distinct in fp64, equal in fp32
        h2 = F.max_pool2d(x * 1e-30 + 1 + steps, 2)
        return self.fc(torch.cat([h1.flatten(1), h2.flatten(1)], 1))


def test_diff_takes_a_model_with_parameters_of_mixed_dtypes() -> None:
    """TinyReLU keeps a float64 scale beside float32 layers: it runs only cast to one dtype, as every side and
    the oracle run it. The unit probe must cast it too (it crashed in discover_units, a traceback)."""
    from densenet_debug.verdict.engine import diff

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, 2, 2, generator=g).round(), torch.tensor([0, 1, 2])
    report = diff(TinyReLU(), x, y, "mkldnn", "native")
    assert report.verdict == "agree", report.summary
    assert {r.layer for r in report.rows if r.mode == "local"} == {"", "fc"}  # its own forward's ops, and fc


def test_rounding_across_a_branch_is_a_kink_not_an_error() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, 2, 2, generator=g).round(), torch.tensor([0, 1, 2])
    report = judge_ops(TinyReLU(), x, y, "native")
    assert report.verdict == "agree", _failing(report)
    kinks = [r for r in report.rows if r.status == Status.KINK]
    assert {r.layer.split(" · ")[1] for r in kinks} >= {"aten.threshold_backward", "aten.max_pool2d_with_indices"}
    assert all("branch boundary" in r.note for r in kinks)
    assert report.kinks  # the side's own run took the other branch too


# -- replay and report plumbing ------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_in_layout_rebuilds_the_exact_layout_with_nan_around(shape: list[int], data: st.DataObject) -> None:
    base = torch.randn(*[s + 1 for s in shape], dtype=torch.float64)
    perm = data.draw(st.permutations(range(len(shape))))
    view = base.permute(*perm)[tuple(slice(1, None) for _ in shape)]
    layout = dataclasses.replace(TensorLayout.of(view), dtype="float32")  # the side's dtype, the oracle's values
    numel = base.numel()
    out = in_layout(view.clone(), layout, numel)
    assert TensorLayout.of(out) == layout
    assert torch.equal(out, view.float())
    storage = torch.tensor([], dtype=torch.float32).set_(out.untyped_storage())
    assert int(storage.isnan().sum()) == numel - view.numel()


def test_report_json_and_rollup(tiny_model, batch) -> None:  # noqa: ANN001
    model = tiny_model(0)
    x, y = batch(2, shape=(3, 8, 8))
    report = judge_ops(model, x, y, "native")
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["schema"] == "densenet-debug/ops/1" and doc["verdict"] == "agree"
    assert {r["mode"] for r in doc["rows"]} == {"op"} and {r["mode"] for r in doc["modules"]} == {"module"}
    units = {module_of(r) for r in report.rows}
    assert {r.layer for r in rollup(report.rows)} == units
    assert "block1.layer01.conv2 · aten.convolution_backward" in {r.layer for r in report.rows}


@pytest.mark.parametrize("backend", ["bf16", "mkldnn+bf16+channels_last", "fp64"])
@pytest.mark.parametrize("eval_mode", [False, True])
def test_autocast_casts_and_eval_mode_pass(tiny_model, batch, backend: str, eval_mode: bool) -> None:  # noqa: ANN001
    model = tiny_model(0)
    x, y = batch(3, shape=(3, 8, 8))
    report = judge_ops(model, x, y, backend, eval_mode=eval_mode)
    assert report.verdict == "agree", _failing(report)
    if "bf16" in backend:  # autocast's casts run on the side only: listed, folded into the op they feed
        assert any(u.verdict == "folded" and "_to_copy" in u.unit for u in report.unmatched)


def test_bad_inputs_are_one_clear_error(tiny_model) -> None:  # noqa: ANN001
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        judge_ops(tiny_model(0), x, torch.tensor([0, 1]), "native")
    with pytest.raises(UsageError, match="one entry per sample"):
        judge_ops(tiny_model(0), torch.randn(2, 3, 8, 8), torch.tensor([0]), "native")


def test_diff_ops_prints_op_rows_and_fails_on_a_failing_op(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["diff", "--model", "densenet-bc-16", "--batch", "2", "--input-shape", "3,8,8", "--ops", "--top", "3"]
    assert main([*base, "--json", str(tmp_path / "ok.json")]) == 0
    out = capsys.readouterr().out
    assert "ops mkldnn: agree" in out and "ops native: agree" in out
    doc = json.loads((tmp_path / "ok.json").read_text())
    assert [o["verdict"] for o in doc["settings"]["ops"]] == ["agree", "agree"]
    fault = "native+fault:strided_read_as_contiguous@block1.layer02.conv2"
    assert main([*base, "--b", fault]) == 1
    out = capsys.readouterr().out
    assert "first failing op: block1.layer02.conv2 · aten.convolution_backward" in out
