"""KRR-ST outer loop: determinism, the artifact's space, and the random-subset pairing."""

import copy

import pytest
import torch

from ssdd.data import ImageSet, Normalizer
from ssdd.distill import DistillContext, Hooks, distill_krr_st, random_index
from ssdd.distill.engines.krr_engine import KrrStConfig
from ssdd.models import build
from ssdd.settings import DistillConfig
from ssdd.teacher import FeatureExtractor

SPEC = {"arch": "convnet", "in_channels": 1, "image_size": 16, "out_dim": 6, "widths": [4, 8], "pool": "gap"}


def setup():
    gen = torch.Generator().manual_seed(0)
    source = ImageSet(torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8, generator=gen))
    torch.manual_seed(123)
    teacher = FeatureExtractor(build({**SPEC, "out_dim": 0, "widths": [6, 6]})).eval()
    norm = Normalizer(*source.mean_std())
    cfg = DistillConfig(m=8, batch=16, krr_st=KrrStConfig(steps=6, lr_images=1e-2, lr_targets=1e-2, pool_size=3,
                                                          pool_max_age=4))
    return source, teacher, norm, cfg


def context(source, teacher, norm, cfg, seed, hooks=None):
    return DistillContext(source, None, teacher, norm, {**SPEC, "out_dim": 6}, cfg, seed,
                          random_index(len(source), cfg.m, seed), "cpu", False, hooks or Hooks())


def run(seed, **changes):
    source, teacher, norm, cfg = setup()
    for k, v in changes.items():
        setattr(cfg if hasattr(cfg, k) else cfg.krr_st, k, v)
    return distill_krr_st(context(source, teacher, norm, cfg, seed)), source, norm


def test_same_seed_same_set_and_other_seed_differs():
    a, _, _ = run(1)
    b, _, _ = run(1)
    c, _, _ = run(2)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets) and a.losses == b.losses
    assert not torch.equal(a.images, c.images)


def test_set_moves_and_starts_from_real_images_with_teacher_targets():
    result, source, norm = run(0)
    torch.testing.assert_close(result.init_images, norm(source.images[result.init_index]))
    assert not torch.equal(result.images, result.init_images) and not torch.equal(result.targets, result.init_targets)
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))


def test_reference_image_space_keeps_raw_pixels():
    result, source, _ = run(0, image_space="reference")
    torch.testing.assert_close(result.init_images, source.images[result.init_index].float() / 255)


def test_reference_pool_reset_reinitialises_more():
    fixed, _, _ = run(0, steps=12)
    ref, _, _ = run(0, steps=12, pool_reset="reference")
    assert ref.pool_reinits > fixed.pool_reinits


def test_resume_from_any_checkpoint_is_bit_identical():
    source, teacher, norm, cfg = setup()
    cfg.krr_st.steps = 7
    saved = []
    full = distill_krr_st(context(source, teacher, norm, cfg, 3, Hooks(
        checkpoint=lambda st: saved.append(copy.deepcopy(st)), checkpoint_due=lambda step: True)))
    assert [st["step"] for st in saved] == list(range(1, 8))
    for state in (saved[0], saved[3]):
        resumed = distill_krr_st(context(source, teacher, norm, cfg, 3, Hooks(resume=state)))
        assert torch.equal(resumed.images, full.images) and torch.equal(resumed.targets, full.targets)
        assert resumed.losses == full.losses


def test_stop_request_checkpoints_then_stops():
    from ssdd.errors import Stopped

    source, teacher, norm, cfg = setup()
    saved = []
    with pytest.raises(Stopped) as err:
        distill_krr_st(context(source, teacher, norm, cfg, 0, Hooks(checkpoint=saved.append,
                                                                     should_stop=lambda: True)))
    assert err.value.step == 1 and [st["step"] for st in saved] == [1]
