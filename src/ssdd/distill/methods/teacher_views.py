"""Optional teacher-feature cache: the teacher's features of K fixed crop/flip views per source image.

With ``distill.krr_st.teacher_cache_views = K > 0`` the teacher runs once over every view (in
chunks, checkpointed, saved as ``distilled/prep/teacher_views.safetensors``), and each outer step
then draws one of the K stored views per real image instead of a fresh augmentation: the teacher
forward (the largest phase of a CPU step) disappears from the loop. This changes the sampling
(K views per image instead of unlimited fresh ones), so it is off by default. The outer loop reads the
views through :class:`ssdd.distill.engines.krr_engine.CachedTeacher`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ssdd.data.augment import apply_crop_flip, crop_flip_params
from ssdd.distill.registry import DistillContext, register_prep
from ssdd.precision import autocast


def cache_enabled(cfg) -> bool:
    return cfg.krr_st.teacher_cache_views > 0


@register_prep("teacher_views", needs=("distill.krr_st.teacher_cache_views",), enabled=cache_enabled)
def teacher_views(ctx: DistillContext) -> dict[str, torch.Tensor]:
    """``dy``, ``dx`` (crop offsets), ``flip`` (n x K) and ``features`` (n x K x d) of every view."""
    cfg, k = ctx.cfg, ctx.cfg.krr_st.teacher_cache_views
    n, device, pad = len(ctx.source), ctx.device, ctx.cfg.crop_pad
    gen = torch.Generator().manual_seed(ctx.seed + 3)
    dy, dx, flip = (torch.zeros(n, k, dtype=torch.uint8) for _ in range(3))
    for v in range(k):
        a, b, c = crop_flip_params(n, pad, cfg.flip, gen)
        dy[:, v] = a if a is not None else pad
        dx[:, v] = b if b is not None else pad
        flip[:, v] = c if c is not None else False
    resume = ctx.hooks.resume
    done = int(resume["done"]) if resume else 0
    chunks = [resume["features"]] if resume else []
    chunk = max(1, cfg.batch // k) if k > 1 else cfg.batch
    bar = tqdm(total=n, initial=done, desc="teacher views", disable=not ctx.progress, dynamic_ncols=True)
    while done < n:
        idx = torch.arange(done, min(n, done + chunk))
        images = ctx.source.images[idx].to(device).repeat_interleave(k, 0)
        views = apply_crop_flip(images, pad, dy[idx].flatten().long().to(device), dx[idx].flatten().long().to(device),
                                flip[idx].flatten().bool().to(device))
        with torch.inference_mode(), autocast(device):
            feats = ctx.teacher(ctx.norm(views)).float()
        chunks.append(feats.view(len(idx), k, -1).cpu())
        done += len(idx)
        bar.update(len(idx))
        ctx.hooks.after_step(done, n, lambda: {"step": done, "done": done, "features": torch.cat(chunks)},
                             "teacher views")
    bar.close()
    return {"dy": dy, "dx": dx, "flip": flip, "features": torch.cat(chunks)}
