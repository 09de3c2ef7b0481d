"""Outer-gradient noise of KRR-ST and of naive bilevel SSL (DESIGN.md, "Why MSE and KRR").

At one fixed state (the seed's initial synthetic set with teacher targets, one model initialisation
from the seed) the gradient w.r.t. the synthetic images is drawn ``draws`` times. Each draw takes a
new augmented real batch (shared by both methods) and, for naive bilevel, new inner views. With
``fixed_batch=True`` every draw reuses one augmented real batch, so only a method's own randomness
is left: KRR-ST has none (its variance is exactly 0 on a deterministic device), naive bilevel keeps
the randomness of its inner augmentation.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ssdd import artifacts
from ssdd.data import BatchSampler
from ssdd.data.augment import crop_flip
from ssdd.distill.engines.krr import outer_loss as krr_st_outer_loss
from ssdd.distill.engines.seeding import seeded_cpu_rng
from ssdd.distill.methods import naive_bilevel
from ssdd.distill.registry import DistillContext
from ssdd.models import build

METHODS = ("krr_st", "naive_bilevel")


def gradient_stats(grads: torch.Tensor) -> dict[str, float]:
    """Statistics of ``draws`` gradients (one per row).

    ``variance``: mean over elements of the unbiased variance over draws; ``mean_grad_sq_norm``: the
    squared norm of the mean gradient; ``relative_variance``: the total variance (sum over elements)
    over that squared norm, a noise-to-signal ratio (``variance * numel / mean_grad_sq_norm``);
    ``mean_cosine``: the mean cosine similarity over pairs of distinct draws. The relative variance is
    None when the mean gradient is exactly 0.

    With pure noise the squared norm of the mean is itself about total variance / draws, so the relative
    variance saturates near ``draws``; ``signal_sq_norm`` (``mean_grad_sq_norm - total variance / draws``,
    an unbiased estimate of the true mean's squared norm, may be negative) shows whether any signal is left.
    """
    g = grads.flatten(1).double()
    d = g - g[:1]  # shift by the first draw: identical draws give exact zeros
    dev = d - d.mean(0)
    var = dev.pow(2).sum(0) / max(1, len(g) - 1)
    mean = g.mean(0)
    sq_norm = mean.pow(2).sum().item()
    total_var = var.sum().item()
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = unit @ unit.T
    n = len(g)
    pairs = (cos.sum() - cos.diagonal().sum()) / max(1, n * (n - 1))
    return {"variance": var.mean().item(), "mean_grad_sq_norm": sq_norm,
            "signal_sq_norm": sq_norm - total_var / len(g),
            "relative_variance": total_var / sq_norm if sq_norm > 0 else None,
            "mean_cosine": pairs.item() if n > 1 else 1.0, "numel": g.shape[1]}


def grad_variance(ctx: DistillContext, draws: int = 16, fixed_batch: bool = False) -> dict:
    """Outer-gradient statistics (:func:`gradient_stats`) of KRR-ST and naive bilevel at one fixed state."""
    cfg, device = ctx.cfg, ctx.device
    ctx.teacher.eval()
    x0 = ctx.to_space(ctx.source.images[ctx.init_index.cpu()])
    y0 = ctx.targets_for(ctx.init_index)
    with seeded_cpu_rng(ctx.seed):  # the CPU RNG only: models are built on the CPU; CUDA's stays as it was
        krr_model = build(ctx.spec)  # a pool model as the pool makes it (age 0), eval mode in outer_loss
    krr_model = krr_model.to(device)
    net = naive_bilevel.fresh_net(ctx.spec, cfg.naive_bilevel.projector, ctx.seed, device)
    sampler = BatchSampler(ctx.source, cfg.batch, device, ctx.seed + 1)
    aug_gen = torch.Generator(device=device).manual_seed(ctx.seed + 2)
    view_gen = torch.Generator(device=device).manual_seed(ctx.seed + 3)

    def real_batch() -> tuple[torch.Tensor, torch.Tensor]:
        real, _ = sampler.next()
        x = ctx.norm(crop_flip(real, cfg.crop_pad, cfg.flip, aug_gen))
        with torch.no_grad():
            return x, ctx.teacher(x)

    fixed = real_batch() if fixed_batch else None
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in METHODS}
    for _ in range(draws):
        x_real, t_real = fixed if fixed is not None else real_batch()
        x_s = x0.clone().requires_grad_(True)
        y_s = y0.clone().requires_grad_(True)
        loss = krr_st_outer_loss(krr_model, x_s, y_s, x_real, t_real, cfg.krr_st.ridge)
        grads["krr_st"].append(torch.autograd.grad(loss, [x_s])[0].detach())
        x_s = x0.clone().requires_grad_(True)
        loss = naive_bilevel.outer_loss(net, x_s, x_real, t_real, cfg, view_gen)
        grads["naive_bilevel"].append(torch.autograd.grad(loss, [x_s])[0].detach())
    return {"draws": draws, "fixed_batch": fixed_batch, "m": cfg.m, "batch": sampler.batch, "seed": ctx.seed,
            "device": str(device),
            "methods": {name: gradient_stats(torch.stack(gs)) for name, gs in grads.items()}}


MODES = {"random_batch": "new real batch per draw", "fixed_batch": "one real batch for every draw"}


def plot_grad_variance(result: dict, path: str | os.PathLike) -> None:
    """Bar chart of the relative variance of each method (log scale), one bar per mode.

    ``result`` maps mode names to :func:`grad_variance` results (as :func:`write_grad_variance` writes),
    or is one such result. An exact 0 cannot sit on a log axis: it is drawn at the axis floor, marked "0"
    (an undefined ratio likewise, marked "undefined").
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = {"result": result} if "methods" in result else result
    values = [r["methods"][m]["relative_variance"] for r in modes.values() for m in METHODS]
    positive = [v for v in values if v is not None and v > 0]
    floor = min(positive) / 100 if positive else 1e-6
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(modes)
    for k, (mode, r) in enumerate(modes.items()):
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(METHODS))]
        ys = [r["methods"][m]["relative_variance"] for m in METHODS]
        label = f"{mode} ({MODES[mode]})" if mode in MODES else mode
        ax.bar(xs, [floor if not y else y for y in ys], width, label=label)
        for x, y in zip(xs, ys):
            text = "undefined" if y is None else "0" if y == 0 else f"{y:.3g}"
            ax.annotate(text, (x, y or floor), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)
    ax.set_xticks(range(len(METHODS)), METHODS)
    ax.set_ylabel("relative variance  E|g - mean|² / |mean|²")
    draws = next(iter(modes.values()))["draws"]
    ax.set_title(f"outer-gradient noise w.r.t. synthetic images ({draws} draws)", fontsize=9)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    artifacts.write_bytes(path, buf.getvalue())


def write_grad_variance(ctx: DistillContext, out_dir: str | os.PathLike, draws: int = 16) -> dict:
    """Run both modes; write ``grad_variance.json`` and ``grad_variance.png`` in ``out_dir``; return the result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {mode: grad_variance(ctx, draws, fixed_batch=(mode == "fixed_batch")) for mode in MODES}
    artifacts.write_json(out / "grad_variance.json", result)
    plot_grad_variance(result, out / "grad_variance.png")
    return result
