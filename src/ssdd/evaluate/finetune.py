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

from ssdd import live_log
from ssdd.artifacts import restore_rng, rng_state
from ssdd.checkpoint import Hooks
from ssdd.config import EvaluateConfig
from ssdd.data import BatchSampler, ImageSet, Normalizer
from ssdd.data.augment import crop_flip
from ssdd.loss_log import StepLog
from ssdd.models import Encoder
from ssdd.precision import autocast


@torch.no_grad()
def accuracy(model: Encoder, test: ImageSet, norm: Normalizer, device: torch.device | str, chunk: int = 512) -> float:
    model.eval()
    labels = test.labels.to(device)
    correct = torch.zeros((), dtype=torch.long, device=device)  # counted on the device: one read at the end
    for i in range(0, len(test), chunk):
        with autocast(device):
            logits = model(norm(test.images[i:i + chunk].to(device)))
        correct += (logits.argmax(1) == labels[i:i + chunk]).sum()
    return correct.item() / len(test)


def finetune_accuracy(encoder: Encoder, train: ImageSet, test: ImageSet, norm: Normalizer, cfg: EvaluateConfig,
                      seed: int, device: torch.device | str = "cpu", progress: bool = True, desc: str = "finetune",
                      hooks: Hooks | None = None) -> float:
    """Test accuracy after :func:`finetune`."""
    return accuracy(finetune(encoder, train, norm, cfg, seed, device, progress, desc, hooks), test, norm, device)


def finetune(encoder: Encoder, train: ImageSet, norm: Normalizer, cfg: EvaluateConfig, seed: int,
             device: torch.device | str = "cpu", progress: bool = True, desc: str = "finetune",
             hooks: Hooks | None = None) -> Encoder:
    """SGD with momentum and cosine decay over ``finetune_iters`` steps, crop (+flip) augmentation.

    ``hooks`` checkpoint the loop (the paper presets fine-tune for 10,000 steps) and resume it
    bit-identically, as every long loop does (:mod:`ssdd.checkpoint`)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(encoder).to(device)
    model.replace_head(train.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.finetune_lr, momentum=cfg.finetune_momentum,
                          weight_decay=cfg.finetune_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.finetune_iters)
    sampler = BatchSampler(train, cfg.finetune_batch, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    hooks = hooks or Hooks()
    start = 0
    if hooks.resume is not None:
        model.load_state_dict(hooks.resume["model"])
        opt.load_state_dict(hooks.resume["opt"])
        sched.load_state_dict(hooks.resume["sched"])
        sampler.load_state_dict(hooks.resume["sampler"])
        gen.set_state(hooks.resume["gen"])
        restore_rng(hooks.resume)
        start = int(hooks.resume["step"])

    def state(step: int) -> dict:
        return {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "sampler": sampler.state_dict(), "gen": gen.get_state(), **rng_state()}

    # the loss curve only for the live log (nothing keeps it): without one, no reads at all
    curve = StepLog([], lambda step, floats, _: floats[0], device, tag="loss") if live_log.active() else None
    model.train()
    for step in tqdm(range(start, cfg.finetune_iters), desc=desc, disable=not progress, dynamic_ncols=True,
                     leave=False, initial=start, total=cfg.finetune_iters):
        x, y = sampler.next()
        x = norm(crop_flip(x, cfg.finetune_crop_pad, cfg.finetune_flip, gen))
        with autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if curve is not None:
            curve.add(step + 1, [loss])
        hooks.after_step(step + 1, cfg.finetune_iters, lambda: state(step + 1), "finetune")
    if curve is not None:
        curve.read()
    return model.eval()
