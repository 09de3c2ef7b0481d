"""Train a self-supervised teacher with Barlow Twins on unlabeled images."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ssdd.config import TeacherConfig
from ssdd.data import BatchSampler, ImageSet, Normalizer
from ssdd.data.augment import ssl_views
from ssdd.models import Encoder, build, model_spec
from ssdd.teacher.barlow import barlow_twins_loss


def projector(in_dim: int, dims: list[int]) -> nn.Sequential:
    """The Barlow Twins projector: Linear-BN-ReLU blocks, last layer a plain Linear."""
    layers: list[nn.Module] = []
    for i, dim in enumerate(dims):
        layers.append(nn.Linear(in_dim, dim, bias=False))
        if i < len(dims) - 1:
            layers += [nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
        in_dim = dim
    return nn.Sequential(*layers)


@dataclass
class TeacherResult:
    encoder: Encoder
    spec: dict
    losses: list[float] = field(default_factory=list)


def train_barlow_twins(data: ImageSet, norm: Normalizer, cfg: TeacherConfig, seed: int,
                       device: torch.device | str = "cpu", progress: bool = True) -> TeacherResult:
    """SGD with momentum (or AdamW), linear warm-up then cosine decay; views from :func:`ssl_views`."""
    torch.manual_seed(seed)
    c, h, _ = data.shape
    spec = model_spec(cfg.model, c, h, out_dim=0)
    encoder = build(spec).to(device)
    proj = projector(encoder.feature_dim, cfg.projector).to(device)
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
    views = ssl_views(data.images[:1], cfg.min_crop_scale).to(device)
    losses = []
    encoder.train(), proj.train()
    bar = tqdm(range(total), desc="teacher", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        x, _ = sampler.next()
        x = x.float() / 255
        v1, v2 = norm.normalize_unit(views(x)), norm.normalize_unit(views(x))
        loss = barlow_twins_loss(proj(encoder.features(v1)), proj(encoder.features(v2)), cfg.redundancy_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.2f}", refresh=False)
    encoder.eval()
    return TeacherResult(encoder, spec, losses)
