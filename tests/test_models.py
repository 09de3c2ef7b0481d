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


def test_folded_batchnorm_teacher_matches_the_original():
    """BatchNorm folded into the convolutions: same features up to rounding, fewer modules."""
    from ssdd.models.inference import fold_batchnorm
    from ssdd.teacher.load import FeatureExtractor

    torch.manual_seed(0)
    model = FeatureExtractor(build({"arch": "resnet10", "in_channels": 3, "image_size": 16, "out_dim": 0}))
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16) * 2 + 1)
    model.eval()
    folded = fold_batchnorm(model)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    count = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert count(model) > 0 and count(folded) == 0
    assert not model.training  # the original is left as it was
