"""Target-data-free knowledge distillation: a supervised teacher for the target task is distilled
into a pre-trained student using only a transfer set (the distilled images, or Gaussian noise as
the baseline) under DSA-style augmentation; the student is then tested on the target test set.

The teacher's and the student's forwards run under :func:`ssdd.precision.autocast` (bf16 when the stage's
precision is bf16); the softmaxes and the KL loss are computed in fp32."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssdd.config import EvaluateConfig, ModelConfig
from ssdd.data import ImageSet, Normalizer
from ssdd.data.augment import check_generator
from ssdd.evaluate.finetune import accuracy, finetune
from ssdd.evaluate.suite import Target
from ssdd.models import Encoder, build, encoder_from_artifact, model_spec
from ssdd.precision import autocast


def dsa_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Differentiable-siamese-style augmentation, one draw per image: colour (brightness,
    saturation, contrast), scale + rotation + translation (one affine warp), flip, cutout."""
    n, c, h, w = x.shape
    where = generator.device  # drawn where the generator lives, used where the images are
    check_generator(generator, where)
    device = x.device

    def rand(*shape: int) -> torch.Tensor:  # non-blocking only towards a GPU (never a copy the host reads early)
        return torch.rand(*shape, generator=generator, device=where).to(device, non_blocking=device.type == "cuda")

    x = x + (rand(n, 1, 1, 1) - 0.5)  # brightness
    if c > 1:
        gray = x.mean(1, keepdim=True)
        x = gray + (x - gray) * (2 * rand(n, 1, 1, 1))  # saturation
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (rand(n, 1, 1, 1) + 0.5)  # contrast
    angle = (rand(n) - 0.5) * math.pi / 6
    scale = 0.8 + 0.4 * rand(n)
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.cos(angle) * scale * flip
    theta[:, 0, 1] = -torch.sin(angle) * scale
    theta[:, 1, 0] = torch.sin(angle) * scale * flip
    theta[:, 1, 1] = torch.cos(angle) * scale
    theta[:, :, 2] = (rand(n, 2) - 0.5) * 0.25
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    cy, cx = (rand(n) * h).long(), (rand(n) * w).long()  # cutout of half the side
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    hole = ((rows - cy[:, None, None]).abs() < h // 4) & ((cols - cx[:, None, None]).abs() < w // 4)
    return x * (~hole)[:, None].float()


def kd_accuracy(student: Encoder, teacher: Encoder, transfer: torch.Tensor, test: ImageSet, norm: Normalizer,
                cfg: EvaluateConfig, seed: int, device: torch.device | str = "cpu", progress: bool = True,
                desc: str = "kd") -> float:
    """Distil ``teacher`` (a classifier on the target) into ``student`` + a new head on ``transfer``
    images (already in the target's normalised space); returns the student's test accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    model = copy.deepcopy(student).to(device)
    model.replace_head(test.num_classes)
    teacher = teacher.to(device).eval()
    transfer = transfer.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.finetune_lr, momentum=cfg.finetune_momentum,
                          weight_decay=cfg.finetune_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.kd_iters)
    t = cfg.kd_temperature
    model.train()
    for _ in tqdm(range(cfg.kd_iters), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        idx = torch.randint(0, len(transfer), (min(cfg.finetune_batch, len(transfer)),), generator=gen, device=device)
        x = dsa_augment(transfer[idx], gen)
        with torch.no_grad(), autocast(device):
            teacher_logits = teacher(x)
        with autocast(device):
            logits = model(x)
        soft = F.softmax(teacher_logits.float() / t, dim=1)  # fp32 (no-op casts in fp32)
        loss = F.kl_div(F.log_softmax(logits.float() / t, dim=1), soft, reduction="batchmean") * t * t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return accuracy(model, test, norm, device)


def kd_rows(targets: list[Target], students: Callable[[int, Target], list[tuple[str, torch.Tensor, Encoder]]],
            model: ModelConfig, cfg: EvaluateConfig, seed: int, seeds: range, device: str,
            progress: bool = True) -> list[dict]:
    """Protocol "kd" on every target: a supervised teacher (``cfg.kd_teacher``, or fine-tuned here from a
    fresh ``model``) is distilled into each pre-trained student using only that student's own transfer
    images; a randomly initialised student on Gaussian noise is the baseline. ``students(k, target)``:
    (name, transfer images in [0, 1] pixels, encoder) of seed ``k``."""
    rows = []
    for target in targets:
        norm = Normalizer(*target.train.mean_std(), device=device)
        c, h, _ = target.train.shape
        if cfg.kd_teacher:
            teacher = encoder_from_artifact(cfg.kd_teacher, device)[0]
        else:
            torch.manual_seed(seed)
            teacher = finetune(build(model_spec(model, c, h, 0)), target.train, norm, cfg, seed, device, progress,
                               desc=f"kd teacher {target.name}")
        row = {"target": target.name, "protocol": "kd", "label_fraction": 1.0, "arch": model.arch, "group": model.arch}
        rows.append({**row, "method": "supervised_teacher", "seed": seed,
                     "accuracy": accuracy(teacher, target.test, norm, device)})
        for k in seeds:
            transfer = [(name, norm.normalize_unit(pixels.to(device)), student)
                        for name, pixels, student in students(k, target)]
            if transfer:
                noise = torch.randn(transfer[0][1].shape, generator=torch.Generator().manual_seed(seed + k))
                torch.manual_seed(seed + k)
                transfer.append(("gaussian_noise", noise.to(device), build(model_spec(model, c, h, 0)).to(device)))
            for name, images, student in transfer:
                acc = kd_accuracy(student, teacher, images, target.test, norm, cfg, seed + k, device, progress,
                                  desc=f"kd {name} s{k}")
                rows.append({**row, "method": name, "seed": seed + k, "accuracy": acc})
    return rows
