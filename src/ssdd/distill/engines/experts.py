"""Knowledge-distillation experts (MKDT stage 1): students trained by MSE to the teacher's
features of the source, their parameters recorded at init and after every epoch. The trainer takes
an :class:`ExpertTask` (model, targets, loss), so MTT's cross-entropy classifier experts
(``methods/mtt.py``) are the same code with labels as targets.

Prep stage ``experts`` (registered with MKDT, ``methods/mkdt.py``) returns ``trajectories``
(K × (epochs+1) × P, float32) and ``epoch1_loss`` (n,): each source example's KD loss under the experts'
epoch-1 parameters, averaged over experts — the scores of MKDT's high-loss initialisation. Expert ``k`` depends on
``expert_seed(ctx.seed, k)`` alone, so any expert can be re-made on its own, and a resumed run
is identical to an uninterrupted one.

Precision: the experts' forwards and backwards run under :func:`ssdd.precision.autocast` (bf16 when the
stage's precision is bf16; their losses in fp32), like every other network training here, unless
``precision = "fp32"`` keeps them in fp32 as the authors' ``buffer.py`` does. The trajectory matching that
reads them (``trajectory.py``) stays fp32 by design. ``benchmarks/mkdt_equivalence.py`` compares one expert
epoch with the authors' code.

:class:`ExpertsConfig` is the trainer's parameter set: the section ``distill.experts`` (registered with the
``experts`` prep, ``methods/mkdt.py``) and, with MTT's values, ``distill.mtt.experts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssdd import distributed
from ssdd.config import Role, neutral, positive, roles
from ssdd.data.augment import crop_flip
from ssdd.distill.engines.seeding import build_seeded, expert_seed
from ssdd.distill.engines.trajectory import flat_params
from ssdd.distill.registry import DistillContext
from ssdd.precision import autocast


@dataclass
class ExpertsConfig:
    """Knowledge-distillation experts (MKDT stage 1): students regressing the teacher's features of
    the un-augmented source, parameters saved at init and after every epoch. (MTT's classifier experts
    use the same fields under ``distill.mtt.experts``.)"""

    count: int = 10
    epochs: int = 5  # only epochs 0 .. max_start_epoch + span are ever read
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch: int = 256
    augment: bool = False  # crop/flip views (targets from the teacher on the same view): augmentation-consistent experts
    # "stage": the stage's precision (bf16 autocast when it is bf16); "fp32": always fp32, as MKDT's buffer.py
    precision: str = "stage"
    ROLES: ClassVar[dict[str, Role]] = roles("count epochs lr momentum weight_decay batch", augment=neutral(False),
                                           precision=neutral("stage"))
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"precision": ("stage", "fp32")}

    def check(self, at: str, distill: Any) -> None:
        positive(at, self, "count epochs batch")


def squared_error(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error (the KD loss of each row)."""
    return (out - targets).pow(2).mean(1)


@torch.no_grad()
def per_example_loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                     transform: Callable[[torch.Tensor], torch.Tensor] = lambda x: x, chunk: int = 512,
                     loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = squared_error) -> torch.Tensor:
    """``loss`` of ``model(transform(images[i]))`` to ``targets[i]`` for every example (eval mode), in
    chunks (``transform`` turns stored uint8 images into model inputs, e.g. ``ctx.to_space``)."""
    was_training = model.training
    model.eval()
    out = torch.cat([loss(model(transform(images[i:i + chunk])), targets[i:i + chunk])
                     for i in range(0, len(images), chunk)])
    model.train(was_training)
    return out


@dataclass(frozen=True)
class ExpertTask:
    """What the experts learn, so one trainer serves MKDT's KD experts and MTT's classifier experts."""

    cfg: ExpertsConfig  # count, epochs, optimiser, batch, augment
    spec: dict  # the expert model (out_dim = the teacher's dim, or the number of classes)
    targets: torch.Tensor  # one row per source image on ctx.device: teacher features (n, d) or labels (n,)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # batch loss of the SGD steps
    per_example: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B,) losses: the epoch-1 scores
    # targets of an augmented uint8 view (KD: the teacher on that view); None = the image's own row
    view_targets: Callable[[torch.Tensor], torch.Tensor] | None = None
    name: str = "experts"  # progress label
    seed_tag: str = ""  # prefix of the RNG purposes, so two kinds of experts never share draws


def kd_task(ctx: DistillContext) -> ExpertTask:
    """MKDT's experts: ``ctx.spec`` students regressing the teacher's features by MSE."""
    def view_targets(view: torch.Tensor) -> torch.Tensor:  # teacher targets of the very view the student sees
        with torch.no_grad(), autocast(view.device):
            return ctx.teacher(ctx.norm(view)).float()

    return ExpertTask(ctx.cfg.experts, ctx.spec, ctx.teacher_features(), F.mse_loss, squared_error, view_targets)


def train_expert(ctx: DistillContext, k: int, images_u8: torch.Tensor | None = None,
                 task: ExpertTask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train expert ``k`` of ``task`` (default: :func:`kd_task`); returns its trajectory ((epochs+1) × P,
    float32, CPU) and the per-example loss of its epoch-1 parameters on the whole un-augmented source (n, CPU).

    ``images_u8`` (the source already on ``ctx.device``) may be passed to avoid copying it per expert;
    batches are converted to image space as they are drawn (no float copy of the whole source).
    """
    task = kd_task(ctx) if task is None else task
    cfg, tag = task.cfg, task.seed_tag
    images_u8 = ctx.source.images.to(ctx.device) if images_u8 is None else images_u8
    n = len(images_u8)
    model = build_seeded(task.spec, expert_seed(ctx.seed, k, tag + "init"), ctx.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(expert_seed(ctx.seed, k, tag + "order"))
    aug_gen = torch.Generator(device=ctx.device).manual_seed(expert_seed(ctx.seed, k, tag + "augment"))
    snapshots = [flat_params(model).cpu()]
    epoch1_loss = None
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=order_gen).to(images_u8.device, non_blocking=True)
        for i in range(0, n, cfg.batch):
            idx = order[i:i + cfg.batch]
            if cfg.augment:
                view = crop_flip(images_u8[idx], ctx.cfg.crop_pad, ctx.cfg.flip, aug_gen)
                x = ctx.to_space(view)
                z = task.view_targets(view) if task.view_targets is not None else task.targets[idx]
            else:
                x, z = ctx.to_space(images_u8[idx]), task.targets[idx]
            with autocast(x.device, "fp32" if cfg.precision == "fp32" else None):
                out = model(x)
            loss = task.loss(out.float(), z)  # fp32 loss (a no-op cast in fp32)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        snapshots.append(flat_params(model).cpu())
        if epoch == 0:  # the live model, so BatchNorm students are scored with their running statistics
            epoch1_loss = per_example_loss(model, images_u8, task.targets, ctx.to_space,
                                           loss=task.per_example).float().cpu()
    return torch.stack(snapshots), epoch1_loss


def run_experts(ctx: DistillContext, task: ExpertTask) -> dict[str, torch.Tensor]:
    """``task.cfg.count`` experts, one after another, resumable through ``ctx.hooks``: ``trajectories``
    (K × (epochs+1) × P) and ``epoch1_loss`` (n,), each example's epoch-1 loss averaged over experts."""
    cfg = task.cfg
    hooks = ctx.hooks
    done: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    if hooks.resume is not None:
        done = [t.clone() for t in hooks.resume["done"]]
        losses = [t.clone() for t in hooks.resume["losses"]]
        if int(hooks.resume["step"]) != len(done) or len(done) != len(losses):
            raise ValueError("experts: inconsistent resume state")
    images_u8 = ctx.source.images.to(ctx.device)
    bar = tqdm(total=cfg.count, initial=len(done), desc=task.name, disable=not ctx.progress, dynamic_ncols=True)
    ranks = distributed.world()  # under torchrun, N experts at a time: expert k on rank k mod N
    for start in range(len(done), cfg.count, ranks):
        k = start + distributed.rank()
        mine = train_expert(ctx, k, images_u8, task) if k < cfg.count else None
        for trajectory, loss in [made for made in distributed.all_gather(mine) if made is not None]:
            done.append(trajectory)
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.mean().item():.4f}", refresh=False)
        step = len(done)
        hooks.after_step(step, cfg.count, lambda: {"step": step, "done": list(done), "losses": list(losses)},
                         task.name)
    bar.close()
    return {"trajectories": torch.stack(done), "epoch1_loss": torch.stack(losses).mean(0)}
