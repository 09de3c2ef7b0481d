"""MKDT: trajectory-matching maths against a hand-written float64 reference, KD experts
(reproducible per seed, resumable), and the mkdt / high_loss methods on a tiny source."""

import copy
import io

import pytest
import torch
from torch import nn

from ssdd.data import ImageSet, Normalizer
from ssdd.distill.engines.experts import ExpertsConfig, train_expert
from ssdd.distill.engines.seeding import expert_seed
from ssdd.distill.engines.trajectory import (flat_params, load_flat_params, minibatches, trajectory_matching_loss,
                                            unflatten_params, unrolled_params)
from ssdd.distill.methods.mkdt import MkdtConfig, distill_mkdt, high_loss_subset, train_experts
from ssdd.distill.registry import DistillContext, Hooks, get, get_prep
from ssdd.errors import Stopped, UserError
from ssdd.models import build
from ssdd.settings import DistillConfig, load_config
from ssdd.teacher import FeatureExtractor

D = 6
SPEC = {"arch": "convnet", "in_channels": 1, "image_size": 8, "out_dim": D, "widths": [4, 8], "pool": "gap",
        "norm": "instance"}


# ---------------------------------------------------------------- trajectory maths (float64, by hand)

def _toy_split(theta, n_in, hidden, n_out):
    """theta -> (W1, b1, W2, b2) in the parameter order of Sequential(Flatten, Linear, Tanh, Linear)."""
    sizes = [hidden * n_in, hidden, n_out * hidden, n_out]
    w1, b1, w2, b2 = torch.split(theta, sizes)
    return w1.view(hidden, n_in), b1, w2.view(n_out, hidden), b2


def _reference_loss(theta0, theta_star, images, targets, alpha, batches, dims):
    """N plain GD steps with the MSE gradient of a two-layer tanh network derived by hand."""
    n_in, hidden, n_out = dims
    theta = theta0.clone()
    for index in batches:
        x, y = images[index].reshape(len(index), -1), targets[index]
        w1, b1, w2, b2 = _toy_split(theta, n_in, hidden, n_out)
        h = torch.tanh(x @ w1.T + b1)
        out = h @ w2.T + b2
        d_out = 2 * (out - y) / out.numel()
        d_w2, d_b2 = d_out.T @ h, d_out.sum(0)
        d_pre = (d_out @ w2) * (1 - h * h)
        d_w1, d_b1 = d_pre.T @ x, d_pre.sum(0)
        grad = torch.cat([d_w1.reshape(-1), d_b1, d_w2.reshape(-1), d_b2])
        theta = theta - alpha * grad
    return ((theta - theta_star) ** 2).sum() / ((theta0 - theta_star) ** 2).sum()


def test_minibatches_are_successive_chunks_of_fresh_permutations():
    batches = minibatches(10, 3, 7, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [3] * 7
    for first in (0, 3):  # each permutation yields 3 full chunks (9 of 10 indices, no repeats)
        chunk = torch.cat(batches[first:first + 3])
        assert len(set(chunk.tolist())) == 9
    assert all(torch.equal(b, torch.arange(5)) for b in minibatches(5, 0, 3))
    assert all(torch.equal(b, torch.arange(5)) for b in minibatches(5, 8, 2))


def test_matching_loss_and_gradients_match_a_hand_written_float64_reference():
    n_in, hidden, n_out, m, steps, batch = 9, 5, 2, 6, 4, 4
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).double()
    p = sum(q.numel() for q in model.parameters())
    theta0 = torch.randn(p, generator=gen, dtype=torch.float64) * 0.5
    theta_star = theta0 + torch.randn(p, generator=gen, dtype=torch.float64) * 0.1
    images = torch.randn(m, 1, 3, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    targets = torch.randn(m, n_out, generator=gen, dtype=torch.float64).requires_grad_(True)
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    theta_n = unrolled_params(model, theta0, images, targets, alpha, steps, batch, torch.Generator().manual_seed(7))
    loss = trajectory_matching_loss(theta_n, theta0, theta_star)
    g_img, g_tgt, g_lr = torch.autograd.grad(loss, [images, targets, alpha])

    batches = minibatches(m, batch, steps, torch.Generator().manual_seed(7))
    dims = (n_in, hidden, n_out)
    ref = lambda x, y, a: _reference_loss(theta0, theta_star, x, y, a, batches, dims)  # noqa: E731
    x0, y0, a0 = images.detach(), targets.detach(), alpha.detach()
    torch.testing.assert_close(loss.detach(), ref(x0, y0, a0), rtol=1e-12, atol=1e-12)

    def central(f, base):
        h, grad = 1e-6, torch.zeros_like(base)
        for i in range(base.numel()):
            step = torch.zeros_like(base).view(-1)
            step[i] = h
            step = step.view_as(base)
            grad.view(-1)[i] = (f(base + step) - f(base - step)) / (2 * h)
        return grad

    torch.testing.assert_close(g_img, central(lambda x: ref(x, y0, a0), x0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_tgt, central(lambda y: ref(x0, y, a0), y0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_lr, central(lambda a: ref(x0, y0, a), a0), rtol=1e-6, atol=1e-9)
    assert g_img.abs().sum() > 0 and g_lr.abs() > 0


def test_unrolled_batchnorm_student_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = build({**SPEC, "norm": "batch"})
    model.eval()
    before = copy.deepcopy(model.state_dict())
    start = flat_params(model)
    x = torch.randn(5, 1, 8, 8, requires_grad=True)
    theta = unrolled_params(model, start, x, torch.randn(5, D), 0.1, 2)
    theta.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_flatten_roundtrip_on_a_channels_last_model():
    torch.manual_seed(0)
    model = build(SPEC)
    flat = flat_params(model)
    named = unflatten_params(model, flat)
    assert all(torch.equal(named[k], v) for k, v in model.named_parameters())
    other = build(SPEC)
    load_flat_params(other, flat)
    assert torch.equal(flat_params(other), flat)


# ---------------------------------------------------------------- experts and methods on a tiny source

def saved_and_loaded(state):
    """A checkpoint state as the pipeline reads it back (torch.save, then weights-only load)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)


def make_ctx(seed=0, experts=None, mkdt=None, hooks=None, prep=None, **distill):
    gen = torch.Generator().manual_seed(0)
    source = ImageSet(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=gen))
    torch.manual_seed(123)
    teacher = FeatureExtractor(build({**SPEC, "out_dim": 0, "widths": [6, D], "norm": "batch"})).eval()
    cfg = DistillConfig(m=8, experts=ExpertsConfig(**{"count": 2, "epochs": 3, "batch": 16, "lr": 0.05, **(experts or {})}),
                        mkdt=MkdtConfig(**{"iterations": 3, "syn_steps": 3, "span": 1, "max_start_epoch": 2,
                                           "lr_images": 1.0, "lr_targets": 1.0, "lr_lr": 1e-3, "batch_syn": 5,
                                           **(mkdt or {})}), **distill)
    init_index = torch.randperm(40, generator=torch.Generator().manual_seed(seed))[:cfg.m]
    return DistillContext(source=source, heldout=None, teacher=teacher, norm=Normalizer(*source.mean_std()),
                          spec=dict(SPEC), cfg=cfg, seed=seed, init_index=init_index, device="cpu", progress=False,
                          hooks=hooks or Hooks(), prep=prep or {})


def test_experts_are_reproducible_from_their_seed():
    a = train_experts(make_ctx(0))
    b = train_experts(make_ctx(0))
    c = train_experts(make_ctx(1))
    p = sum(q.numel() for q in build(SPEC).parameters())
    assert a["trajectories"].shape == (2, 4, p) and a["trajectories"].dtype == torch.float32
    assert a["epoch1_loss"].shape == (40,) and torch.isfinite(a["epoch1_loss"]).all()
    assert torch.equal(a["trajectories"], b["trajectories"]) and torch.equal(a["epoch1_loss"], b["epoch1_loss"])
    assert not torch.equal(a["trajectories"][0], c["trajectories"][0])
    assert not torch.equal(a["trajectories"][0, 0], a["trajectories"][1, 0])  # fresh init per expert
    assert not torch.equal(a["trajectories"][0, 0], a["trajectories"][0, 1])  # it trains
    alone, _ = train_expert(make_ctx(0), 1)  # expert 1 depends on (seed, 1) only
    assert torch.equal(alone, a["trajectories"][1])
    assert expert_seed(0, 1) != expert_seed(1, 0)


def test_experts_stop_and_resume_give_the_same_result():
    full = train_experts(make_ctx(0, experts={"count": 3}))
    saved = []
    hooks = Hooks(checkpoint=lambda st: saved.append(copy.deepcopy(st)), should_stop=lambda: len(saved) == 0)
    with pytest.raises(Stopped) as err:
        train_experts(make_ctx(0, experts={"count": 3}, hooks=hooks))
    assert err.value.step == 1 and [st["step"] for st in saved] == [1]
    resumed = train_experts(make_ctx(0, experts={"count": 3}, hooks=Hooks(resume=saved_and_loaded(saved[0]))))
    assert torch.equal(resumed["trajectories"], full["trajectories"])
    assert torch.equal(resumed["epoch1_loss"], full["epoch1_loss"])


def test_augmented_experts_differ_and_stay_finite():
    plain = train_experts(make_ctx(0, experts={"count": 1}))
    aug = train_experts(make_ctx(0, experts={"count": 1, "augment": True}))
    assert torch.equal(plain["trajectories"][0, 0], aug["trajectories"][0, 0])  # same init
    assert not torch.equal(plain["trajectories"][0, 1], aug["trajectories"][0, 1])
    assert torch.isfinite(aug["trajectories"]).all()


@pytest.fixture(scope="module")
def experts_prep():
    return {"experts": train_experts(make_ctx(0))}


def test_high_loss_picks_exactly_the_top_m(experts_prep):
    ctx = make_ctx(0, prep=experts_prep)
    out = high_loss_subset(ctx)
    scores = experts_prep["experts"]["epoch1_loss"]
    index = torch.tensor(out.meta["init_index"])
    assert len(set(index.tolist())) == 8
    rest = torch.ones(40, dtype=torch.bool)
    rest[index] = False
    assert scores[index].min() >= scores[rest].max()
    torch.testing.assert_close(out.images, ctx.norm(ctx.source.images[index]))
    torch.testing.assert_close(out.targets, ctx.teacher_features()[index])
    assert out.lr is None and get("high_loss").prep == ("experts",) and "distill.experts" in get("high_loss").needs


def test_mkdt_runs_learns_lr_and_is_deterministic(experts_prep):
    a = distill_mkdt(make_ctx(0, prep=experts_prep))
    b = distill_mkdt(make_ctx(0, prep=experts_prep))
    c = distill_mkdt(make_ctx(1, prep=experts_prep, mkdt={"init": "random"}))
    assert a.images.shape == (8, 1, 8, 8) and a.targets.shape == (8, D)
    assert torch.isfinite(a.images).all() and torch.isfinite(a.targets).all()
    assert a.lr != 0.1 and a.lr > 0 and a.meta["lr_curve"][-1] == a.lr
    assert len(a.meta["losses"]) == 3 and all(torch.isfinite(torch.tensor(a.meta["losses"])))
    assert a.meta["init"] == "high_loss"
    assert a.meta["init_index"] == high_loss_subset(make_ctx(0, prep=experts_prep)).meta["init_index"]
    init = make_ctx(0).norm(make_ctx(0).source.images[a.meta["init_index"]])
    assert not torch.equal(a.images, init)  # the images moved
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets) and a.lr == b.lr
    assert c.meta["init_index"] == make_ctx(1).init_index.tolist() and not torch.equal(a.images, c.images)
    assert get("mkdt").prep == ("experts",) and get_prep("experts").run is train_experts


def test_mkdt_resume_is_identical(experts_prep):
    cfg = {"iterations": 4}
    full = distill_mkdt(make_ctx(0, prep=experts_prep, mkdt=cfg))
    saved = []
    hooks = Hooks(checkpoint=lambda st: saved.append(copy.deepcopy(st)), checkpoint_due=lambda step: True,
                  should_stop=lambda: len(saved) == 1)
    with pytest.raises(Stopped) as err:
        distill_mkdt(make_ctx(0, prep=experts_prep, mkdt=cfg, hooks=hooks))
    assert err.value.step == 2 and [st["step"] for st in saved] == [1, 2]
    resumed = distill_mkdt(make_ctx(0, prep=experts_prep, mkdt=cfg, hooks=Hooks(resume=saved_and_loaded(saved[1]))))
    assert torch.equal(resumed.images, full.images) and torch.equal(resumed.targets, full.targets)
    assert resumed.lr == full.lr and resumed.meta == full.meta


def test_mkdt_batchnorm_student_and_bad_settings():
    prep = {"experts": train_experts(make_ctx(0, experts={"count": 1}))}
    with pytest.raises(UserError, match="distill.mkdt.init must be high_loss or random"):  # a config made in code
        distill_mkdt(make_ctx(0, prep=prep, mkdt={"init": "krr_st"}))
    with pytest.raises(UserError, match="distill.mkdt.lr_images"):
        distill_mkdt(make_ctx(0, prep=prep, mkdt={"lr_images": 1e30, "lr_targets": 1e30}))
    ctx = make_ctx(0, experts={"count": 1})
    ctx.spec = {**SPEC, "norm": "batch"}
    ctx.prep = {"experts": train_experts(ctx)}
    out = distill_mkdt(ctx)
    assert torch.isfinite(out.images).all() and out.lr != 0.1


def test_mkdt_init_and_epochs_are_checked_when_the_config_loads():
    """``init = "krr_st"`` used to pass the config and fail only after the teacher and the experts had run."""
    with pytest.raises(UserError, match=r"^--set: distill.mkdt.init must be one of high_loss, random, got 'krr_st'$"):
        load_config("demo", {"distill.mkdt.init": "krr_st"})
    with pytest.raises(UserError, match="distill.mkdt.max_start_epoch \\+ distill.mkdt.span = 9 needs experts"):
        load_config("demo", {"distill.mkdt.max_start_epoch": "7", "distill.experts.epochs": "3"})
    assert load_config("demo", {"distill.mkdt.init": "random"}).distill.mkdt.init == "random"


# ---------------------------------------------------------------- losses read in batches, memory check, RNG

def test_step_log_reads_in_batches_the_floats_item_gives_and_names_the_bad_step():
    from ssdd.loss_log import StepLog, read_every

    seen = []

    def finish(step, values, info):
        seen.append((step, info))
        if values[0] != values[0]:
            raise UserError(f"non-finite at {step}")
        return values[0] + values[1]

    kept = [0.5]  # a resumed run's losses: appended to in place
    assert read_every("cpu") == 1 and read_every("cuda") > 1  # a CPU read costs nothing
    log = StepLog(kept, finish, "cuda", every=3)
    losses = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 1 / 3, 2.7)]
    assert not log.add(1, [losses[0], torch.tensor(1.0)], "a") and not log.add(2, [losses[1], torch.tensor(0.0)])
    assert len(log) == 3 and kept == [0.5] and seen == []
    assert log.add(3, [losses[2], torch.tensor(True)], "c")  # the third step reads all three, once
    assert log.values is kept and kept == [0.5, losses[0].item() + 1.0, losses[1].item(), losses[2].item() + 1.0]
    assert [type(v) for v in kept] == [float] * 4 and seen == [(1, "a"), (2, None), (3, "c")]
    log.add(4, [torch.tensor(float("nan")), torch.tensor(0.0)])
    with pytest.raises(UserError, match="non-finite at 4"):
        log.read()
    # a loop that fails later (say a solver on the non-finite set) reports the pending non-finite loss
    log = StepLog([], finish, "cuda", every=10)
    with pytest.raises(UserError, match="non-finite at 7") as err:
        with log.guard():
            log.add(7, [torch.tensor(float("nan")), torch.tensor(0.0)])
            raise RuntimeError("linalg failed")
    assert isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="other"):  # nothing pending to blame: the error itself
        with StepLog([], finish, "cpu").guard():
            raise RuntimeError("other")


@pytest.mark.parametrize("every", [1, 3])
def test_mkdt_losses_and_lr_curve_do_not_depend_on_how_often_they_are_read(experts_prep, every, monkeypatch):
    from ssdd import loss_log
    full = distill_mkdt(make_ctx(0, prep=experts_prep, mkdt={"iterations": 4}))
    monkeypatch.setattr(loss_log, "read_every", lambda device: every)
    again = distill_mkdt(make_ctx(0, prep=experts_prep, mkdt={"iterations": 4}))
    assert again.meta == full.meta and again.lr == full.lr and torch.equal(again.images, full.images)
    assert all(type(v) is float for v in full.meta["losses"] + full.meta["lr_curve"])


def test_unroll_cost_arithmetic():
    from ssdd.distill.engines.unroll_memory import UnrollCost

    cost = UnrollCost(fixed=2e9, per_step=1e8, per_image=4e6)
    assert cost.need(40, 1000) == 2e9 + 40 * (1e8 + 1000 * 4e6)
    budget = 0.9 * 130e9
    b = cost.max_batch(40, budget)
    assert cost.need(40, b) <= budget < cost.need(40, b + 1)
    s = cost.max_steps(1000, budget)
    assert cost.need(s, 1000) <= budget < cost.need(s + 1, 1000)
    assert cost.max_batch(40, 1e9) == 0 and cost.max_steps(1000, 1e9) == 0  # not even the fixed part fits


def test_mkdt_refuses_an_iteration_that_cannot_fit_before_any_expert_work(monkeypatch):
    from ssdd.distill.engines import unroll_memory as mkdt_mod

    cost = mkdt_mod.UnrollCost(fixed=0.0, per_step=0.0, per_image=4e6)  # ~4 MB per image per unrolled step
    monkeypatch.setattr(mkdt_mod, "unroll_cost", lambda *args: cost)
    monkeypatch.setattr(mkdt_mod, "free_memory", lambda device: (130e9, "cuda:0"))
    ctx = make_ctx(0, mkdt={"syn_steps": 40, "batch_syn": 0})  # no experts in ctx.prep
    ctx.cfg.m = 1000
    message = ("distill.mkdt: 40 unrolled steps over 1000 images need ~160 GB, 130 GB free on cuda:0; "
               "set distill.mkdt.batch_syn <= 731 or distill.mkdt.syn_steps <= 29")
    for run in (get("mkdt").preflight, distill_mkdt):  # the preflight, and the method before it reads experts
        with pytest.raises(UserError) as err:
            run(ctx)
        assert str(err.value) == message
    ctx.cfg.mkdt.batch_syn = 731  # what it says fits, fits: the method goes on (to the missing experts)
    with pytest.raises(UserError, match="experts prep stage has not run"):
        distill_mkdt(ctx)
    ctx.cfg.mkdt.batch_syn = 0
    monkeypatch.setattr(mkdt_mod, "free_memory", lambda device: (1e8, "the host (MemAvailable)"))
    with pytest.raises(UserError, match="even one image over one step does not fit"):
        distill_mkdt(ctx)
    monkeypatch.setattr(mkdt_mod, "free_memory", lambda device: None)  # unknown: no check
    with pytest.raises(UserError, match="experts prep stage has not run"):
        distill_mkdt(ctx)
    assert get("mtt").preflight is not None and get("mkdt_aug").preflight is get("mkdt").preflight
    assert get("high_loss").preflight is None


def test_cpu_memory_estimate_counts_activations_and_parameters():
    import torch.nn.functional as F

    from ssdd.distill.engines import unroll_memory as mkdt_mod

    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(128, 3))
    assert mkdt_mod.activation_elements(model, (1, 8, 8), "cpu") == 2 * 8 * 8 + 3  # in-place and views once
    p = sum(q.numel() for q in model.parameters())
    cost = mkdt_mod.unroll_cost(model, (1, 8, 8), 3, 10, F.mse_loss, "cpu")
    assert cost.per_image == mkdt_mod.CPU_ACTIVATION_FACTOR * 4 * 131
    assert cost.per_step == mkdt_mod.CPU_PARAM_COPIES * 4 * p and cost.fixed > 0
    assert model.training  # left as it was
    free = mkdt_mod.free_memory("cpu")
    assert free is None or (free[0] > 0 and "MemAvailable" in free[1])


def test_seeded_builds_leave_every_global_generator_alone(monkeypatch):
    from ssdd.distill.engines.seeding import build_seeded

    torch.manual_seed(5)
    torch.manual_seed(42)
    expected = build(SPEC)  # what seeding the global RNG with 42 builds
    torch.manual_seed(5)
    state = torch.get_rng_state()
    reseeded = []  # torch.manual_seed reseeds every CUDA generator; a seeded build must not
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    model = build_seeded(SPEC, 42, "cpu")
    assert reseeded == [] and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_the_pipeline_refuses_mkdt_memory_before_training_any_expert(monkeypatch, tmp_path, capsys):
    """The run's preflight asks every stale method first: the refusal comes before hours of experts."""
    from ssdd.cli import main
    from ssdd.distill.engines import unroll_memory as mkdt_mod
    from test_methods import tiny_args, tiny_npz

    monkeypatch.setattr(mkdt_mod, "unroll_cost", lambda *args: mkdt_mod.UnrollCost(0.0, 0.0, 4e6))
    monkeypatch.setattr(mkdt_mod, "free_memory", lambda device: (1e6, "the host (MemAvailable)"))
    src = tiny_npz(tmp_path / "src.npz")
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--until", "distill",
                 *tiny_args(src, [src], ["krr_st", "mkdt"], seeds=1)]) == 2
    assert "distill.mkdt:" in capsys.readouterr().err
    assert not (out / "distilled" / "prep" / "experts.safetensors").exists()
    assert not (out / "distilled" / "krr_st.safetensors").exists()  # refused before the first method too
