"""The optional teacher-feature cache: stored views, their features, resume, and a KRR-ST run on it."""

import torch

from ssdd.data.augment import apply_crop_flip
from ssdd.distill import Hooks, distill_krr_st
from ssdd.distill.engines.krr_engine import CachedTeacher
from ssdd.distill.methods.teacher_views import teacher_views
from ssdd.errors import Stopped

from test_distill import context, setup


def cache_context(views=3, hooks=None, seed=0):
    source, teacher, norm, cfg = setup()
    cfg.krr_st.teacher_cache_views = views
    cfg.batch = 8  # several chunks over the 40 source images
    return context(source, teacher, norm, cfg, seed, hooks)


def test_cached_features_are_the_teachers_features_of_the_stored_views():
    ctx = cache_context()
    cache = teacher_views(ctx)
    n, k = len(ctx.source), 3
    assert cache["features"].shape == (n, k, 6) and cache["dy"].shape == (n, k)
    assert int(cache["dy"].max()) <= 2 * ctx.cfg.crop_pad and len(torch.unique(cache["dy"])) > 1
    for v in (0, 2):
        x = apply_crop_flip(ctx.source.images, ctx.cfg.crop_pad, cache["dy"][:, v].long(), cache["dx"][:, v].long(),
                            cache["flip"][:, v].bool())
        with torch.no_grad():
            torch.testing.assert_close(cache["features"][:, v], ctx.teacher(ctx.norm(x)), rtol=1e-5, atol=1e-6)


def test_cache_build_resumes_to_the_same_tensors():
    whole = teacher_views(cache_context())
    saved = {}

    def save(state):
        saved.update(state)

    stop_after = iter([False, False, True])
    hooks = Hooks(checkpoint=save, should_stop=lambda: next(stop_after, False))
    try:
        teacher_views(cache_context(hooks=hooks))
        raise AssertionError("expected a stop")
    except Stopped:
        pass
    assert 0 < saved["done"] < 40 and saved["step"] == saved["done"]  # the pipeline's checkpointer reads "step"
    resumed = teacher_views(cache_context(hooks=Hooks(resume=saved)))
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_batches_come_from_the_stored_views():
    ctx = cache_context()
    tensors = teacher_views(ctx)
    cache = CachedTeacher(tensors, ctx.cfg.crop_pad, "cpu")
    index = torch.tensor([3, 7, 3, 11])
    x, t = cache.batch(ctx.source.images[index], index, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ctx.teacher(ctx.norm(x)), t, rtol=1e-5, atol=1e-6)
    for row, i in zip(t, index):  # each target is one of that image's K stored features
        assert any(torch.equal(row, f) for f in tensors["features"][i])


def test_krr_st_runs_on_the_cache_and_differs_from_fresh_views():
    ctx = cache_context()
    ctx.prep["teacher_views"] = teacher_views(ctx)
    cached = distill_krr_st(ctx)
    fresh = distill_krr_st(cache_context())
    assert len(cached.losses) == 6 and all(torch.isfinite(torch.tensor(cached.losses)))
    assert cached.losses != fresh.losses  # the sampling really changed
