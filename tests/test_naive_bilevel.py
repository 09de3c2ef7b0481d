"""Naive bilevel SSL (the noisy baseline) and the outer-gradient variance diagnostic."""

import copy
import json

import pytest
import torch

from ssdd import loss_log
from ssdd.data import ImageSet, Normalizer
from ssdd.distill.diagnose import gradient_stats, grad_variance, write_grad_variance
from ssdd.distill.methods.naive_bilevel import naive_bilevel
from ssdd.distill.registry import DistillContext, Hooks, random_index
from ssdd.errors import Stopped, UserError
from ssdd.models import build
from ssdd.settings import DistillConfig
from ssdd.teacher import FeatureExtractor

SPEC = {"arch": "convnet", "in_channels": 1, "image_size": 16, "out_dim": 6, "widths": [4, 8], "pool": "gap"}


def context(seed: int = 0, hooks: Hooks | None = None, **naive) -> DistillContext:
    gen = torch.Generator().manual_seed(0)
    source = ImageSet(torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8, generator=gen))
    torch.manual_seed(123)
    teacher = FeatureExtractor(build({**SPEC, "out_dim": 0, "widths": [6, 6]})).eval()
    cfg = DistillConfig(m=8, batch=16)
    cfg.naive_bilevel.steps = 3
    cfg.naive_bilevel.inner_steps = 2
    cfg.naive_bilevel.projector = [8, 8]
    for key, value in naive.items():
        setattr(cfg.naive_bilevel, key, value)
    return DistillContext(source=source, heldout=None, teacher=teacher, norm=Normalizer(*source.mean_std()),
                          spec=SPEC, cfg=cfg, seed=seed, init_index=random_index(40, 8, seed), device="cpu",
                          progress=False, hooks=hooks or Hooks())


def test_runs_moves_the_images_and_is_deterministic():
    ctx = context()
    a = naive_bilevel(ctx)
    init = ctx.to_space(ctx.source.images[ctx.init_index])
    assert a.images.shape == (8, 1, 16, 16) and torch.isfinite(a.images).all()
    assert not torch.equal(a.images, init)
    assert a.targets is None and a.objective == "barlow_twins"
    assert a.meta["init_index"] == ctx.init_index.tolist() and len(a.meta["losses"]) == 3
    b = naive_bilevel(context())
    assert torch.equal(a.images, b.images) and a.meta["losses"] == b.meta["losses"]
    assert not torch.equal(a.images, naive_bilevel(context(seed=1, steps=1)).images)


def test_resume_after_stop_equals_an_uninterrupted_run():
    full = naive_bilevel(context())
    saved = []
    with pytest.raises(Stopped) as err:
        naive_bilevel(context(hooks=Hooks(checkpoint=lambda st: saved.append(copy.deepcopy(st)),
                                          should_stop=lambda: True)))
    assert err.value.step == 1 and [st["step"] for st in saved] == [1]
    resumed = naive_bilevel(context(hooks=Hooks(resume=saved[0])))
    assert torch.equal(resumed.images, full.images) and resumed.meta["losses"] == full.meta["losses"]


def test_divergence_names_the_option():
    with pytest.raises(UserError, match="distill.naive_bilevel.lr_images"):
        naive_bilevel(context(lr_images=float("inf")))


def test_gradient_stats_on_known_draws():
    same = gradient_stats(torch.ones(4, 3) * 0.1)
    assert same["variance"] == 0 and same["relative_variance"] == 0 and same["mean_cosine"] == pytest.approx(1)
    opposite = gradient_stats(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert opposite["mean_cosine"] == pytest.approx(-1) and opposite["relative_variance"] is None
    stats = gradient_stats(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))  # mean (2, 0), variances (2, 0)
    assert stats["variance"] == pytest.approx(1) and stats["relative_variance"] == pytest.approx(0.5)
    assert stats["signal_sq_norm"] == pytest.approx(3)  # |mean|^2 = 4 minus total variance 2 / 2 draws


def test_krr_st_gradient_is_exact_for_a_fixed_batch_and_naive_bilevel_is_not():
    result = grad_variance(context(), draws=3, fixed_batch=True)
    krr, naive = result["methods"]["krr_st"], result["methods"]["naive_bilevel"]
    assert krr["variance"] == 0 and krr["relative_variance"] == 0 and krr["mean_grad_sq_norm"] > 0
    assert naive["variance"] > 0 and naive["relative_variance"] > 0
    assert krr["mean_cosine"] == pytest.approx(1) and naive["mean_cosine"] < 1


def test_write_grad_variance_writes_json_and_png(tmp_path):
    result = write_grad_variance(context(), tmp_path, draws=2)
    saved = json.loads((tmp_path / "grad_variance.json").read_text())
    assert set(saved) == {"random_batch", "fixed_batch"} == set(result)
    assert saved["random_batch"]["methods"]["krr_st"]["variance"] > 0  # the real batch varies
    assert saved["fixed_batch"]["methods"]["krr_st"]["variance"] == 0
    assert (tmp_path / "grad_variance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_losses_read_in_batches_resume_and_leave_the_cuda_generators_alone(monkeypatch):
    from ssdd.distill.methods.naive_bilevel import fresh_net

    full = naive_bilevel(context())
    monkeypatch.setattr(loss_log, "read_every", lambda device: 2)
    saved = []
    with pytest.raises(Stopped):
        naive_bilevel(context(hooks=Hooks(checkpoint=lambda st: saved.append(copy.deepcopy(st)),
                                          checkpoint_due=lambda step: True, should_stop=lambda: len(saved) == 1)))
    assert [st["step"] for st in saved] == [1, 2] and all(type(v) is float for v in saved[1]["losses"])
    resumed = naive_bilevel(context(hooks=Hooks(resume=saved[1])))
    assert torch.equal(resumed.images, full.images) and resumed.meta["losses"] == full.meta["losses"]
    ctx = context()  # (seeds the global RNG itself, for its teacher)
    state = torch.get_rng_state()
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    fresh_net(SPEC, [8, 8], 3)
    grad_variance(ctx, draws=1)
    assert reseeded == [] and torch.equal(torch.get_rng_state(), state)
