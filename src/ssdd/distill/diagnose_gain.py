"""Where a distilled set's held-out gain lives: in its images, in its targets, or in the two together.

A set with learned MSE targets (KRR-ST) moves both its images and its targets away from its start (m real
images with their teacher features). Its held-out KRR-ST loss (the check a ``krr_st`` run records: KRR
fitted on the set, predicting the teacher's features of held-out real images, with the same batches and
evaluation models) is scored for four sets: the start, distilled images with the initial targets, the
initial images with the distilled targets, and both distilled. The gain (start minus both) then splits
into what the images alone give, what the targets alone give, and what only the pair gives (the
interaction). How far each part moved is reported beside it: images in pixel units and relative to their
mean magnitude, targets by the relative norm of their change.

The start is not stored in the set; it is rebuilt from the recorded ``init_index`` by the engine's own
:func:`ssdd.distill.engines.krr_engine.initial_set`, so it is the start the method had, not a copy of
its recipe.

A set with ``distill.views`` is scored as its run's check scores it: every view of each candidate's images,
each with its target. Its targets are then the base target with the K-1 view targets (the start's are the
teacher's features of the initial views, as the run began), and the targets' movement is over all m·K.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import torch

from ssdd import artifacts
from ssdd.distill.engines.krr_engine import initial_set
from ssdd.distill.methods.krr_st import heldout_check_losses
from ssdd.distill.registry import DistillContext
from ssdd.distilled_set import DistilledArtifact, to_unit
from ssdd.errors import UserError
from ssdd.views import transforms as views

# the four sets, in the table's order: (key, images, targets)
SETS = (("initial", "initial", "initial"), ("distilled_images", "distilled", "initial"),
        ("distilled_targets", "initial", "distilled"), ("distilled", "distilled", "distilled"))


def movement(x0: torch.Tensor, x: torch.Tensor, y0: torch.Tensor, y: torch.Tensor, image_space: str,
             mean: list[float] | None, std: list[float] | None) -> dict[str, dict[str, float]]:
    """How far images and targets moved from their start.

    Images: mean |Δx| in the set's own space (normalised units for a normalised set) against the start's mean
    |x|; the same in [0, 255] pixel units (against the start's mean pixel value), the largest pixel change and
    the share of pixel values that left [0, 255]. Targets: ``|Δy| / |y0|`` (Frobenius norms), ``|y| / |y0|``
    and mean |Δy| against mean |y0|.
    """
    p0, p = (to_unit(t.detach().cpu().double(), image_space, mean, std).double() * 255 for t in (x0, x))
    x0, x, y0, y = (t.detach().cpu().double() for t in (x0, x, y0, y))
    dx = (x - x0).abs()
    dp = (p - p0).abs()
    dy = y - y0
    images = {"mean_abs_delta": dx.mean().item(), "mean_abs_start": x0.abs().mean().item(),
              "relative": _ratio(dx.mean().item(), x0.abs().mean().item()),
              "mean_abs_delta_pixels": dp.mean().item(), "mean_start_pixels": p0.abs().mean().item(),
              "relative_pixels": _ratio(dp.mean().item(), p0.abs().mean().item()),
              "max_abs_delta_pixels": dp.max().item() if dp.numel() else 0.0,
              "out_of_range": ((p < -0.5) | (p > 255.5)).double().mean().item()}
    targets = {"relative_norm_change": _ratio(dy.norm().item(), y0.norm().item()),
               "norm_ratio": _ratio(y.norm().item(), y0.norm().item()),
               "mean_abs_delta": dy.abs().mean().item(), "mean_abs_start": y0.abs().mean().item(),
               "relative": _ratio(dy.abs().mean().item(), y0.abs().mean().item())}
    return {"images": images, "targets": targets}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def split(losses: dict[str, float]) -> dict[str, Any]:
    """The gain (initial - distilled) and its parts: images alone, targets alone, and the interaction (what
    is left); each part also as a share of the gain (None when the gain is 0)."""
    start = losses["initial"]
    total = start - losses["distilled"]
    images, targets = start - losses["distilled_images"], start - losses["distilled_targets"]
    parts = {"images_alone": images, "targets_alone": targets, "interaction": total - images - targets}
    share = {name: (v / total if total != 0 else None) for name, v in parts.items()}
    return {"total": total, "relative_to_start": _ratio(total, start), **parts, "share": share}


def gain_split(ctx: DistillContext, artifact: DistilledArtifact) -> dict[str, Any]:
    """The held-out loss of the four sets (module docstring), the gain's split, how far the set moved, and the
    set's own recorded held-out check beside the reproduced one. ``ctx``: the context of the set's seed,
    with the held-out source."""
    if artifact.objective != "mse" or artifact.targets.shape[1] == 0:
        raise UserError(f"diagnose images-vs-targets: {artifact.method} sets have {artifact.objective} targets; "
                        "this diagnostic is for sets with learned MSE targets (krr_st, krr_st_experts)")
    if artifact.views != ctx.cfg.views:
        raise UserError(f"diagnose images-vs-targets: {artifact.path} has views {artifact.views!r} but this config's "
                        f"distill.views is {ctx.cfg.views!r}; diagnose it with the config it was made with")
    if "init_index" not in artifact.meta:
        raise UserError(f"diagnose images-vs-targets: {artifact.path} records no init_index, so its start is unknown")
    if ctx.heldout is None or len(ctx.heldout) == 0:
        raise UserError("diagnose images-vs-targets: the held-out check needs held-out source images (data.heldout > 0)")
    index = torch.as_tensor(artifact.meta["init_index"], dtype=torch.long)
    x0, y0 = initial_set(ctx, index)
    if tuple(x0.shape) != tuple(artifact.images.shape) or tuple(y0.shape) != tuple(artifact.targets.shape):
        raise UserError(f"diagnose images-vs-targets: {artifact.path} holds images {list(artifact.images.shape)} and "
                        f"targets {list(artifact.targets.shape)}, but its start here is {list(x0.shape)} and "
                        f"{list(y0.shape)}; is this the run folder and config it was made in?")
    # as the engine held them: the start as drawn, the learned images channels-last (the method's check saw that
    # layout, and a convolution may round differently on another)
    x = artifact.images.to(ctx.device, x0.dtype).contiguous(memory_format=torch.channels_last)
    y = artifact.targets.to(ctx.device, y0.dtype)
    if artifact.views != views.NONE:  # a target is then the base target with the targets of views 1..K-1
        y0 = views.expand_targets(y0, ctx.teacher_view_targets(x0).to(y0.dtype))
        y = views.expand_targets(y, artifact.all_view_targets().to(ctx.device, y0.dtype))
    pick = {"initial": (x0, y0), "distilled": (x, y)}
    def images(which: str) -> torch.Tensor:
        return pick[which][0] if artifact.views == views.NONE else views.expand(pick[which][0], artifact.views)

    losses = heldout_check_losses(ctx, {key: (images(i), pick[t][1]) for key, i, t in SETS})
    k = ctx.cfg.krr_st
    result: dict[str, Any] = {
        "method": artifact.method, "seed": ctx.seed, "m": len(index), "views": artifact.views,
        "image_space": artifact.image_space,
        "losses": losses, "gain": split(losses), "movement": movement(x0, x, y0, y, artifact.image_space,
                                                                        artifact.mean, artifact.std),
        "check": {"heldout_images": len(ctx.heldout), "batches": k.check_batches, "models": k.check_models,
                  "batch": min(ctx.cfg.batch, len(ctx.heldout))},
        "start": "rebuilt from the set's init_index by the KRR-ST engine's initial_set",
    }
    recorded = artifact.meta.get("heldout_check")
    if isinstance(recorded, dict) and {"init", "distilled"} <= set(recorded):
        ours = {"init": losses["initial"], "distilled": losses["distilled"]}
        result["recorded_check"] = {"init": recorded["init"], "distilled": recorded["distilled"],
                                    "max_relative_difference": max(abs(ours[n] - recorded[n]) / abs(recorded[n])
                                                                   if recorded[n] else abs(ours[n]) for n in ours)}
    return result


def _num(v: float | None, fmt: str = ".4g") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


LABELS = {"initial": "initial images  + initial targets", "distilled_images": "distilled images + initial targets",
          "distilled_targets": "initial images  + distilled targets", "distilled": "distilled images + distilled targets"}


def format_table(result: dict[str, Any]) -> str:
    """One screen of text: the four losses, the gain's split, how far images and targets moved."""
    losses, gain, move = result["losses"], result["gain"], result["movement"]
    start, check = losses["initial"], result["check"]
    im, tg = move["images"], move["targets"]
    space = "normalised" if result["image_space"] == "normalized" else "[0,1]"
    head = (f"images vs targets: {result['method']} seed {result['seed']} (m = {result['m']}), held-out KRR-ST loss "
            f"({check['batches']} batches of {check['batch']} from {check['heldout_images']} held-out images, "
            f"{check['models']} models)")
    lines = [head, "", f"{'set':<38} {'loss':>10} {'/ start':>8}"]
    for key, _, _ in SETS:
        lines.append(f"{LABELS[key]:<38} {losses[key]:>10.4g} {_num(_ratio(losses[key], start), '.3f'):>8}")
    lines += ["", (f"{'gain (start - both distilled)':<38} {gain['total']:>10.3g} "
                   f"{_pct(gain['relative_to_start']):>8} of the start")]
    for key, label in (("images_alone", "images alone"), ("targets_alone", "targets alone"),
                       ("interaction", "interaction (together - alone)")):
        lines.append(f"  {label:<36} {gain[key]:>10.3g} {_pct(gain['share'][key]):>8} of the gain")
    lines += ["", "how far the set moved from its start",
              (f"  images  mean |dx| {im['mean_abs_delta']:.4g} ({space} units) = {_pct(im['relative'])} of mean |x| "
               f"{im['mean_abs_start']:.3g}"),
              (f"          {im['mean_abs_delta_pixels']:.3g} pixel units (0-255) = {_pct(im['relative_pixels'])} of "
               f"the mean pixel {im['mean_start_pixels']:.3g}; largest {im['max_abs_delta_pixels']:.3g}; "
               f"{_pct(im['out_of_range'])} of values outside [0, 255]"),
              (f"  targets |dy| / |y0| = {_pct(tg['relative_norm_change'])}; |y| / |y0| = "
               f"{_num(tg['norm_ratio'], '.4f')}; mean |dy| = {_pct(tg['relative'])} of mean |y0|")]
    rec = result.get("recorded_check")
    if rec:
        lines += ["", (f"the set's own held-out check: init {rec['init']:.4g}, distilled {rec['distilled']:.4g} "
                       f"(reproduced here to a relative {rec['max_relative_difference']:.1e})")]
    return "\n".join(lines) + "\n"


def plot_gain_split(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Four horizontal bars (the losses), each annotated with its value and its ratio to the start."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, start = result["losses"], result["losses"]["initial"]
    keys = [key for key, _, _ in SETS]
    fig, ax = plt.subplots(figsize=(6.5, 2.6))
    colors = ["#9e9e9e", "#4c72b0", "#dd8452", "#55a868"]
    ax.barh(range(len(keys)), [losses[k] for k in keys], color=colors)
    for i, k in enumerate(keys):
        ax.annotate(f" {losses[k]:.3g} ({_num(_ratio(losses[k], start), '.2f')}x)", (losses[k], i), va="center",
                    fontsize=8)
    ax.set_yticks(range(len(keys)), [LABELS[k] for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(losses.values()) * 1.3 or 1.0)
    ax.set_xlabel("held-out KRR-ST loss (lower is better)", fontsize=8)
    gain = result["gain"]
    ax.set_title(f"{result['method']} seed {result['seed']}: gain {gain['total']:.3g}; images alone "
                 f"{_pct(gain['share']['images_alone'])}, targets alone {_pct(gain['share']['targets_alone'])}",
                 fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    artifacts.write_bytes(path, buf.getvalue())


def write_gain_split(result: dict[str, Any], out_dir: str | os.PathLike, stem: str) -> list[Path]:
    """``<stem>.json``, ``<stem>.txt`` (the table) and ``<stem>.png`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.txt", out / f"{stem}.png"]
    artifacts.write_json(paths[0], result)
    artifacts.write_bytes(paths[1], format_table(result).encode())
    plot_gain_split(result, paths[2])
    return paths
