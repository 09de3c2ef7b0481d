"""Fine-tuning: the whole encoder plus a new linear head, on a labelled target.

Its hyper-parameters (``evaluate.finetune_*``) are used as configured. The presets' fine-tune
learning rate and iteration counts were chosen earlier by looking at test accuracy and are not
re-tuned here, so fine-tune numbers may carry that selection bias; the validation split of
``evaluate.validation`` is used by the linear probe only, never by fine-tuning.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssdd.config import EvaluateConfig
from ssdd.data import BatchSampler, ImageSet, Normalizer
from ssdd.data.augment import crop_flip
from ssdd.models import Encoder
from ssdd.precision import autocast


@torch.no_grad()
def accuracy(model: Encoder, test: ImageSet, norm: Normalizer, device: torch.device | str, chunk: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(test), chunk):
        with autocast(device):
            logits = model(norm(test.images[i:i + chunk].to(device)))
        correct += (logits.argmax(1).cpu() == test.labels[i:i + chunk]).sum().item()
    return correct / len(test)


def finetune_accuracy(encoder: Encoder, train: ImageSet, test: ImageSet, norm: Normalizer, cfg: EvaluateConfig,
                      seed: int, device: torch.device | str = "cpu", progress: bool = True, desc: str = "finetune") -> float:
    """Test accuracy after :func:`finetune`."""
    return accuracy(finetune(encoder, train, norm, cfg, seed, device, progress, desc), test, norm, device)


def finetune(encoder: Encoder, train: ImageSet, norm: Normalizer, cfg: EvaluateConfig, seed: int,
             device: torch.device | str = "cpu", progress: bool = True, desc: str = "finetune") -> Encoder:
    """SGD with momentum and cosine decay over ``finetune_iters`` steps, crop (+flip) augmentation."""
    torch.manual_seed(seed)
    model = copy.deepcopy(encoder).to(device)
    model.replace_head(train.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.finetune_lr, momentum=cfg.finetune_momentum,
                          weight_decay=cfg.finetune_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.finetune_iters)
    sampler = BatchSampler(train, cfg.finetune_batch, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.train()
    for _ in tqdm(range(cfg.finetune_iters), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        x, y = sampler.next()
        x = norm(crop_flip(x, cfg.finetune_crop_pad, cfg.finetune_flip, gen))
        with autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
