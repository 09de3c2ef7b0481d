"""The KRR-ST outer loop: learn synthetic images and targets whose ridge head, on the
features of a pool model, predicts the teacher's features of real images."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ssdd import distributed
from ssdd.artifacts import restore_rng, rng_state
from ssdd.config import DistillConfig, KrrStConfig
from ssdd.data import BatchSampler, Normalizer
from ssdd.data.augment import crop_flip
from ssdd.distill.krr import krr_st_loss
from ssdd.distill.pool import ModelPool
from ssdd.distill.registry import DistillContext, DistilledSet, random_index, register
from ssdd.distill.teacher_cache import CachedTeacher
from ssdd.errors import UserError
from ssdd.loss_log import StepLog
from ssdd.models import Encoder
from ssdd.models.inference import CompiledCall, fold_batchnorm, inference_copy
from ssdd.phases import NO_TIMER, NoTimer, PhaseTimer
from ssdd.precision import autocast, full_precision


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
    """The KRR-ST loss for one pool model (eval mode: BatchNorm running statistics), as one
    differentiable expression: the plain form, used by checks and as the tests' reference."""
    model.eval()
    g_s = model.features(x_s)
    with torch.no_grad():
        g_r = model.features(x_real)
    return krr_st_loss(g_s, g_r, y_s, t_real, ridge)


def outer_grads(model: Encoder, x_s: torch.Tensor, y_s: torch.Tensor, g_r: torch.Tensor, t_real: torch.Tensor,
                ridge: float, chunk: int = 0, timer: PhaseTimer | NoTimer = NO_TIMER
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KRR-ST loss and its gradients w.r.t. ``x_s`` and ``y_s``, by the chain rule in three parts:
    synthetic features ``G_s``; the small m x d ridge problem gives ``dL/dG_s`` and ``dL/dY_s``; back
    through the network. The pool model's weights get no gradient.

    One pass (``m <= chunk``): the forward keeps its graph for the backward. Otherwise the features
    are computed without a graph and each chunk is recomputed with its graph for its backward: the
    same gradient (eval mode makes each image's features independent), one extra forward, memory
    bounded by the chunk (m = 10,000 fits in 24 GB). Network passes run in the caller's precision;
    the ridge part, forward and backward, always in fp32/fp64: under bf16 autocast the backward ops
    of the solve would otherwise run in bf16 too, which turned the image-gradient cosine to fp32 from
    0.998 into 0.79 in ``benchmarks/step_speed.py``'s check.
    """
    model.eval()
    device = x_s.device
    x_s = x_s.detach()
    step = chunk if 0 < chunk < len(x_s) else len(x_s)
    one_pass = step == len(x_s)
    with timer("synthetic_forward"):
        if one_pass:
            x_leaf = x_s.requires_grad_(True)
            g_graph = model.features(x_leaf)
            g_s = _wide(g_graph.detach())
        else:
            with torch.no_grad():
                g_s = torch.cat([_wide(model.features(x_s[i:i + step])) for i in range(0, len(x_s), step)])
    with timer("ridge"), full_precision(device):  # backward ops too would follow an enclosing autocast
        g_leaf = g_s.requires_grad_(True)
        y_leaf = y_s.detach().requires_grad_(True)
        loss = krr_st_loss(g_leaf, g_r, y_leaf, t_real, ridge)
        d_g, d_y = torch.autograd.grad(loss, [g_leaf, y_leaf])
    with timer("synthetic_backward"):
        if one_pass:
            (d_x,) = torch.autograd.grad(g_graph, [x_leaf], d_g.to(g_graph.dtype))
        else:
            parts = []
            for i in range(0, len(x_s), step):
                x_c = x_s[i:i + step].detach().requires_grad_(True)
                g_c = model.features(x_c)  # in the caller's precision
                (d_c,) = torch.autograd.grad(g_c, [x_c], d_g[i:i + step].to(g_c.dtype))
                parts.append(d_c)
            d_x = torch.cat(parts)
    return loss.detach(), d_x.to(x_s.dtype), d_y


def _wide(t: torch.Tensor) -> torch.Tensor:
    """bf16 -> fp32; fp32 and fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class OuterStep:
    """One KRR-ST outer step (DESIGN.md, "KRR-ST, exactly"), phase by phase: real batch and its
    augmentation, teacher targets, real features of the picked pool model, synthetic forward, ridge
    solve, synthetic backward, the AdamW update of ``X_s`` and ``Y_s``, the pool update.

    The benchmark (``benchmarks/step_speed.py``) times exactly this object, with a
    :class:`ssdd.phases.PhaseTimer`.
    """

    def __init__(self, x_s: torch.Tensor, y_s: torch.Tensor, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, pool: Any, sampler: BatchSampler,
                 aug_gen: torch.Generator, teacher: torch.nn.Module, norm: Normalizer, cfg: DistillConfig,
                 cache: CachedTeacher | None = None, targets_of: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.x_s, self.y_s, self.opt, self.sched, self.pool = x_s, y_s, opt, sched, pool
        self.sampler, self.aug_gen, self.teacher, self.norm, self.cfg = sampler, aug_gen, teacher, norm, cfg
        self.cache = cache
        self.targets_of = targets_of  # source indices -> real targets in place of the teacher (frepo: labels)
        self.device = x_s.device

    def real_batch(self, timer: PhaseTimer | NoTimer = NO_TIMER) -> tuple[torch.Tensor, torch.Tensor]:
        """An augmented real batch (normalised) and its teacher targets: under torchrun this rank's
        share of the global batch, which every rank draws and augments alike."""
        cfg, device = self.cfg, self.device
        with timer("data"):
            index = self.sampler.next_index()
            real = self.sampler.images[index]
            mine = distributed.share(len(index))
            if self.cache is not None:
                real, t_real = self.cache.batch(real, index, self.aug_gen)
                t_real = t_real[mine]
            else:
                real = crop_flip(real, cfg.crop_pad, cfg.flip, self.aug_gen)
            x_real = self.norm(real[mine]).contiguous(memory_format=torch.channels_last)
        if self.targets_of is not None:  # fixed targets of the real images (FRePo: labels), not the teacher's
            t_real = self.targets_of(index[mine])
        elif self.cache is None:
            with timer("teacher"), torch.inference_mode(), autocast(device):
                t_real = self.teacher(x_real).float()
        return x_real, t_real

    def __call__(self, step: int, timer: PhaseTimer | NoTimer = NO_TIMER) -> torch.Tensor:
        """One step; returns its loss as a 0-d tensor on the device (read it in batches: :class:`ssdd.loss_log.StepLog`)."""
        k, device = self.cfg.krr_st, self.device
        x_real, t_real = self.real_batch(timer)
        idx = self.pool.pick()
        model = self.pool.models[idx]
        with timer("real_features"):
            model.eval()
            if k.fold_bn:  # the outer loss sees the model in eval mode: BatchNorm is an affine map, folded away
                model = FoldedFeatures(model)  # (compiling these passes measured no faster than folding)
            with torch.inference_mode(), autocast(device):
                g_r = model.features(x_real).float()
            g_r, t_real = g_r.clone(), t_real.clone()  # out of inference mode: the ridge graph keeps them
        with autocast(device):
            loss, d_x, d_y = outer_grads(model, self.x_s, self.y_s, g_r, t_real, k.ridge, k.chunk, timer)
        if distributed.active():  # the loss is a mean over the real batch: weight each share, then sum
            with timer("all_reduce"):
                weight = len(x_real) / self.sampler.batch
                loss, d_x, d_y = loss * weight, d_x * weight, d_y * weight
                distributed.all_reduce_sum_([loss, d_x, d_y])
        with timer("outer_update"):
            self.x_s.grad, self.y_s.grad = d_x, d_y
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
        with timer("pool_update"):
            self.pool.train_step(idx, self.x_s, self.y_s)
        return loss

    def nonfinite(self, step: int, value: float) -> None:
        """Stop a run whose loss went non-finite (called when the losses are read, before a checkpoint)."""
        raise UserError(f"distill: non-finite KRR-ST loss ({value}) at step {step} (synthetic images finite: "
                        f"{bool(torch.isfinite(self.x_s).all())}); lower distill.krr_st.lr_images / "
                        "distill.krr_st.pool_lr, raise distill.krr_st.ridge, or check the teacher "
                        "(last checkpoint kept)")


def _forward(model: Encoder, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def use_compile(k: KrrStConfig) -> bool:
    """``distill.krr_st.compile``: on, off, or auto = on for runs of 1000 steps or more. Before torch 2.5
    every pool model and re-initialisation recompiles until dynamo's limit, then runs eagerly: off there."""
    wanted = k.compile == "on" or (k.compile == "auto" and k.steps >= 1000)
    return wanted and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


class FoldedFeatures(torch.nn.Module):
    """``features`` of an eval-mode encoder with BatchNorm folded into its convolutions (a throw-away copy
    per step: the pool model keeps training unfolded)."""

    def __init__(self, model: Encoder):
        super().__init__()
        self.folded = fold_batchnorm(model.backbone)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.folded(x)


def make_teacher(teacher: torch.nn.Module, k: KrrStConfig) -> torch.nn.Module:
    """The teacher as the outer loop runs it: BatchNorm folded and/or compiled, per the config."""
    return inference_copy(teacher, fold_bn=k.fold_bn, compile=use_compile(k))


@register("krr_st", needs=("distill.krr_st",), prep=("teacher_views",))
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


def distill_krr_st(ctx: DistillContext, pool: ModelPool | None = None,
                   targets_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   learn_targets: bool = True) -> DistillResult:
    """Run KRR-ST (DESIGN.md, "KRR-ST, exactly") from the paired draw ``ctx.init_index``.

    ``pool`` replaces the model pool by anything with its interface (``krr_st_experts``).
    ``targets_of(index)`` replaces the teacher as the source of targets, synthetic (init) and real (each
    batch), and ``learn_targets=False`` keeps the synthetic targets fixed: the labelled ``frepo``.

    ``ctx.hooks.checkpoint(state)`` is called after a step when ``checkpoint_due(step)`` says so and when
    ``should_stop()`` turns true (then :class:`ssdd.errors.Stopped` is raised); passing that state
    back as ``hooks.resume`` continues bit-identically (on the same device).
    """
    cfg, k, device, hooks = ctx.cfg, ctx.cfg.krr_st, ctx.device, ctx.hooks
    norm, teacher = ctx.norm, ctx.teacher
    torch.manual_seed(ctx.seed)
    teacher.eval()
    index = ctx.init_index
    x0, y0 = ctx.to_space(ctx.source.images[index]), (targets_of or ctx.targets_for)(index)
    x_s = x0.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)  # as the models' weights
    y_s = y0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [x_s], "lr": k.lr_images}]
                            + ([{"params": [y_s], "lr": k.lr_targets}] if learn_targets else []), weight_decay=0.0)
    decay = lambda t: 1.0 - (1.0 - k.final_lr_ratio) * t / max(1, k.steps - 1)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    pool = pool or ModelPool(ctx.spec, k.pool_size, k.pool_max_age, k.pool_reset, k.pool_lr, k.pool_momentum,
                             k.pool_weight_decay, device, ctx.seed, chunk=k.chunk,
                             forward=CompiledCall(_forward) if use_compile(k) else None)
    sampler = BatchSampler(ctx.source, cfg.batch, device, ctx.seed + 1)
    aug_gen = torch.Generator(device=device).manual_seed(ctx.seed + 2)
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

    def state() -> dict:
        losses = log.read()  # checked finite before anything is saved
        return {"step": len(losses), "x_s": x_s.detach().clone(), "y_s": y_s.detach().clone(),
                "opt": opt.state_dict(), "sched": sched.state_dict(), "pool": pool.state_dict(),
                "sampler": sampler.state_dict(), "aug_gen": aug_gen.get_state(), **rng_state(),
                "losses": list(losses)}

    cache = CachedTeacher(ctx.prep["teacher_views"], cfg.crop_pad, device) if "teacher_views" in ctx.prep else None
    outer_step = OuterStep(x_s, y_s, opt, sched, pool, sampler, aug_gen,
                           make_teacher(teacher, k) if targets_of is None else teacher, norm, cfg, cache, targets_of)
    def finish(step: int, floats: list[float], info: Any) -> float:
        if not math.isfinite(floats[0]):
            outer_step.nonfinite(step, floats[0])
        return floats[0]

    log = StepLog(list(resume["losses"]) if resume else [], finish, device)
    bar = tqdm(range(len(log), k.steps), desc=f"krr_st s{ctx.seed}", disable=not ctx.progress,
               dynamic_ncols=True, initial=len(log), total=k.steps)
    for step in bar:
        if log.add(step + 1, [outer_step(step)]):
            bar.set_postfix(loss=f"{log.values[-1]:.4f}", refresh=False)
        hooks.after_step(step + 1, k.steps, state, "distill")
    return DistillResult(x_s.detach(), y_s.detach(), index, x0, y0, log.read(), pool.reinits)
