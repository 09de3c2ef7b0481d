"""The KRR-ST outer loop: learn synthetic images and targets whose ridge head, on the
features of a pool model, predicts the teacher's features of real images."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ssdd.artifacts import restore_rng, rng_state
from ssdd.config import DistillConfig
from ssdd.data import BatchSampler, ImageSet, Normalizer
from ssdd.data.augment import crop_flip
from ssdd.distill.krr import krr_st_loss
from ssdd.distill.pool import ModelPool
from ssdd.errors import Stopped, UserError
from ssdd.models import Encoder


@torch.no_grad()
def embed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Apply ``fn`` without gradients in chunks."""
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, len(x), chunk)])


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


def initial_set(source: ImageSet, teacher: nn.Module, norm: Normalizer, m: int, seed: int,
                image_space: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m random real images and their teacher features: KRR-ST's start and the random-subset baseline."""
    if m > len(source):
        raise UserError(f"distill.m={m} is larger than the source ({len(source)} images)")
    index = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:m]
    real = source.images[index].to(device)
    targets = embed(teacher, norm(real))
    images = norm(real) if image_space == "normalized" else real.float() / 255
    return index, images, targets


def distill_krr_st(source: ImageSet, teacher: nn.Module, norm: Normalizer, spec: dict, cfg: DistillConfig,
                   seed: int, device: torch.device | str = "cpu", progress: bool = True,
                   resume: dict | None = None, checkpoint: Callable[[dict], None] | None = None,
                   checkpoint_due: Callable[[int], bool] = lambda step: False,
                   should_stop: Callable[[], bool] = lambda: False) -> DistillResult:
    """Run KRR-ST (DESIGN.md, "KRR-ST, exactly") and return the distilled set.

    ``checkpoint(state)`` is called after a step when ``checkpoint_due(step)`` says so and when
    ``should_stop()`` turns true (then :class:`ssdd.errors.Stopped` is raised); passing that state
    back as ``resume`` continues bit-identically (on the same device).
    """
    torch.manual_seed(seed)
    teacher.eval()
    index, x0, y0 = initial_set(source, teacher, norm, cfg.m, seed, cfg.image_space, device)
    x_s = x0.clone().requires_grad_(True)
    y_s = y0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [x_s], "lr": cfg.lr_images}, {"params": [y_s], "lr": cfg.lr_targets}],
                            weight_decay=0.0)
    decay = lambda t: 1.0 - (1.0 - cfg.final_lr_ratio) * t / max(1, cfg.steps - 1)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    pool = ModelPool(spec, cfg.pool_size, cfg.pool_max_age, cfg.pool_reset, cfg.pool_lr, cfg.pool_momentum,
                     cfg.pool_weight_decay, device, seed)
    sampler = BatchSampler(source, cfg.batch, device, seed + 1)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 2)
    losses: list[float] = []
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

    bar = tqdm(range(len(losses), cfg.steps), desc="distill", disable=not progress, dynamic_ncols=True,
               initial=len(losses), total=cfg.steps)
    for step in bar:
        real, _ = sampler.next()
        x_real = norm(crop_flip(real, cfg.crop_pad, cfg.flip, aug_gen))
        with torch.no_grad():
            t_real = teacher(x_real)
        idx = pool.pick()
        loss = outer_loss(pool.models[idx], x_s, y_s, x_real, t_real, cfg.ridge)
        if not torch.isfinite(loss):
            raise UserError(f"distill: non-finite KRR-ST loss at step {step} (teacher targets: max |t| = "
                            f"{t_real.abs().max().item():.3g}; synthetic images finite: {bool(torch.isfinite(x_s).all())}); "
                            "lower distill.lr_images / distill.pool_lr or check the teacher (last checkpoint kept)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pool.train_step(idx, x_s, y_s)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        stop = should_stop()
        if checkpoint and (stop or checkpoint_due(step + 1)):
            checkpoint(state())
        if stop and step + 1 < cfg.steps:
            raise Stopped("distill", step + 1)
    return DistillResult(x_s.detach(), y_s.detach(), index, x0, y0, losses, pool.reinits)
