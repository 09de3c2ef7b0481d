"""Every registered model: features, head, rebuild from its spec."""

import pytest
import torch

from ssdd.models import build, names


@pytest.mark.parametrize("arch", names())
@pytest.mark.parametrize("channels,size", [(1, 32), (3, 32)])
def test_every_model(arch, channels, size):
    model = build({"arch": arch, "in_channels": channels, "image_size": size, "out_dim": 7}).eval()
    x = torch.randn(2, channels, size, size)
    feats = model.features(x)
    assert feats.shape == (2, model.feature_dim)
    assert model(x).shape == (2, 7)
    model.replace_head(3)
    assert model(x).shape == (2, 3)
    clone = build({"arch": arch, "in_channels": channels, "image_size": size, "out_dim": 3})
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone.eval()(x), model(x))


@pytest.mark.parametrize("arch", names())
def test_every_model_at_64px(arch):
    model = build({"arch": arch, "in_channels": 3, "image_size": 64, "out_dim": 5}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model.features(x).shape == (2, model.feature_dim)
        assert model(x).shape == (2, 5)
