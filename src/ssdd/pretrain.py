"""Pre-train a fresh encoder on a distilled set: regress its output onto the target vectors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssdd.config import PretrainConfig
from ssdd.models import Encoder, build


def pretrain_encoder(images: torch.Tensor, targets: torch.Tensor, spec: dict, cfg: PretrainConfig, seed: int,
                     device: torch.device | str = "cpu", progress: bool = True,
                     desc: str = "pretrain") -> tuple[Encoder, list[float]]:
    """MSE regression, SGD with momentum and a cosine schedule, no augmentation (as the paper).

    Returns the encoder (head = linear map to the target dimension) and the mean loss per epoch.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build({**spec, "out_dim": targets.shape[1]}).to(device)
    images, targets = images.to(device), targets.to(device)
    batch = min(cfg.batch, len(images))
    steps_per_epoch = math.ceil(len(images) / batch)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    curve = []
    model.train()
    for _ in tqdm(range(cfg.epochs), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        order = torch.randperm(len(images), generator=gen).to(device)
        total = 0.0
        for i in range(0, len(images), batch):
            idx = order[i:i + batch]
            loss = F.mse_loss(model(images[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        curve.append(total / len(images))
    return model.eval(), curve
