# torch is imported before anything Qt: import-order crashes between the two are known.
import numpy as np
import pytest
import torch

from napari_unet_studio import UNet, UNetPlusPlus


def randomize_batchnorm(model, seed=0):
    """Give BatchNorm layers non-trivial running statistics so tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def tiny(arch="unet", seed=0, **kwargs):
    """A small model with random weights, in eval mode."""
    torch.manual_seed(seed)
    kwargs.setdefault("base_channels", 2)
    kwargs.setdefault("depth", 3)
    cls = {"unet": UNet, "unetpp": UNetPlusPlus}[arch]
    return randomize_batchnorm(cls(**kwargs), seed)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def tiny_model():
    return tiny()


@pytest.fixture
def isolated_settings(tmp_path):
    """Widget choices persist in the user's settings; GUI tests keep theirs in a fresh folder."""
    from qtpy.QtCore import QSettings

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))
    return tmp_path / "settings"
