"""Knowledge-distillation experts (MKDT stage 1): students trained by MSE to the teacher's
features of the source, their parameters recorded at init and after every epoch.

Prep stage ``experts`` returns ``trajectories`` (K × (epochs+1) × P, float32) and
``epoch1_loss`` (n,): each source example's KD loss under the experts' epoch-1 parameters,
averaged over experts — the scores of MKDT's high-loss initialisation. Expert ``k`` depends on
``expert_seed(ctx.seed, k)`` alone, so any expert can be re-made on its own, and a resumed run
is identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssdd.data.augment import crop_flip
from ssdd.distill.registry import DistillContext, register_prep
from ssdd.distill.trajectory import flat_params, load_flat_params, param_count, unflatten_params
from ssdd.models import Encoder, build

__all__ = ["expert_seed", "flat_params", "load_flat_params", "param_count", "unflatten_params",
           "per_example_kd_loss", "train_expert", "train_experts", "build_seeded"]


def expert_seed(seed: int, k: int, purpose: str = "") -> int:
    """A well-mixed 63-bit seed for expert ``k`` of a run seeded ``seed`` (and one of its RNG streams)."""
    digest = hashlib.sha256(f"ssdd-expert:{seed}:{k}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def build_seeded(spec: dict, seed: int, device: torch.device | str) -> Encoder:
    """``build(spec)`` with its initialisation drawn from ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(spec)
    return model.to(device)


@torch.no_grad()
def per_example_kd_loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                        transform: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                        chunk: int = 512) -> torch.Tensor:
    """Mean squared error of ``model(transform(images[i]))`` to ``targets[i]`` for every example (eval
    mode), in chunks (``transform`` turns stored uint8 images into model inputs, e.g. ``ctx.to_space``)."""
    was_training = model.training
    model.eval()
    out = torch.cat([(model(transform(images[i:i + chunk])) - targets[i:i + chunk]).pow(2).mean(1)
                     for i in range(0, len(images), chunk)])
    model.train(was_training)
    return out


def train_expert(ctx: DistillContext, k: int, images_u8: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train expert ``k``; returns its trajectory ((epochs+1) × P, float32, CPU) and the per-example
    KD loss of its epoch-1 parameters on the whole un-augmented source (n, CPU).

    ``images_u8`` (the source already on ``ctx.device``) may be passed to avoid copying it per expert;
    batches are converted to image space as they are drawn (no float copy of the whole source).
    """
    cfg = ctx.cfg.experts
    images_u8 = ctx.source.images.to(ctx.device) if images_u8 is None else images_u8
    z_t = ctx.teacher_features()
    n = len(images_u8)
    model = build_seeded(ctx.spec, expert_seed(ctx.seed, k, "init"), ctx.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(expert_seed(ctx.seed, k, "order"))
    aug_gen = torch.Generator(device=ctx.device).manual_seed(expert_seed(ctx.seed, k, "augment"))
    snapshots = [flat_params(model).cpu()]
    epoch1_loss = None
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=order_gen).to(images_u8.device)
        for i in range(0, n, cfg.batch):
            idx = order[i:i + cfg.batch]
            if cfg.augment:  # teacher targets of the very view the student sees
                view = crop_flip(images_u8[idx], ctx.cfg.crop_pad, ctx.cfg.flip, aug_gen)
                x = ctx.to_space(view)
                with torch.no_grad():
                    z = ctx.teacher(ctx.norm(view))
            else:
                x, z = ctx.to_space(images_u8[idx]), z_t[idx]
            loss = F.mse_loss(model(x), z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        snapshots.append(flat_params(model).cpu())
        if epoch == 0:  # the live model, so BatchNorm students are scored with their running statistics
            epoch1_loss = per_example_kd_loss(model, images_u8, z_t, ctx.to_space).float().cpu()
    return torch.stack(snapshots), epoch1_loss


@register_prep("experts", needs=("distill.experts",))
def train_experts(ctx: DistillContext) -> dict[str, torch.Tensor]:
    """K knowledge-distillation experts and the high-loss scores (MKDT stages 1-2)."""
    cfg = ctx.cfg.experts
    hooks = ctx.hooks
    ctx.teacher.eval()
    done: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    if hooks.resume is not None:
        done = [t.clone() for t in hooks.resume["done"]]
        losses = [t.clone() for t in hooks.resume["losses"]]
        if int(hooks.resume["step"]) != len(done) or len(done) != len(losses):
            raise ValueError("experts: inconsistent resume state")
    images_u8 = ctx.source.images.to(ctx.device)
    bar = tqdm(range(len(done), cfg.count), desc="experts", disable=not ctx.progress, dynamic_ncols=True,
               initial=len(done), total=cfg.count)
    for k in bar:
        trajectory, loss = train_expert(ctx, k, images_u8)
        done.append(trajectory)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss.mean().item():.4f}", refresh=False)
        step = k + 1
        hooks.after_step(step, cfg.count, lambda: {"step": step, "done": list(done), "losses": list(losses)},
                         "experts")
    return {"trajectories": torch.stack(done), "epoch1_loss": torch.stack(losses).mean(0)}
