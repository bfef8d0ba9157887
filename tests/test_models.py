import math

import numpy as np
import pytest
import torch
from conftest import tiny

from napari_unet_studio import Geometry, UNet, UNetPlusPlus
from napari_unet_studio.models import build_network


def test_paper_geometry_depth4():
    g = Geometry(4)
    assert g.halo == 92
    assert g.step == 16
    assert g.min_input == 188
    for n in range(150, 800):
        out = g.output_size(n)
        if n >= 188 and n % 16 == 188 % 16:
            assert out == n - 184
        else:
            assert out is None, n
    assert g.output_size(572) == 388  # the paper's tile


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_valid_input_helpers(depth):
    g = Geometry(depth)
    for n in range(1, 400):
        v = g.valid_input(n)
        assert v >= n and g.output_size(v) is not None
        assert all(g.output_size(k) is None for k in range(n, v))
        below = g.valid_input_below(n + g.min_input)
        assert g.output_size(below) is not None and below <= n + g.min_input
        assert g.output_size(g.input_for_output(n)) >= n


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_forward_shape_matches_geometry(arch, depth):
    model = tiny(arch, depth=depth, base_channels=2, n_classes=3)
    g = model.geometry
    for h, w in [(g.min_input, g.min_input), (g.min_input + g.step, g.min_input + 3 * g.step)]:
        with torch.no_grad():
            y = model(torch.zeros(1, 1, h, w))
        assert y.shape == (1, 3, g.output_size(h), g.output_size(w))


def test_unetpp_pruned_head_equals_full_network_head(rng):
    model = tiny("unetpp", depth=3, base_channels=3)
    x = torch.from_numpy(rng.standard_normal((1, 1, 188, 204)).astype(np.float32))
    with torch.no_grad():
        deep = model.forward_deep(x)
        for level in (1, 2, 3):
            model.prune_level = level
            assert model.geometry == Geometry(level)
            y = model(x)
            h, w = deep[level - 1].shape[-2:]
            top, left = (y.shape[-2] - h) // 2, (y.shape[-1] - w) // 2
            np.testing.assert_allclose(y[..., top : top + h, left : left + w], deep[level - 1], atol=1e-5)
    model.prune_level = None
    assert model.active_depth == 3
    with pytest.raises(ValueError):
        model.prune_level = 4


def test_he_initialisation():
    model = UNet(base_channels=32, batch_norm=False)
    conv = model.decoder[0][0]  # 64 -> 32 channels, 3x3
    fan_in = 64 * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    up = model.up[2]  # 256 -> 128 channels: each output pixel sees 256 inputs
    assert up.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)


def test_dropout_only_in_training(rng):
    model = tiny("unet", depth=2, base_channels=4, dropout=0.5)
    x = torch.from_numpy(rng.standard_normal((1, 1, 64, 64)).astype(np.float32))
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("cls", [UNet, UNetPlusPlus])
def test_config_round_trip(cls):
    model = cls(in_channels=3, n_classes=2, depth=2, base_channels=4, batch_norm=False)
    config = model.config()
    assert "encoding" not in config  # the card's, not the network's
    rebuilt = build_network(config)
    assert type(rebuilt) is cls and rebuilt.config() == config
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_default_size_is_cpu_friendly():
    n = sum(p.numel() for p in UNet().parameters())
    assert 1e6 < n < 2.5e6  # base 16: ~1.9 M parameters, ~7.8 MB in float32


@pytest.mark.parametrize(
    "kwargs", [dict(in_channels=0), dict(n_classes=1), dict(depth=0), dict(dropout=1.0)]
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        UNet(**kwargs)


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_inference_copy_folds_batchnorm_and_computes_the_same(arch):
    from napari_unet_studio.models import inference_copy

    model = tiny(arch, depth=2, base_channels=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(2, 1, model.geometry.input_for_output(24), model.geometry.input_for_output(24))
    with torch.no_grad():
        expected = model.eval()(x)
        got = fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_inference_copy_fuses_each_relu_into_its_convolution(arch, batch_norm):
    """No ReLU is left as a module of its own; the fused call and the two-op fallback (taken
    when gradients are on) compute what the model computes."""
    from napari_unet_studio.models import _ConvReLU, inference_copy

    model = tiny(arch, depth=2, base_channels=4, batch_norm=batch_norm)
    fast = inference_copy(model)
    assert not any(isinstance(m, torch.nn.ReLU) for m in fast.modules())
    n_convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    assert sum(isinstance(m, _ConvReLU) for m in fast.modules()) == n_convs
    x = torch.randn(1, 1, model.geometry.input_for_output(24), model.geometry.input_for_output(24))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model.eval()(x)
        fused = fast(x)
    with torch.enable_grad():
        fallback = fast(x).detach()
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fallback, expected, atol=1e-4, rtol=1e-4)
