"""Pre-train a fresh encoder on a distilled set: regress its output onto the target vectors."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssdd import distilled_set
from ssdd.config import Config, PretrainConfig, TeacherConfig
from ssdd.data import ImageSet, Normalizer
from ssdd.loss_log import StepLog
from ssdd.models import Encoder, build, model_spec
from ssdd.precision import autocast
from ssdd.pretrain_recipes import Recipe, recipe


def pretrain_encoder(images: torch.Tensor, targets: torch.Tensor, spec: dict, cfg: PretrainConfig | Recipe, seed: int,
                     device: torch.device | str = "cpu", progress: bool = True,
                     desc: str = "pretrain", lr: float | None = None,
                     objective: str = "mse") -> tuple[Encoder, list[float]]:
    """MSE regression, SGD with momentum, no augmentation (as the paper), by ``cfg``: a named
    :class:`ssdd.pretrain_recipes.Recipe`, or the ``pretrain`` section (the ``short`` recipe).

    ``objective="cross_entropy"`` trains a labelled set instead: ``targets`` are class probabilities
    (one-hot rows for hard labels, any distribution for soft labels), the head has one output per class.
    ``lr`` overrides ``cfg.lr`` (a distilled set's learned learning rate, MKDT) unless the recipe ignores
    learned rates (``krr_st``).
    Returns the encoder (head = linear map to the target dimension) and the mean loss per epoch.
    """
    if objective not in ("mse", "cross_entropy"):
        raise ValueError(f"pretrain objective must be mse or cross_entropy, got {objective!r}")
    loss_fn = F.mse_loss if objective == "mse" else F.cross_entropy
    cfg = cfg if isinstance(cfg, Recipe) else recipe("short", cfg)
    lr = lr if lr is not None and cfg.learned_lr else cfg.lr
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build({**spec, "out_dim": targets.shape[1]}).to(device)
    images, targets = images.to(device), targets.to(device)
    batch = min(cfg.batch, len(images))
    steps_per_epoch = math.ceil(len(images) / batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch) if cfg.schedule == "cosine"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    # the mean loss per epoch, summed on the device in float64 as Python floats would be, read in batches
    curve: list[float] = []
    log = StepLog(curve, lambda epoch, floats, _: floats[0] / len(images), device, tag="loss")
    model.train()
    for epoch in tqdm(range(cfg.epochs), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        order = torch.randperm(len(images), generator=gen).to(device, non_blocking=True)
        total = torch.zeros((), dtype=torch.float64, device=images.device)
        for i in range(0, len(images), batch):
            idx = order[i:i + batch]
            with autocast(device):
                out = model(images[idx])
            loss = loss_fn(out.float(), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().double() * len(idx)
        log.add(epoch + 1, [total])
    return model.eval(), log.read()


def pretrain_ssl(images: torch.Tensor, image_norm: Normalizer, spec: dict, cfg: PretrainConfig | Recipe,
                 ssl: TeacherConfig, seed: int, device: torch.device | str = "cpu", progress: bool = True,
                 desc: str = "pretrain ssl") -> tuple[Encoder, list[float]]:
    """Barlow Twins on a distilled set's images (the teacher's recipe, ``pretrain.epochs`` epochs):
    the paper's "Random" row when the images are a random subset. Images are quantised to uint8 in
    their [0, 1] pixel space for the SSL views (exact for real images)."""
    import dataclasses

    from ssdd.teacher.train import train_barlow_twins

    pixels = (image_norm.to_unit(images.to(image_norm.mean.device)) * 255).round().to(torch.uint8).cpu()
    data = ImageSet(pixels)
    cfg_ssl = dataclasses.replace(ssl, epochs=cfg.epochs, batch=min(ssl.batch, len(data)))
    result = train_barlow_twins(data, image_norm, cfg_ssl, seed, device, progress, spec=spec, desc=desc)
    return result.encoder, result.losses


def arch_spec(arch: str, channels: int, size: int) -> dict:
    """The build spec of a registered architecture (default options) for images of this shape."""
    return {"arch": arch, "in_channels": channels, "image_size": size, "out_dim": 0}


def pretrain_set(cfg: Config, distilled: str | Path, seed: int, device: torch.device, progress: bool = True,
                 arch: str | None = None, recipe_name: str = "short") -> tuple[Encoder, list[float], dict]:
    """One encoder from one distilled set by the named recipe (:mod:`ssdd.pretrain_recipes`): MSE to its
    targets (every view with its own target, for a set with views) at its learned lr where the recipe takes
    it, or Barlow Twins on its images for a self-supervised set. Returns (encoder, loss curve, spec)."""
    found = distilled_set.load(distilled)
    how = recipe(recipe_name, cfg.pretrain)
    images, targets = found.pairs()
    spec = found.model_spec or model_spec(cfg.model, images.shape[1], images.shape[2], targets.shape[1])
    if arch is not None:
        spec = arch_spec(arch, images.shape[1], images.shape[2])
    name = f"pretrain {found.method}{'@' + arch if arch else ''} s{seed - cfg.seed}{'' if recipe_name == 'short' else ' ' + recipe_name}"
    if found.objective == "barlow_twins":
        c = images.shape[1]
        space = (Normalizer(found.mean, found.std, device) if found.image_space == "normalized"
                 else Normalizer([0.0] * c, [1.0] * c, device))
        encoder, curve = pretrain_ssl(images, space, spec, how, cfg.teacher, seed, device, progress, desc=name)
        return encoder, curve, {**spec, "out_dim": 0}
    encoder, curve = pretrain_encoder(images, targets, spec, how, seed, device, progress, desc=name,
                                      lr=float(found.lr) if found.lr is not None else None, objective=found.objective)
    return encoder, curve, {**spec, "out_dim": targets.shape[1]}
