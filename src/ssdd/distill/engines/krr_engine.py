"""The KRR-ST engine: learn synthetic images (and targets) whose ridge head, on the features of a pool
model, predicts real targets of real batches (DESIGN.md, "KRR-ST, exactly").

Methods ``krr_st`` (teacher targets), ``krr_st_experts`` (a pool of expert snapshots) and ``frepo``
(fixed label targets) run it: :func:`distill_krr_st` is the loop, :class:`OuterStep` one step (the
benchmark, ``benchmarks/step_speed.py``, times it), :class:`CachedTeacher` its optional data source of
cached teacher views (prep stage ``teacher_views``).

:class:`KrrStConfig` is the engine's parameter set, so it lives here; it is the section ``distill.krr_st``
(registered by ``methods/krr_st.py``), and FRePo runs the engine on a copy with its own values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from tqdm.auto import tqdm

from ssdd import distributed, live_log
from ssdd.artifacts import restore_rng, rng_state
from ssdd.config import META, NUMERICS, DistillCommon, Role, neutral, positive, roles
from ssdd.data import BatchSampler, Normalizer
from ssdd.data.augment import apply_crop_flip, crop_flip
from ssdd.distill.engines.krr import outer_grads
from ssdd.distill.engines.pool import ModelPool
from ssdd.distill.registry import DistillContext
from ssdd.errors import UserError
from ssdd.loss_log import StepLog
from ssdd.models import Encoder
from ssdd.models.inference import CompiledCall, fold_batchnorm, inference_copy
from ssdd.phases import NO_TIMER, NoTimer, PhaseTimer
from ssdd.precision import autocast
from ssdd.views import transforms as views


@dataclass
class KrrStConfig:
    """KRR-ST (DESIGN.md, "KRR-ST, exactly")."""

    steps: int = 160_000
    lr_images: float = 1e-4
    lr_targets: float = 1e-4
    final_lr_ratio: float = 1e-3
    ridge: float = 1e-6  # lambda = ridge * trace(K_ss)
    pool_size: int = 10
    pool_max_age: int = 1000
    pool_reset: str = "fixed"  # "fixed": age counter reset on re-init; "reference": never reset
    pool_lr: float = 0.1
    pool_momentum: float = 0.9
    pool_weight_decay: float = 1e-3
    check_batches: int = 4  # held-out real batches for the held-out loss check (first seed)
    check_models: int = 4
    # speed (none of these changes the maths beyond rounding, except where said)
    chunk: int = 2000  # synthetic images per pass; larger sets run chunk by chunk (same gradient; the
    #                    pool's SGD step then takes BatchNorm statistics per chunk): bounds memory at m = 10,000
    fold_bn: bool = True  # fold BatchNorm into the convolutions of eval-mode passes (teacher; the picked pool model)
    compile: str = "auto"  # torch.compile the teacher and the pool models' passes: "on", "off", "auto" = on from 1000
    #                        steps (compiling takes ~0.5-1 min on a CPU and saves ~15 % of a paper-size step)
    teacher_cache_views: int = 0  # >0: teacher features of this many fixed crop/flip views per source image, computed
    #                               once and sampled from then on. CHANGES THE SAMPLING (K views instead of fresh ones)
    ROLES: ClassVar[dict[str, Role]] = roles("steps lr_images lr_targets final_lr_ratio ridge pool_size pool_max_age pool_reset pool_lr pool_momentum "
                                           "pool_weight_decay chunk", check_batches=META, check_models=META, fold_bn=NUMERICS,
                                           compile=NUMERICS, teacher_cache_views=neutral(0))
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"pool_reset": ("fixed", "reference"), "compile": ("auto", "on", "off")}

    def check(self, at: str, distill: Any) -> None:
        positive(at, self, "steps pool_size pool_max_age check_models check_batches")


@dataclass
class DistillResult:
    images: torch.Tensor
    targets: torch.Tensor
    init_index: torch.Tensor  # which source images the synthetic set started from
    init_images: torch.Tensor
    init_targets: torch.Tensor
    losses: list[float] = field(default_factory=list)
    pool_reinits: int = 0
    view_targets: torch.Tensor | None = None  # (m, K-1, d) learned targets of views 1..K-1 (distill.views)
    init_view_targets: torch.Tensor | None = None


class OuterStep:
    """One KRR-ST outer step (DESIGN.md, "KRR-ST, exactly"), phase by phase: real batch and its
    augmentation, teacher targets, real features of the picked pool model, synthetic forward, ridge
    solve, synthetic backward, the AdamW update of ``X_s`` and ``Y_s``, the pool update.

    The benchmark (``benchmarks/step_speed.py``) times exactly this object, with a
    :class:`ssdd.phases.PhaseTimer`.
    """

    def __init__(self, x_s: torch.Tensor, y_s: torch.Tensor, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, pool: Any, sampler: BatchSampler,
                 aug_gen: torch.Generator, teacher: torch.nn.Module, norm: Normalizer, cfg: DistillCommon,
                 cache: CachedTeacher | None = None, targets_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 v_s: torch.Tensor | None = None):
        self.x_s, self.y_s, self.opt, self.sched, self.pool = x_s, y_s, opt, sched, pool
        self.v_s = v_s  # learned targets of views 1..K-1 of every image (distill.views), or None
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
        x_sup, y_sup = self.support()
        with autocast(device):
            loss, d_x, d_y = outer_grads(model, x_sup, y_sup, g_r, t_real, k.ridge, k.chunk, timer)
        grads = self.to_parameters(d_x, d_y)
        if distributed.active():  # the loss is a mean over the real batch: weight each share, then sum
            with timer("all_reduce"):
                weight = len(x_real) / self.sampler.batch
                loss, grads = loss * weight, [g * weight for g in grads]
                distributed.all_reduce_sum_([loss, *grads])
        with timer("outer_update"):
            for param, grad in zip(self.parameters(), grads):
                param.grad = grad
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
        with timer("pool_update"):
            self.pool.train_step(idx, *self.support())
        return loss

    def parameters(self) -> list[torch.Tensor]:
        return [self.x_s, self.y_s] + ([self.v_s] if self.v_s is not None else [])

    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ridge problem's support set: the images and targets, or, with views, every view of every
        image with its target (m·K rows, view-major, detached)."""
        if self.v_s is None:
            return self.x_s, self.y_s
        return views.expand(self.x_s.detach(), self.cfg.views), views.expand_targets(self.y_s.detach(), self.v_s.detach())

    def to_parameters(self, d_x: torch.Tensor, d_y: torch.Tensor) -> list[torch.Tensor]:
        """Gradients w.r.t. the support set -> w.r.t. the parameters: each view's image gradient goes back
        through its view (a permutation or a shift: its adjoint, by autograd) and sums onto the image."""
        if self.v_s is None:
            return [d_x, d_y]
        m = len(self.x_s)
        with torch.enable_grad():
            x = self.x_s.detach().requires_grad_(True)
            (d_img,) = torch.autograd.grad(views.expand(x, self.cfg.views), [x], d_x)
        d_views = d_y[m:].view(-1, m, d_y.shape[1]).transpose(0, 1)  # (K-1)·m rows -> (m, K-1, d)
        return [d_img, d_y[:m], d_views.contiguous()]

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


def initial_set(ctx: DistillContext, index: torch.Tensor,
                targets_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's start from source images ``index``: the images in the synthetic image space and their
    targets (the teacher's, or ``targets_of``'s). One function, so that whoever reproduces a run's start
    (``ssdd diagnose images-vs-targets``) gets exactly the start the run had."""
    return ctx.to_space(ctx.source.images[index]), (targets_of or ctx.targets_for)(index)


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
    x0, y0 = initial_set(ctx, index, targets_of)
    x_s = x0.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)  # as the models' weights
    y_s = y0.clone().requires_grad_(True)
    # views (Boost-SSL-DD): every view's target is learned too, from the teacher's of the initial views; the
    # support set is all m·K views (see ssdd.distill.methods.krr_st)
    with_views = cfg.views != views.NONE and targets_of is None and learn_targets
    v0 = ctx.teacher_view_targets(x0) if with_views else None
    v_s = v0.clone().requires_grad_(True) if v0 is not None else None
    opt = torch.optim.AdamW([{"params": [x_s], "lr": k.lr_images}]
                            + ([{"params": [y_s] + ([v_s] if v_s is not None else []), "lr": k.lr_targets}]
                               if learn_targets else []), weight_decay=0.0)
    decay = lambda t: 1.0 - (1.0 - k.final_lr_ratio) * t / max(1, k.steps - 1)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    pool = pool or ModelPool(ctx.spec, k.pool_size, k.pool_max_age, k.pool_reset, k.pool_lr, k.pool_momentum,
                             k.pool_weight_decay, device, ctx.seed, chunk=k.chunk,
                             forward=CompiledCall(_forward) if use_compile(k) else None)
    sampler = BatchSampler(ctx.source, cfg.batch, device, ctx.seed + 1)
    aug_gen = torch.Generator(device=device).manual_seed(ctx.seed + 2)
    resume = hooks.resume
    if resume is None:
        pool.populate(*((views.expand(x0, cfg.views), views.expand_targets(y0, v0)) if v_s is not None else (x_s, y_s)))
    else:
        with torch.no_grad():
            x_s.copy_(resume["x_s"])
            y_s.copy_(resume["y_s"])
            if v_s is not None:
                v_s.copy_(resume["v_s"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        pool.load_state_dict(resume["pool"])
        sampler.load_state_dict(resume["sampler"])
        aug_gen.set_state(resume["aug_gen"])
        restore_rng(resume)

    def state() -> dict:
        losses = log.read()  # checked finite before anything is saved
        return {"step": len(losses), "x_s": x_s.detach().clone(), "y_s": y_s.detach().clone(),
                **({"v_s": v_s.detach().clone()} if v_s is not None else {}),
                "opt": opt.state_dict(), "sched": sched.state_dict(), "pool": pool.state_dict(),
                "sampler": sampler.state_dict(), "aug_gen": aug_gen.get_state(), **rng_state(),
                "losses": list(losses)}

    cache = CachedTeacher(ctx.prep["teacher_views"], cfg.crop_pad, device) if "teacher_views" in ctx.prep else None
    outer_step = OuterStep(x_s, y_s, opt, sched, pool, sampler, aug_gen,
                           make_teacher(teacher, k) if targets_of is None else teacher, norm, cfg, cache, targets_of,
                           v_s)
    def finish(step: int, floats: list[float], info: Any) -> float:
        if not math.isfinite(floats[0]):
            outer_step.nonfinite(step, floats[0])
        return floats[0]

    log = StepLog(list(resume["losses"]) if resume else [], finish, device, tag="loss")
    bar = tqdm(range(len(log), k.steps), desc=f"krr_st s{ctx.seed}", disable=not ctx.progress,
               dynamic_ncols=True, initial=len(log), total=k.steps)
    for step in bar:
        if log.add(step + 1, [outer_step(step)]):
            bar.set_postfix(loss=f"{log.values[-1]:.4f}", refresh=False)
        live_log.synthetic(step + 1, k.steps, lambda: ctx.to_unit(x_s))
        hooks.after_step(step + 1, k.steps, state, "distill")
    return DistillResult(x_s.detach(), y_s.detach(), index, x0, y0, log.read(), pool.reinits,
                         v_s.detach() if v_s is not None else None, v0)


class CachedTeacher:
    """Real batches and their targets drawn from the cache: one random stored view per image."""

    def __init__(self, tensors: dict[str, torch.Tensor], pad: int, device: torch.device | str):
        self.pad = pad
        self.dy, self.dx = tensors["dy"].long().to(device), tensors["dx"].long().to(device)
        self.flip = tensors["flip"].bool().to(device)
        self.features = tensors["features"].to(device)
        self.views = self.features.shape[1]

    def batch(self, images: torch.Tensor, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented uint8 views of source images ``index`` (already gathered as ``images``) and their
        cached teacher features."""
        view = torch.randint(0, self.views, (len(index),), device=index.device, generator=generator)
        x = apply_crop_flip(images, self.pad, self.dy[index, view], self.dx[index, view], self.flip[index, view])
        return x, self.features[index, view]
