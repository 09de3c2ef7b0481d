"""MTT: the cross-entropy unrolled step against a hand-written float64 reference (and MKDT's MSE path
unchanged), classifier experts from the shared expert trainer, class-balanced init, and mtt through
the pipeline on a tiny labelled slice."""

import copy
import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssdd import artifacts, distilled_set
from ssdd.cli import main
from ssdd.data import ImageSet, Normalizer
from ssdd.data.dataset import load_dataset
from ssdd.distill.engines.experts import ExpertsConfig, kd_task, train_expert
from ssdd.distill.engines.seeding import build_seeded, expert_seed
from ssdd.distill.engines.trajectory import flat_params, trajectory_matching_loss, unflatten_params, unrolled_params
from ssdd.distill.methods.mtt import MttConfig, classifier_task, distill_mtt, train_ce_experts
from ssdd.distill.registry import DistillContext, Hooks, SourceLabels, get, get_prep
from ssdd.errors import Stopped, UserError
from ssdd.models import build
from ssdd.settings import DistillConfig
from ssdd.teacher import FeatureExtractor
from test_methods import tiny_args, tiny_npz

N_IN, C = 6, 3


# ---------------------------------------------------------------- the unrolled step, by hand (float64)

def _linear():
    return nn.Sequential(nn.Flatten(), nn.Linear(N_IN, C)).double()


def _split(theta):
    return theta[:C * N_IN].view(C, N_IN), theta[C * N_IN:]


def _hand_steps(theta, x, y, lr, steps, loss):
    """``steps`` full-batch gradient steps on a linear model with the gradient derived by hand:
    cross-entropy to probability rows y gives (softmax(z) - y) / B; MSE gives 2 (z - y) / (B C)."""
    x = x.reshape(len(x), -1)
    for _ in range(steps):
        w, b = _split(theta)
        z = x @ w.T + b
        if loss == "ce":
            d_z = (torch.exp(z) / torch.exp(z).sum(1, keepdim=True) - y) / len(x)
        else:
            d_z = 2 * (z - y) / z.numel()
        theta = theta - lr * torch.cat([(d_z.T @ x).reshape(-1), d_z.sum(0)])
    return theta


def _toy(seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(C * N_IN + C, generator=gen, dtype=torch.float64) * 0.5
    theta_star = theta0 + torch.randn(C * N_IN + C, generator=gen, dtype=torch.float64) * 0.1
    x = torch.randn(5, 1, 2, 3, generator=gen, dtype=torch.float64)
    return theta0, theta_star, x


def test_cross_entropy_unrolled_steps_match_a_hand_written_reference():
    theta0, theta_star, x = _toy()
    labels = torch.tensor([0, 2, 1, 2, 0])
    y = F.one_hot(labels, C).double()
    images = x.clone().requires_grad_(True)
    alpha = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    theta_n = unrolled_params(_linear(), theta0, images, y, alpha, 2, loss=F.cross_entropy)
    torch.testing.assert_close(theta_n.detach(), _hand_steps(theta0, x, y, 0.7, 2, "ce"), rtol=1e-12, atol=1e-12)
    # one-hot probability rows are the hard labels of MTT's criterion
    hard = unrolled_params(_linear(), theta0, x, labels, 0.7, 2, loss=F.cross_entropy)
    torch.testing.assert_close(hard, theta_n.detach(), rtol=1e-12, atol=1e-12)

    # and the outer gradient (images, inner lr) is the derivative of the hand-written matching loss
    loss = trajectory_matching_loss(theta_n, theta0, theta_star)
    g_img, g_lr = torch.autograd.grad(loss, [images, alpha])
    def ref(xx, a):
        return trajectory_matching_loss(_hand_steps(theta0, xx, y, a, 2, "ce"), theta0, theta_star)
    h = 1e-6
    num_img = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=x.dtype)
        step[i] = h
        step = step.view_as(x)
        num_img.view(-1)[i] = (ref(x + step, 0.7) - ref(x - step, 0.7)) / (2 * h)
    torch.testing.assert_close(g_img, num_img, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_lr, (ref(x, 0.7 + h) - ref(x, 0.7 - h)) / (2 * h), rtol=1e-6, atol=1e-9)


def test_mse_path_is_unchanged_by_the_loss_parameter():
    theta0, _, x = _toy(1)
    y = torch.randn(5, C, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    default = unrolled_params(_linear(), theta0, x, y, 0.3, 2)  # mkdt's call: no loss given
    torch.testing.assert_close(default, _hand_steps(theta0, x, y, 0.3, 2, "mse"), rtol=1e-12, atol=1e-12)
    assert torch.equal(default, unrolled_params(_linear(), theta0, x, y, 0.3, 2, loss=F.mse_loss))
    # float32 on a ConvNet: bit-identical to explicit MSE steps taken through autograd
    torch.manual_seed(0)
    spec = {"arch": "convnet", "in_channels": 1, "image_size": 8, "out_dim": 4, "widths": [4, 8], "pool": "flatten",
            "norm": "instance"}
    model = build(spec)
    start, xs, ys = flat_params(model), torch.randn(6, 1, 8, 8), torch.randn(6, 4)
    theta = start.clone().requires_grad_(True)
    for _ in range(2):
        out = torch.func.functional_call(model, unflatten_params(model, theta), (xs,))
        (g,) = torch.autograd.grad(F.mse_loss(out, ys), theta, create_graph=True)
        theta = theta - 0.1 * g
    assert torch.equal(unrolled_params(model, start, xs, ys, 0.1, 2), theta)


# ---------------------------------------------------------------- experts and the method on a tiny labelled source

SPEC = {"arch": "convnet", "in_channels": 1, "image_size": 8, "out_dim": 5, "widths": [4, 8], "pool": "flatten",
        "norm": "instance"}


def saved_and_loaded(state):
    """A checkpoint state as the pipeline reads it back (torch.save, then weights-only load)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)


def make_ctx(seed=0, mtt=None, experts=None, labelled=True, hooks=None, prep=None):
    gen = torch.Generator().manual_seed(0)
    source = ImageSet(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=gen))
    torch.manual_seed(123)
    teacher = FeatureExtractor(build({**SPEC, "out_dim": 0, "widths": [6, 5], "pool": "gap", "norm": "batch"})).eval()
    expert_cfg = ExpertsConfig(**{"count": 2, "epochs": 3, "batch": 16, "lr": 0.05, "momentum": 0.0,
                                  "weight_decay": 0.0, **(experts or {})})
    cfg = DistillConfig(m=7, experts=ExpertsConfig(count=1, epochs=1, batch=16),
                        mtt=MttConfig(**{"iterations": 3, "syn_steps": 3, "span": 1, "max_start_epoch": 2,
                                         "lr_images": 10.0, "lr_lr": 1e-5, "lr_init": 0.05, "experts": expert_cfg,
                                         **(mtt or {})}))
    labels = SourceLabels(torch.arange(40) % 3, 3) if labelled else None
    return DistillContext(source=source, heldout=None, teacher=teacher, norm=Normalizer(*source.mean_std()),
                          spec=dict(SPEC), cfg=cfg, seed=seed, init_index=torch.arange(7), device="cpu",
                          progress=False, hooks=hooks or Hooks(), prep=prep or {}, labels=labels)


@pytest.mark.parametrize("kind", ["kd", "ce"])
def test_an_expert_epoch_is_plain_sgd_on_its_loss(kind):
    """The shared trainer: KD experts (MSE to teacher features) and classifier experts (cross-entropy
    to labels) both equal a direct SGD loop over the same shuffled batches from the same init."""
    ctx = make_ctx(0, experts={"count": 1, "epochs": 1})
    task = kd_task(ctx) if kind == "kd" else classifier_task(ctx)
    if kind == "kd":
        task = dataclasses.replace(task, cfg=ctx.cfg.mtt.experts)  # plain SGD for both
    trajectory, _ = train_expert(ctx, 0, task=task)
    tag = "" if kind == "kd" else "ce-"
    model = build_seeded(task.spec, expert_seed(0, 0, tag + "init"), "cpu").train()
    assert torch.equal(trajectory[0], flat_params(model))
    targets = ctx.teacher_features() if kind == "kd" else ctx.labels.labels
    loss_fn = F.mse_loss if kind == "kd" else F.cross_entropy
    order = torch.randperm(40, generator=torch.Generator().manual_seed(expert_seed(0, 0, tag + "order")))
    for i in range(0, 40, 16):
        idx = order[i:i + 16]
        model.zero_grad()
        loss_fn(model(ctx.to_space(ctx.source.images[idx])), targets[idx]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
    torch.testing.assert_close(trajectory[1], flat_params(model), rtol=1e-5, atol=1e-6)
    assert trajectory.shape == (2, sum(p.numel() for p in model.parameters()))


def test_ce_experts_are_classifiers_reproducible_and_resumable():
    a = train_ce_experts(make_ctx(0))
    b = train_ce_experts(make_ctx(0))
    p = sum(q.numel() for q in build({**SPEC, "out_dim": 3}).parameters())
    assert a["trajectories"].shape == (2, 4, p) and a["epoch1_loss"].shape == (40,)
    assert torch.isfinite(a["trajectories"]).all() and (a["epoch1_loss"] > 0).all()
    assert torch.equal(a["trajectories"], b["trajectories"]) and torch.equal(a["epoch1_loss"], b["epoch1_loss"])
    saved = []
    hooks = Hooks(checkpoint=lambda st: saved.append(copy.deepcopy(st)), should_stop=lambda: len(saved) == 0)
    with pytest.raises(Stopped):
        train_ce_experts(make_ctx(0, hooks=hooks))
    resumed = train_ce_experts(make_ctx(0, hooks=Hooks(resume=saved_and_loaded(saved[0]))))
    assert torch.equal(resumed["trajectories"], a["trajectories"])
    assert get("mtt").prep == ("ce_experts",) and get_prep("ce_experts").run is train_ce_experts
    assert get_prep("ce_experts").needs == ("distill.mtt.experts",)


@pytest.fixture(scope="module")
def ce_prep():
    return {"ce_experts": train_ce_experts(make_ctx(0))}


def test_mtt_learns_images_and_lr_with_fixed_one_hot_labels_and_resumes(ce_prep):
    full = distill_mtt(make_ctx(0, prep=ce_prep, mtt={"iterations": 4}))
    ctx = make_ctx(0)
    index = torch.tensor(full.meta["init_index"])
    assert full.images.shape == (7, 1, 8, 8) and torch.isfinite(full.images).all()
    assert full.objective == "cross_entropy" and torch.equal(full.targets, F.one_hot(index % 3, 3).float())
    assert full.lr > 0 and abs(full.lr - 0.05) > 1e-8 and full.meta["lr_curve"][-1] == full.lr
    assert sorted(full.meta["class_counts"]) == [2, 2, 3] and len(full.meta["losses"]) == 4
    assert not torch.equal(full.images, ctx.to_space(ctx.source.images[index]))
    saved = []
    hooks = Hooks(checkpoint=lambda st: saved.append(copy.deepcopy(st)), checkpoint_due=lambda step: True,
                  should_stop=lambda: len(saved) == 1)
    with pytest.raises(Stopped):
        distill_mtt(make_ctx(0, prep=ce_prep, mtt={"iterations": 4}, hooks=hooks))
    resumed = distill_mtt(make_ctx(0, prep=ce_prep, mtt={"iterations": 4},
                                   hooks=Hooks(resume=saved_and_loaded(saved[1]))))
    assert torch.equal(resumed.images, full.images) and resumed.lr == full.lr and resumed.meta == full.meta


def test_mtt_errors_name_the_option(ce_prep):
    with pytest.raises(UserError, match="mtt needs a labelled source"):
        train_ce_experts(make_ctx(0, labelled=False))
    with pytest.raises(UserError, match="mtt needs a labelled source"):
        distill_mtt(make_ctx(0, labelled=False, prep=ce_prep))
    with pytest.raises(UserError, match="distill.mtt.experts.epochs"):
        distill_mtt(make_ctx(0, prep=ce_prep, mtt={"max_start_epoch": 3}))
    with pytest.raises(UserError, match="distill.mtt.lr_images"):
        distill_mtt(make_ctx(0, prep=ce_prep, mtt={"lr_images": 1e30}))


def test_mtt_through_the_pipeline(tmp_path):
    src = tiny_npz(tmp_path / "src.npz")
    out = tmp_path / "run"
    args = tiny_args(src, [src], ["mtt"], seeds=1) + ["--set", "distill.mtt.iterations=3",
                                                       "--set", "distill.mtt.syn_steps=3"]
    assert main(["run", "--out", str(out), "--until", "distill", *args]) == 0
    images, targets, meta = distilled_set.load_arrays(out / "distilled" / "mtt.safetensors")
    assert images.shape == (6, 3, 16, 16) and torch.isfinite(images).all()
    assert meta["objective"] == "cross_entropy" and meta["method"] == "mtt"
    assert targets.shape == (6, 4) and torch.equal(targets.sum(1), torch.ones(6))
    assert set(targets.unique().tolist()) == {0.0, 1.0}  # one-hot
    labels = artifacts.load_tensors(out / "data" / "source_labels.safetensors")[0]["labels"]
    index = torch.tensor(meta["init_index"])
    assert torch.equal(targets.argmax(1), labels[index]) and sorted(meta["class_counts"]) == [1, 1, 2, 2]
    assert meta["lr"] is not None and meta["lr"] > 0 and abs(meta["lr"] - 0.01) > 1e-8 and len(meta["losses"]) == 3
    source = load_dataset(out / "data" / "source_train.safetensors")
    norm = Normalizer(meta["mean"], meta["std"])
    assert not torch.allclose(images, norm(source.images[index]))  # the images moved
    prep, prep_meta = artifacts.load_tensors(out / "distilled" / "prep" / "ce_experts.safetensors")
    assert prep_meta["name"] == "ce_experts" and prep["trajectories"].shape[:2] == (2, 3)
    assert not (out / "distilled" / "prep" / "experts.safetensors").exists()  # mtt never trains KD experts
