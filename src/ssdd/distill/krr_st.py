"""The KRR-ST outer loop: learn synthetic images and targets whose ridge head, on the
features of a pool model, predicts the teacher's features of real images."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ssdd.artifacts import restore_rng, rng_state
from ssdd.data import BatchSampler
from ssdd.data.augment import crop_flip
from ssdd.distill.krr import krr_st_loss
from ssdd.distill.pool import ModelPool
from ssdd.distill.registry import DistillContext, DistilledSet, random_index, register
from ssdd.errors import UserError
from ssdd.models import Encoder


@dataclass
class DistillResult:
    images: torch.Tensor
    targets: torch.Tensor
    init_index: torch.Tensor  # which source images the synthetic set started from
    init_images: torch.Tensor
    init_targets: torch.Tensor
    losses: list[float] = field(default_factory=list)
    pool_reinits: int = 0


def outer_loss(model: Encoder, x_s: torch.Tensor, y_s: torch.Tensor, x_real: torch.Tensor,
               t_real: torch.Tensor, ridge: float) -> torch.Tensor:
    """The KRR-ST loss for one pool model (eval mode: BatchNorm running statistics)."""
    model.eval()
    g_s = model.features(x_s)
    with torch.no_grad():
        g_r = model.features(x_real)
    return krr_st_loss(g_s, g_r, y_s, t_real, ridge)


@register("krr_st", needs=("distill.krr_st",))
def krr_st(ctx: DistillContext) -> DistilledSet:
    """KRR-ST: synthetic images and targets whose ridge head on pool-model features predicts the teacher."""
    result = distill_krr_st(ctx)
    meta = {"init_index": result.init_index.tolist(), "steps": ctx.cfg.krr_st.steps,
            "losses": result.losses, "pool_reinits": result.pool_reinits}
    if ctx.heldout is not None and len(ctx.heldout):
        meta["heldout_check"] = _heldout_check(ctx, result)
    return DistilledSet(result.images, result.targets, meta=meta)


def _heldout_check(ctx: DistillContext, result: DistillResult) -> dict:
    """KRR-ST loss on held-out real batches: the distilled set, its start, an independent random draw."""
    from ssdd.distill.check import heldout_batches, heldout_losses

    batches = heldout_batches(ctx.heldout, ctx.teacher, ctx.norm, ctx.cfg, ctx.seed + 7, ctx.device)
    other = random_index(len(ctx.source), ctx.cfg.m, ctx.seed + 10_007)
    losses = heldout_losses({"distilled": (result.images, result.targets),
                             "init": (result.init_images, result.init_targets),
                             "other_random_subset": (ctx.to_space(ctx.source.images[other]), ctx.targets_for(other))},
                            batches, ctx.spec, ctx.cfg, ctx.seed, ctx.device)
    k = ctx.cfg.krr_st
    losses["note"] = (f"init is the distillation's start, which is also this seed's random_subset set; "
                      f"other_random_subset is an independent draw of m={ctx.cfg.m} images. Measured on "
                      f"{k.check_batches} fixed augmented batches of {len(ctx.heldout)} held-out images with "
                      f"{k.check_models} fresh models.")
    return losses


def distill_krr_st(ctx: DistillContext, pool: ModelPool | None = None) -> DistillResult:
    """Run KRR-ST (DESIGN.md, "KRR-ST, exactly") from the paired draw ``ctx.init_index``.

    ``pool`` replaces the model pool by anything with its interface (``krr_st_experts``).

    ``ctx.hooks.checkpoint(state)`` is called after a step when ``checkpoint_due(step)`` says so and when
    ``should_stop()`` turns true (then :class:`ssdd.errors.Stopped` is raised); passing that state
    back as ``hooks.resume`` continues bit-identically (on the same device).
    """
    cfg, k, device, hooks = ctx.cfg, ctx.cfg.krr_st, ctx.device, ctx.hooks
    norm, teacher = ctx.norm, ctx.teacher
    torch.manual_seed(ctx.seed)
    teacher.eval()
    index = ctx.init_index
    x0, y0 = ctx.to_space(ctx.source.images[index]), ctx.targets_for(index)
    x_s = x0.clone().requires_grad_(True)
    y_s = y0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [x_s], "lr": k.lr_images}, {"params": [y_s], "lr": k.lr_targets}],
                            weight_decay=0.0)
    decay = lambda t: 1.0 - (1.0 - k.final_lr_ratio) * t / max(1, k.steps - 1)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    pool = pool or ModelPool(ctx.spec, k.pool_size, k.pool_max_age, k.pool_reset, k.pool_lr, k.pool_momentum,
                             k.pool_weight_decay, device, ctx.seed)
    sampler = BatchSampler(ctx.source, cfg.batch, device, ctx.seed + 1)
    aug_gen = torch.Generator(device=device).manual_seed(ctx.seed + 2)
    losses: list[float] = []
    resume = hooks.resume
    if resume is None:
        pool.populate(x_s, y_s)
    else:
        with torch.no_grad():
            x_s.copy_(resume["x_s"])
            y_s.copy_(resume["y_s"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        pool.load_state_dict(resume["pool"])
        sampler.load_state_dict(resume["sampler"])
        aug_gen.set_state(resume["aug_gen"])
        restore_rng(resume)
        losses = list(resume["losses"])

    def state() -> dict:
        return {"step": len(losses), "x_s": x_s.detach().clone(), "y_s": y_s.detach().clone(),
                "opt": opt.state_dict(), "sched": sched.state_dict(), "pool": pool.state_dict(),
                "sampler": sampler.state_dict(), "aug_gen": aug_gen.get_state(), **rng_state(),
                "losses": list(losses)}

    bar = tqdm(range(len(losses), k.steps), desc=f"krr_st s{ctx.seed}", disable=not ctx.progress,
               dynamic_ncols=True, initial=len(losses), total=k.steps)
    for step in bar:
        real, _ = sampler.next()
        x_real = norm(crop_flip(real, cfg.crop_pad, cfg.flip, aug_gen))
        with torch.no_grad():
            t_real = teacher(x_real)
        idx = pool.pick()
        loss = outer_loss(pool.models[idx], x_s, y_s, x_real, t_real, k.ridge)
        if not torch.isfinite(loss):
            raise UserError(f"distill: non-finite KRR-ST loss at step {step} (teacher targets: max |t| = "
                            f"{t_real.abs().max().item():.3g}; synthetic images finite: {bool(torch.isfinite(x_s).all())}); "
                            "lower distill.krr_st.lr_images / distill.krr_st.pool_lr or check the teacher "
                            "(last checkpoint kept)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pool.train_step(idx, x_s, y_s)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        hooks.after_step(step + 1, k.steps, state, "distill")
    return DistillResult(x_s.detach(), y_s.detach(), index, x0, y0, losses, pool.reinits)
