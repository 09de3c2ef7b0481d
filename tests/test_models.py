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


def test_compiled_call_falls_back_to_eager_when_compiling_fails(caplog):
    from ssdd.models.inference import CompiledCall

    model = build({"arch": "convnet", "in_channels": 1, "image_size": 8, "out_dim": 2, "widths": [2], "pool": "gap"})
    call = CompiledCall(lambda m, x: m(x))

    def broken(m, x):
        raise RuntimeError("no C++ compiler")

    call.compiled = broken
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(call(model, x), model(x))
    assert call.failed and "torch.compile failed" in caplog.text


@pytest.mark.slow
def test_compiled_pool_step_matches_eager():
    """The compiled SGD step (one graph for every pool model) trains a model as the eager one does."""
    from ssdd.distill.engines.pool import ModelPool
    from ssdd.models.inference import CompiledCall

    spec = {"arch": "convnet", "in_channels": 1, "image_size": 8, "out_dim": 2, "widths": [4], "pool": "gap"}
    x, y = torch.randn(6, 1, 8, 8), torch.randn(6, 2)
    pools = []
    for forward in (None, CompiledCall(lambda m, xx: m(xx))):
        torch.manual_seed(0)
        pool = ModelPool(spec, size=2, max_age=10, seed=0, forward=forward)
        pool.add(pool._fresh()[0])
        pool.add(pool._fresh()[0])
        losses = [pool.train_step(i % 2, x, y).item() for i in range(4)]
        pools.append((pool, losses))
    (eager, le), (comp, lc) = pools
    assert not pools[1][0].forward.failed
    assert le == pytest.approx(lc, rel=1e-4)
    for a, b in zip(eager.models[1].parameters(), comp.models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
