"""Train a self-supervised teacher with Barlow Twins on unlabeled images."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ssdd import distributed, live_log
from ssdd.artifacts import restore_rng, rng_state
from ssdd.config import TeacherConfig
from ssdd.data import BatchSampler, ImageSet, Normalizer
from ssdd.data.augment import ssl_views
from ssdd.errors import Stopped, UserError
from ssdd.models import Encoder, build, model_spec
from ssdd.models.global_norm import to_global, to_local
from ssdd.models.ssl import barlow_twins_loss, projector
from ssdd.precision import autocast

READ_EVERY = 25  # GPU steps between reads of the loss to the host (each read waits for the device once)


def read_every(device: torch.device | str) -> int:
    """Steps between loss reads: every step on the CPU (a read costs nothing there), READ_EVERY elsewhere."""
    return 1 if torch.device(device).type == "cpu" else READ_EVERY


@dataclass
class TeacherResult:
    encoder: Encoder
    spec: dict
    losses: list[float] = field(default_factory=list)


def train_barlow_twins(data: ImageSet, norm: Normalizer, cfg: TeacherConfig, seed: int,
                       device: torch.device | str = "cpu", progress: bool = True, resume: dict | None = None,
                       checkpoint: Callable[[dict], None] | None = None,
                       checkpoint_due: Callable[[int], bool] = lambda step: False,
                       should_stop: Callable[[], bool] = lambda: False, spec: dict | None = None,
                       desc: str = "teacher", data_parallel: bool = False) -> TeacherResult:
    """SGD with momentum (or AdamW), linear warm-up then cosine decay; views from :func:`ssl_views`.

    ``data_parallel`` (under torchrun): every rank draws the same global batch and views, runs its
    share through the network with BatchNorm over the global batch, and the cross-correlation is
    computed over the gathered embeddings; the summed gradients equal one process's on the same
    batch, up to float reduction order. (Views are drawn for the whole batch on every rank so that
    N ranks and one process see the same images: cheap next to the network on a GPU.)

    ``spec`` builds another encoder than ``cfg.model`` (SSL pre-training of a distilled set's student).
    Checkpoint / resume / stop work as in :func:`ssdd.distill.distill_krr_st`.
    """
    torch.manual_seed(seed)
    c, h, _ = data.shape
    spec = {**spec, "out_dim": 0} if spec is not None else model_spec(cfg.model, c, h, out_dim=0)
    encoder = build(spec).to(device)
    proj = projector(encoder.feature_dim, cfg.projector).to(device)
    parallel = data_parallel and distributed.active()
    local_norms = (to_global(encoder), to_global(proj)) if parallel else None
    params = list(encoder.parameters()) + list(proj.parameters())
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sampler = BatchSampler(data, cfg.batch, device, seed)
    steps_per_epoch = max(1, len(data) // sampler.batch)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, total // 10)
    schedule = lambda t: (t + 1) / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    views = ssl_views(data.images[:1], cfg.min_crop_scale, cfg.hue).to(device)
    losses: list[float] = []
    if resume is not None:
        encoder.load_state_dict(resume["encoder"])
        proj.load_state_dict(resume["projector"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        sampler.load_state_dict(resume["sampler"])
        restore_rng(resume)
        losses = list(resume["losses"])
    encoder.train(), proj.train()
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) not read yet
    every = read_every(device)

    def read_losses() -> None:
        """Read the pending losses to floats in one device sync (every ``every`` steps, before a
        checkpoint and at the end, not one .item() per step) and check them."""
        if not pending:
            return
        values = torch.stack([loss for _, loss in pending]).tolist()
        for (at, _), value in zip(pending, values):
            if not math.isfinite(value):
                pending.clear()
                raise UserError(f"teacher: non-finite Barlow Twins loss at step {at}; lower teacher.lr "
                                "(last checkpoint kept)")
            losses.append(value)
            live_log.scalar("loss", value, at)
        pending.clear()

    bar = tqdm(range(len(losses), total), desc=desc, disable=not progress, dynamic_ncols=True,
               initial=len(losses), total=total)
    for step in bar:
        x, _ = sampler.next()
        x = x.float() / 255
        v1, v2 = norm.normalize_unit(views(x)), norm.normalize_unit(views(x))
        if parallel:
            mine = distributed.share(len(x))
            v1, v2 = v1[mine], v2[mine]
        with autocast(device):
            z1, z2 = proj(encoder.features(v1)), proj(encoder.features(v2))
        if parallel:
            z1, z2 = distributed.gather_keep_grad(z1, len(x)), distributed.gather_keep_grad(z2, len(x))
        loss = barlow_twins_loss(z1, z2, cfg.redundancy_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if parallel:
            distributed.sum_gradients_(params)
        opt.step()
        sched.step()
        pending.append((step, loss.detach()))
        if len(pending) >= every:
            read_losses()
            bar.set_postfix(loss=f"{losses[-1]:.2f}", refresh=False)
        stop = distributed.any_true(should_stop()) if parallel else should_stop()
        if checkpoint and (stop or checkpoint_due(step + 1)):
            read_losses()
            checkpoint({"step": step + 1, "encoder": encoder.state_dict(), "projector": proj.state_dict(),
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "sampler": sampler.state_dict(),
                        **rng_state(), "losses": list(losses)})
        if stop and step + 1 < total:
            raise Stopped("teacher", step + 1)
    read_losses()
    if local_norms is not None:
        to_local(encoder, local_norms[0])
        to_local(proj, local_norms[1])
    recalibrate_batchnorm(encoder, data, norm, cfg.batch, device)
    return TeacherResult(encoder.eval(), spec, losses)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: ImageSet, norm: Normalizer, batch: int,
                          device: torch.device | str, max_images: int = 20_000) -> None:
    """Recompute BatchNorm running statistics as exact averages over clean images.

    Training updates them from augmented views with momentum; the teacher is used in eval mode on
    (lightly augmented) real images, and a short run's running statistics can be far off.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    for i in range(0, min(len(data), max_images), batch):
        model(norm(data.images[i:i + batch].to(device)))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()
