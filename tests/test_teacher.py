"""Barlow Twins teacher training: exact resume, BatchNorm recalibration."""

import copy

import torch

from ssdd.config import ModelConfig, TeacherConfig
from ssdd.data import ImageSet, Normalizer
from ssdd.teacher import train_barlow_twins


def setup():
    data = ImageSet(torch.randint(0, 256, (48, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    cfg = TeacherConfig(model=ModelConfig(widths=[4, 8]), epochs=3, batch=16, projector=[16, 16], optimizer="adamw",
                        lr=1e-3)
    return data, Normalizer(*data.mean_std()), cfg


def test_teacher_resume_is_bit_identical():
    data, norm, cfg = setup()
    saved = []
    full = train_barlow_twins(data, norm, cfg, 0, progress=False, checkpoint=lambda st: saved.append(copy.deepcopy(st)),
                              checkpoint_due=lambda step: True)
    assert [st["step"] for st in saved] == list(range(1, 10))
    resumed = train_barlow_twins(data, norm, cfg, 0, progress=False, resume=saved[3])
    assert resumed.losses == full.losses
    for (k, a), b in zip(full.encoder.state_dict().items(), resumed.encoder.state_dict().values()):
        assert torch.equal(a, b), k


def test_batchnorm_statistics_are_recalibrated_on_clean_images():
    data, norm, cfg = setup()
    encoder = train_barlow_twins(data, norm, cfg, 0, progress=False).encoder
    first_bn = encoder.backbone[1]
    x = encoder.backbone[0](norm(data.images))  # the first conv's output on every training image
    torch.testing.assert_close(first_bn.running_mean, x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_losses_read_in_batches_are_the_same_floats(monkeypatch):
    import pytest

    from ssdd.errors import UserError
    from ssdd.teacher import train as train_mod

    data, norm, cfg = setup()
    every_step = train_barlow_twins(data, norm, cfg, 0, progress=False).losses
    monkeypatch.setattr(train_mod, "read_every", lambda device: 4)  # 9 steps: reads at 4, 8, 6 (checkpoint), 9
    saved = []
    batched = train_barlow_twins(data, norm, cfg, 0, progress=False,
                                 checkpoint=lambda st: saved.append(copy.deepcopy(st)),
                                 checkpoint_due=lambda step: step == 6)
    assert batched.losses == every_step and len(every_step) == 9 and all(type(v) is float for v in every_step)
    assert [st["step"] for st in saved] == [6] and saved[0]["losses"] == every_step[:6]
    cfg.lr = float("inf")
    with pytest.raises(UserError, match="teacher: non-finite Barlow Twins loss at step 1; lower teacher.lr"):
        train_barlow_twins(data, norm, cfg, 0, progress=False)
