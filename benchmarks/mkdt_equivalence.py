"""ssdd's MKDT against the authors' code, on identical inputs.

    MKDT_OFFICIAL_DIR=/path/to/mkdt-data-distill-ssl python benchmarks/mkdt_equivalence.py

The authors' code is a checkout of sjoshi804/mkdt-data-distill-ssl, never copied here: one iteration of
the loop in their ``distill.py`` and one expert of their ``buffer.py`` run unchanged (``mkdt_official.py``
says how, and what is stubbed: ``wandb`` and ``torchvision``, which the parts run here never use).

1. Trajectory matching. Same student architecture (their ``ConvNetW32`` and ``ConvNet``, built by their
   ``get_network``, against ssdd's ``convnet`` of the same widths), same expert parameters (start and
   target), same synthetic images, targets and learned lr, same minibatches (ssdd with
   ``batch_order="reference"``, and the same seed for their ``torch.randperm``). Compared: the
   loss and its gradients w.r.t. the images, the targets and the lr, in float64 (their code run with
   float64 as torch's default dtype, so that their ``torch.tensor(0.0)`` accumulators are float64 too)
   and in float32. Relative error of a quantity: ``||ssdd - theirs|| / ||theirs||``.
2. One expert epoch: the same start (ssdd's seeded init loaded into their network), the same batches
   (ssdd's permutation given to their DataLoader), their KD recipe (MSE, SGD lr 0.1, momentum 0.9,
   wd 1e-4, batch 256, no augmentation) through their ``utils.epoch``. float32 only: their
   ``TensorDataset`` casts to float32.
3. High-loss selection. Their checkout has no code for it (the images come as a pickle of indices,
   ``--image_init_idx_path``), so ssdd's scores and top-m are compared with the recipe of
   ``../shared/methods/mkdt.md`` (per-example KD loss under each expert's epoch-1 parameters, averaged
   over experts, top m) applied to *their* epoch-1 networks from (2).

Ends with one JSON line: ``max_rel_err_float64`` and ``max_rel_err_float32`` (over the loss and every
gradient, all cases), the expert and high-loss figures, and the CPU model. It reports; the pytest
(tests/test_mkdt_equivalence.py) asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkdt_official  # noqa: E402

from ssdd.data import ImageSet, Normalizer  # noqa: E402
from ssdd.distill.engines.experts import ExpertsConfig, train_expert  # noqa: E402
from ssdd.distill.engines.seeding import build_seeded, expert_seed  # noqa: E402
from ssdd.distill.engines.trajectory import (flat_params, minibatches, trajectory_matching_loss,  # noqa: E402
                                             unrolled_params)
from ssdd.distill.methods.mkdt import high_loss_index  # noqa: E402
from ssdd.distill.registry import DistillContext  # noqa: E402
from ssdd.models import build  # noqa: E402
from ssdd.settings import DistillConfig  # noqa: E402
from ssdd.teacher import FeatureExtractor  # noqa: E402

# (their model name, ssdd widths, m, batch_syn (0: the whole set), N, d)
CASES = {"convnet_w32_minibatch": ("ConvNetW32", [32, 32, 32], 12, 5, 4, 16),
         "convnet_128_whole_set": ("ConvNet", [128, 128, 128], 4, 0, 2, 32)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def student_spec(widths: list[int], d: int) -> dict:
    return {"arch": "convnet", "in_channels": 3, "image_size": 32, "out_dim": d, "widths": list(widths),
            "pool": "flatten", "norm": "instance"}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def problem(widths: list[int], m: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A matching problem in float64: ssdd's seeded init as the expert's start, a perturbed copy as its
    target, images and targets of realistic scale, the inner lr."""
    gen = torch.Generator().manual_seed(seed)
    theta0 = flat_params(build_seeded(student_spec(widths, d), expert_seed(seed, 0, "equivalence"), "cpu")).double()
    scale = theta0.abs().mean()
    theta_star = theta0 + 0.05 * scale * torch.randn(theta0.shape, generator=gen, dtype=torch.float64)
    images = torch.randn(m, 3, 32, 32, generator=gen, dtype=torch.float64)
    targets = torch.randn(m, d, generator=gen, dtype=torch.float64)
    return {"theta0": theta0, "theta_star": theta_star, "images": images, "targets": targets,
            "lr": torch.tensor(0.05, dtype=torch.float64)}


def ssdd_matching(widths: list[int], prob: dict, steps: int, batch_syn: int, batch_seed: int,
                  dtype: torch.dtype) -> list[torch.Tensor]:
    """ssdd's loss and its gradients w.r.t. images, targets, lr (``batch_order="reference"``)."""
    model = build(student_spec(widths, prob["targets"].shape[1])).to(dtype)
    x, y, lr = (prob[k].to(dtype).clone().requires_grad_(True) for k in ("images", "targets", "lr"))
    theta0, theta_star = prob["theta0"].to(dtype), prob["theta_star"].to(dtype)
    theta_n = unrolled_params(model, theta0, x, y, lr, steps, batch_syn, torch.Generator().manual_seed(batch_seed),
                              F.mse_loss, order="reference")
    loss = trajectory_matching_loss(theta_n, theta0, theta_star)
    return [loss.detach(), *torch.autograd.grad(loss, [x, y, lr])]


def param_list(flat: torch.Tensor, net: torch.nn.Module) -> list[torch.Tensor]:
    shapes = [p.shape for p in net.parameters()]
    return [t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes)]


def official_matching(off: mkdt_official.Official, model_name: str, prob: dict, steps: int, batch_syn: int,
                      batch_seed: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """One iteration of their distill.py loop; returns (loss, image, target and lr gradients) and its namespace."""
    m, d = prob["targets"].shape

    with torch.random.fork_rng(devices=[]), default_dtype(dtype):
        def get_network(*args: Any, **kwargs: Any) -> torch.nn.Module:
            net = off.utils.get_network(*args, **kwargs)  # theirs: seeds the global RNG with the time
            torch.manual_seed(batch_seed)  # ... so the minibatch permutations are seeded here instead
            return net

        probe = off.utils.get_network(model_name, 3, d, (32, 32))
        theta0, theta_star = prob["theta0"].to(dtype), prob["theta_star"].to(dtype)
        trajectory = [param_list(theta0, probe), param_list(theta_star, probe)]
        image_syn, label_syn, syn_lr = (prob[k].to(dtype).clone().requires_grad_(True)
                                        for k in ("images", "targets", "lr"))
        args = types.SimpleNamespace(model=model_name, syn_steps=steps, batch_syn=batch_syn or m, dsa=False,
                                     no_aug=True, distributed=False, load_all=True, max_start_epoch=1,
                                     expert_epochs=1, device="cpu")
        ns = dict(vars(off.distill))
        ns.update(it=1, args=args, get_network=get_network, channel=3, im_size=(32, 32), image_syn=image_syn,
                  label_syn=label_syn, syn_lr=syn_lr, buffer=[trajectory], criterion=torch.nn.MSELoss(),
                  pbar=types.SimpleNamespace(set_postfix=lambda *a, **k: None),
                  optimizer_img=torch.optim.SGD([image_syn], lr=0.0, momentum=0.5),
                  optimizer_labels=torch.optim.SGD([label_syn], lr=0.0, momentum=0.5),
                  optimizer_lr=torch.optim.SGD([syn_lr], lr=0.0, momentum=0.5))
        mkdt_official.run(off.iteration, ns)  # lr 0 optimisers: the step leaves the inputs as they were
    return [ns["grand_loss"].detach(), image_syn.grad, label_syn.grad, syn_lr.grad], ns


def check_architectures(off: mkdt_official.Official) -> None:
    """Their networks and ssdd's have the same parameters in the same order (the flat layout matched)."""
    for model_name, widths, _, _, _, d in CASES.values():
        theirs = [tuple(p.shape) for p in off.utils.get_network(model_name, 3, d, (32, 32)).parameters()]
        ours = [tuple(p.shape) for p in build(student_spec(widths, d)).parameters()]
        if theirs != ours:
            raise SystemExit(f"{model_name}: parameter shapes differ from ssdd's convnet {widths}: {theirs} vs {ours}")


def matching(off: mkdt_official.Official) -> dict[str, Any]:
    out: dict[str, Any] = {"cases": {}}
    for name, (model_name, widths, m, batch_syn, steps, d) in CASES.items():
        prob = problem(widths, m, d)
        case: dict[str, Any] = {}
        theirs64, ns = official_matching(off, model_name, prob, steps, batch_syn, 7, torch.float64)
        case["same_minibatches"] = _same_last_permutation(ns, m, batch_syn, steps, 7)
        for label, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            ours = ssdd_matching(widths, prob, steps, batch_syn, 7, dtype)
            theirs = theirs64 if dtype == torch.float64 else official_matching(off, model_name, prob, steps,
                                                                               batch_syn, 7, dtype)[0]
            errs = {q: rel(a, b) for q, a, b in zip(("loss", "images", "targets", "lr"), ours, theirs)}
            case[label] = {"rel_err": errs, "max": max(errs.values())}
            if dtype == torch.float32:  # each fp32 run against their float64 one
                case[label]["ssdd_vs_their_float64"] = max(rel(a, b) for a, b in zip(ours, theirs64))
                case[label]["theirs_vs_their_float64"] = max(rel(a, b) for a, b in zip(theirs, theirs64))
        case["loss"] = float(theirs64[0])
        out["cases"][name] = case
    out["max_rel_err_float64"] = max(c["float64"]["max"] for c in out["cases"].values())
    out["max_rel_err_float32"] = max(c["float32"]["max"] for c in out["cases"].values())
    return out


def _same_last_permutation(ns: dict[str, Any], m: int, batch_syn: int, steps: int, seed: int) -> bool:
    """ssdd's last minibatch (:func:`minibatches`, reference order) is their last chunk ``these_indices``, and
    comes from their last permutation ``indices``."""
    ours = minibatches(m, batch_syn, steps, torch.Generator().manual_seed(seed), order="reference")[-1]
    theirs = ns["these_indices"]
    return bool(torch.equal(ours, theirs) and any(torch.equal(ours, c) for c in ns["indices"].split(batch_syn or m)))


# ---------------------------------------------------------------- experts and the high-loss selection

def expert_context(n: int = 300, d: int = 16, widths: list[int] = (32, 32, 32), count: int = 2) -> DistillContext:
    """A small source (random images), a random-weight teacher, the student of ``widths``, one-epoch experts."""
    gen = torch.Generator().manual_seed(1)
    source = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        teacher = FeatureExtractor(build({"arch": "convnet", "in_channels": 3, "image_size": 32, "out_dim": 0,
                                          "widths": [8, d], "pool": "gap", "norm": "batch"})).eval()
    cfg = DistillConfig(m=20, experts=ExpertsConfig(count=count, epochs=1, batch=256, precision="fp32"))
    return DistillContext(source=source, heldout=None, teacher=teacher, norm=Normalizer(*source.mean_std()),
                          spec=student_spec(list(widths), d), cfg=cfg, seed=0, init_index=torch.arange(cfg.m),
                          device="cpu", progress=False)


def official_expert(off: mkdt_official.Official, ctx: DistillContext, k: int, init: torch.Tensor,
                    model_name: str = "ConvNetW32") -> torch.nn.Module:
    """Their buffer.py loop for one expert of one epoch, from ssdd's init, over ssdd's batches of expert k."""
    images = ctx.to_space(ctx.source.images)
    targets = ctx.teacher_features()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(expert_seed(ctx.seed, k, "order")))
    cfg = ctx.cfg.experts
    dataset = off.utils.TensorDataset(images, targets)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch, sampler=order.tolist(), num_workers=0)
    made: list[torch.nn.Module] = []

    def get_network(*args: Any, **kwargs: Any) -> torch.nn.Module:
        net = off.utils.get_network(*args, **kwargs)
        with torch.no_grad():
            for p, v in zip(net.parameters(), param_list(init, net)):
                p.copy_(v)
        made.append(net)
        return net

    args = types.SimpleNamespace(model=model_name, lr_teacher=cfg.lr, mom=cfg.momentum, l2=cfg.weight_decay,
                                 train_epochs=1, device="cpu", enable_aug=False, dsa=False)
    ns = dict(vars(off.buffer))
    ns.update(it=1, args=args, get_network=get_network, channel=3, im_size=(32, 32), labels_all=targets,
              trainloader=loader, criterion=torch.nn.MSELoss(), trajectories=[])
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        mkdt_official.run(off.expert, ns)
    return made[0]


def experts(off: mkdt_official.Official) -> dict[str, Any]:
    ctx = expert_context()
    images, targets = ctx.to_space(ctx.source.images), ctx.teacher_features()
    param_errs, update_errs, ours_scores, their_scores = [], [], [], []
    for k in range(ctx.cfg.experts.count):
        trajectory, scores = train_expert(ctx, k)
        net = official_expert(off, ctx, k, trajectory[0])
        theirs = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        param_errs.append(rel(trajectory[1], theirs))
        update_errs.append(rel(trajectory[1] - trajectory[0], theirs - trajectory[0]))
        with torch.no_grad():  # mkdt.md stage 2 on their epoch-1 network (eval mode; instance norm)
            net.eval()
            their_scores.append(((net(images) - targets) ** 2).mean(1))
        ours_scores.append(scores)
    ours_mean, their_mean = torch.stack(ours_scores).mean(0), torch.stack(their_scores).mean(0)
    m = ctx.cfg.m
    ours_top, their_top = high_loss_index(ours_mean, m), torch.argsort(their_mean, descending=True)[:m]
    ranked = torch.sort(their_mean, descending=True).values
    return {"expert_epoch_rel_err_float32": max(param_errs), "expert_epoch_update_rel_err_float32": max(update_errs),
            "high_loss_scores_rel_err_float32": rel(ours_mean, their_mean),
            "high_loss_same_top_m": bool(set(ours_top.tolist()) == set(their_top.tolist())),
            "high_loss_boundary_gap": float(ranked[m - 1] - ranked[m]),
            "high_loss_score_max_abs_diff": float((ours_mean - their_mean).abs().max()),
            "experts": ctx.cfg.experts.count, "source_images": len(images)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default=None, help="the authors' checkout (default: $MKDT_OFFICIAL_DIR)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    off = mkdt_official.Official(args.official)
    check_architectures(off)
    result = matching(off)
    result.update(experts(off))
    result.update(stubbed=off.stubbed, skipped=mkdt_official.SKIPPED, torch=torch.__version__, cpu=cpu_model(),
                  threads=torch.get_num_threads())
    for name, case in result["cases"].items():
        print(json.dumps({"case": name, **case}), flush=True)
    summary = {k: v for k, v in result.items() if k != "cases"}
    print(json.dumps(summary), flush=True)
    return result


if __name__ == "__main__":
    main()
