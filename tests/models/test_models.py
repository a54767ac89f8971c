"""The DenseNet-BC family: parameter counts, shapes, init, forward/backward, memory-efficient mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_debug import BUILDERS, build_model
from densenet_debug.errors import UsageError
from densenet_debug.models import Concat, DenseNet


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_bc100_has_exactly_769162_parameters() -> None:
    assert n_params(build_model("densenet-bc-100")) == 769_162
    assert n_params(build_model("densenet-bc-100", num_classes=100)) == 800_032


@pytest.mark.parametrize("name, paper_millions", [
    ("densenet-bc-250", 15.3), ("densenet-bc-190", 25.6), ("densenet-40", 1.0),
])
def test_paper_parameter_counts_to_its_precision(name: str, paper_millions: float) -> None:
    assert round(n_params(build_model(name)) / 1e6, 1) == paper_millions


def test_bc100_structure_follows_the_paper() -> None:
    m = build_model("densenet-bc-100")
    layers = [n for n, _ in m.block2.named_children() if n.startswith("layer")]
    assert layers[0] == "layer01" and len(layers) == 16
    assert m.stem.out_channels == 24
    assert (m.trans1.conv.in_channels, m.trans1.conv.out_channels) == (216, 108)
    assert (m.trans2.conv.in_channels, m.trans2.conv.out_channels) == (300, 150)
    assert m.head.fc.in_features == 342
    layer = m.block2.layer07
    assert layer.conv1.kernel_size == (1, 1) and layer.conv1.out_channels == 48
    assert layer.conv2.kernel_size == (3, 3) and layer.conv2.out_channels == 12
    names = dict(m.named_modules())
    for unit in ("block2.layer07.cat", "block2.layer07.relu1", "block2.cat", "trans1.pool", "head.pool"):
        assert unit in names
    assert isinstance(names["block2.layer07.cat"], Concat)


def test_plain_densenet_has_no_bottleneck_and_16_stem_channels() -> None:
    m = build_model("densenet-40")
    assert m.stem.out_channels == 16
    assert not hasattr(m.block1.layer01, "conv2")
    assert m.block1.layer01.conv1.kernel_size == (3, 3)


def test_seed_initialisation() -> None:
    torch.manual_seed(0)
    m = build_model("densenet-bc-100")
    w = m.block3.layer16.conv1.weight  # 1x1, 48 outputs: std sqrt(2/48)
    assert abs(w.std().item() / math.sqrt(2 / 48) - 1) < 0.05
    assert torch.all(m.block1.layer01.norm1.weight == 1) and torch.all(m.block1.layer01.norm1.bias == 0)
    assert torch.all(m.head.fc.bias == 0)


@pytest.mark.parametrize("name", [n for n in BUILDERS if n not in ("densenet-bc-250", "densenet-bc-190")])
def test_every_builder_forward_backward_shapes(name: str, batch) -> None:
    model = build_model(name, num_classes=100)
    x, y = batch(2, classes=100)
    out = model(x)
    assert out.shape == (2, 100)
    F.cross_entropy(out, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["densenet-bc-250", "densenet-bc-190"])
def test_large_builders_forward(name: str) -> None:
    with torch.no_grad():
        assert build_model(name).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_batch_of_one_keeps_the_batch_dimension(tiny_model) -> None:
    assert tiny_model().eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_unknown_builder_and_bad_configs() -> None:
    with pytest.raises(UsageError, match="densenet-bc-100"):
        build_model("densenet-bc-99")
    with pytest.raises(ValueError):
        DenseNet(depth=99)
    with pytest.raises(ValueError):
        DenseNet(depth=100, compression=0)


@given(depth_n=st.integers(1, 3), growth=st.integers(1, 6), bottleneck=st.booleans(),
       n=st.integers(1, 3), hw=st.sampled_from([8, 16, 32]), classes=st.integers(2, 12))
@settings(max_examples=20, deadline=None)
def test_shapes_over_configs(depth_n: int, growth: int, bottleneck: bool, n: int, hw: int, classes: int) -> None:
    depth = 6 * depth_n + 4 if bottleneck else 3 * depth_n + 4
    m = DenseNet(depth=depth, growth_rate=growth, bottleneck=bottleneck, num_classes=classes)
    out = m(torch.randn(n, 3, hw, hw))
    assert out.shape == (n, classes)
    layers = (depth - 4) // 3 // (2 if bottleneck else 1)
    assert m.block3.out_channels == m.trans2.conv.out_channels + layers * growth


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@given(seed=st.integers(0, 2**16), n=st.integers(2, 4))
@settings(max_examples=5, deadline=None)
def test_memory_efficient_gradients_equal_normal_in_fp64(seed: int, n: int) -> None:
    torch.manual_seed(seed)
    normal = build_model("densenet-bc-16").double()
    efficient = build_model("densenet-bc-16", memory_efficient=True).double()
    efficient.load_state_dict(normal.state_dict())
    x, y = torch.randn(n, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (n,))
    g_normal, g_eff = _step(normal, x, y), _step(efficient, x, y)
    for name, g in g_normal.items():
        rel = (g_eff[name] - g).norm() / g.norm().clamp_min(1e-300)
        assert rel <= 1e-12, name
    # BN running statistics: updated exactly once per step, i.e. identical to the normal model's.
    for (name, b), b_eff in zip(normal.state_dict().items(), efficient.state_dict().values()):
        assert torch.equal(b, b_eff), name
    assert efficient.block1.layer01.norm1.num_batches_tracked.item() == 1


def test_memory_efficient_actually_checkpoints() -> None:
    from densenet_debug.models.info import summarize

    normal = summarize(build_model("densenet-bc-40"), batch=8).activation_bytes
    efficient = summarize(build_model("densenet-bc-40", memory_efficient=True), batch=8).activation_bytes
    assert efficient < 0.6 * normal


@pytest.mark.gpu
def test_cuda_forward_backward_matches_cpu_in_fp64(tiny_model, batch) -> None:
    cpu = tiny_model().double()
    gpu = tiny_model(memory_efficient=True).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x, y = batch(3)
    g_cpu = _step(cpu, x.double(), y)
    g_gpu = _step(gpu, x.double().cuda(), y.cuda())
    for name, g in g_cpu.items():
        assert torch.allclose(g_gpu[name].cpu(), g, rtol=1e-9, atol=1e-12), name
