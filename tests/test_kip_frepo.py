"""KIP and FRePo, the labelled kernel baselines: KIP's prediction is the ridge regression it claims to be,
FRePo regresses real labels with fixed synthetic labels on the KRR-ST engine, and both leave checked
cross-entropy sets through the pipeline."""

import dataclasses

import numpy as np
import pytest
import torch

from ssdd import artifacts, distilled_set
from ssdd.cli import main
from ssdd.data import ImageSet, Normalizer, load_dataset
from ssdd.distill import DistillContext, Hooks, random_index
from ssdd.distill.engines.labels import centred_one_hot
from ssdd.distill.methods import frepo as frepo_module
from ssdd.distill.methods.frepo import FrepoConfig
from ssdd.distill.methods.kip import KipConfig, class_balanced_index, feature_models, kip, kip_loss, kip_predict, random_features
from ssdd.distill.registry import SourceLabels
from ssdd.errors import Stopped
from ssdd.settings import DistillConfig
from test_methods import tiny_args, tiny_npz

SPEC = {"arch": "convnet", "in_channels": 3, "image_size": 16, "widths": [4, 8], "pool": "flatten",
        "norm": "instance", "out_dim": 5}


def tiny_ctx(**distill) -> DistillContext:
    """40 random 16-px images in 4 classes, m = 6, batch 8."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=gen)
    cfg = DistillConfig(m=6, batch=8, **distill)
    source = ImageSet(images)
    return DistillContext(source, None, torch.nn.Identity(), Normalizer(*source.mean_std()), SPEC, cfg, 3,
                          random_index(40, 6, 3), "cpu", False, labels=SourceLabels(torch.arange(40) % 4, 4))


def test_kip_prediction_and_loss_are_the_explicit_ridge_regression():
    gen = torch.Generator().manual_seed(1)
    phi_s, phi_t = torch.randn(6, 12, generator=gen), torch.randn(9, 12, generator=gen)
    y_s, y_t = torch.randn(6, 3, generator=gen), torch.randn(9, 3, generator=gen)
    ridge = 1e-3
    s, t, y = phi_s.double().numpy(), phi_t.double().numpy(), y_s.double().numpy()
    k_ss = s @ s.T
    lam = ridge * np.trace(k_ss) / 6
    expected = (t @ s.T) @ np.linalg.solve(k_ss + lam * np.eye(6), y)
    exact = kip_predict(phi_s.double(), phi_t.double(), y_s.double(), ridge)  # float64 in: float64 throughout
    np.testing.assert_allclose(exact.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kip_predict(phi_s, phi_t, y_s, ridge).double().numpy(), expected, rtol=1e-4, atol=1e-5)
    loss = kip_loss(phi_s, phi_t, y_s, y_t, ridge)
    assert loss.item() == pytest.approx(0.5 * np.mean((expected - y_t.double().numpy()) ** 2), rel=1e-5)
    # its gradient is that of the same expression written with a dense solve (lambda held constant)
    a = phi_s.double().requires_grad_(True)
    lam_t = ridge * torch.trace(a @ a.T).detach() / 6
    ref = 0.5 * ((phi_t.double() @ a.T @ torch.linalg.solve(a @ a.T + lam_t * torch.eye(6, dtype=torch.float64),
                                                            y_s.double()) - y_t.double()) ** 2).mean()
    (g_ref,) = torch.autograd.grad(ref, a)
    b = phi_s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kip_loss(b, phi_t, y_s, y_t, ridge), b)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-7)


def test_random_feature_kernel_is_the_mean_of_fresh_seeded_networks_kernels():
    x = torch.randn(5, 3, 16, 16)
    models = feature_models(SPEC, 3, seed=2, step=7, device="cpu")
    phi = random_features(models, x)
    per_model = [m.features(x).flatten(1) for m in models]
    torch.testing.assert_close(phi @ phi.T, sum(f @ f.T for f in per_model) / 3, rtol=1e-5, atol=1e-6)
    again = random_features(feature_models(SPEC, 3, seed=2, step=7, device="cpu"), x)
    other = random_features(feature_models(SPEC, 3, seed=2, step=8, device="cpu"), x)
    assert torch.equal(phi, again) and not torch.allclose(phi, other)
    assert not any(p.requires_grad for m in models for p in m.parameters())


def test_class_balanced_index_splits_m_as_evenly_as_the_classes_allow():
    labels = torch.arange(40) % 4
    index = class_balanced_index(labels, 4, 6, seed=0)
    assert len(set(index.tolist())) == 6 and sorted(torch.bincount(labels[index], minlength=4).tolist()) == [1, 1, 2, 2]
    short = torch.tensor([0] + [1] * 10 + [2] * 10)  # class 0 has one image
    counts = torch.bincount(short[class_balanced_index(short, 3, 8, seed=1)], minlength=3).tolist()
    assert counts[0] == 1 and sorted(counts[1:]) == [3, 4]


def test_frepo_regresses_one_hot_labels_of_real_batches_with_fixed_synthetic_targets(monkeypatch):
    ctx = tiny_ctx(frepo=FrepoConfig(steps=3, pool_size=2, pool_max_age=2))
    labels = ctx.labels
    calls, seen = [], {}
    engine = frepo_module.distill_krr_st

    def spy(run, targets_of, learn_targets):
        seen.update(spec=run.spec, engine=run.cfg.krr_st, learn_targets=learn_targets)

        def recorded(index):
            out = targets_of(index)
            calls.append((index.clone(), out.clone()))
            return out
        return engine(run, targets_of=recorded, learn_targets=learn_targets)

    monkeypatch.setattr(frepo_module, "distill_krr_st", spy)
    result = frepo_module.distill_frepo(ctx)
    assert seen["spec"]["out_dim"] == 4 and not seen["learn_targets"]
    assert seen["engine"].steps == 3 and seen["engine"].ridge == pytest.approx(1e-6 / 6)
    # one call for the synthetic start (the paired draw), then one per real batch: centred one-hot labels
    assert len(calls) == 1 + 3 and torch.equal(calls[0][0], ctx.init_index)
    for index, targets in calls:
        torch.testing.assert_close(targets, labels.one_hot(index) - 0.25)
    assert all(len(index) == 8 for index, _ in calls[1:])
    # the synthetic targets never moved; the images did
    assert torch.equal(result.targets, result.init_targets)
    torch.testing.assert_close(result.targets, labels.one_hot(ctx.init_index) - 0.25)
    assert not torch.allclose(result.images, result.init_images)
    out = frepo_module.frepo(ctx)
    assert out.objective == "cross_entropy" and torch.equal(out.targets, labels.one_hot(ctx.init_index))


def test_kip_learned_labels_are_stored_for_mse_and_a_stopped_run_resumes_exactly():
    ctx = tiny_ctx(kip=KipConfig(steps=4, models=1, learn_labels=True))
    straight = kip(ctx)
    assert straight.objective == "mse" and straight.targets.shape == (6, 4)
    assert not torch.allclose(straight.targets, ctx.labels.one_hot(torch.tensor(straight.meta["init_index"])))
    saved = {}

    def keep(state):
        saved.update(state)
    with pytest.raises(Stopped):
        kip(dataclasses.replace(ctx, hooks=Hooks(checkpoint=keep, should_stop=lambda: True)))
    assert saved["step"] == 1
    resumed = kip(dataclasses.replace(ctx, hooks=Hooks(resume=saved)))
    assert torch.equal(resumed.images, straight.images) and torch.equal(resumed.targets, straight.targets)
    assert resumed.meta["losses"] == straight.meta["losses"]


def test_kip_and_frepo_leave_checked_cross_entropy_sets(tmp_path):
    src = tiny_npz(tmp_path / "src.npz")
    out = tmp_path / "run"
    args = tiny_args(src, [src], ["kip", "frepo", "random_subset_labeled"], seeds=1)
    args += ["--set", "distill.kip.steps=3", "--set", "distill.kip.models=2", "--set", "distill.frepo.steps=3"]
    assert main(["run", "--out", str(out), "--until", "pretrain", *args]) == 0
    labels = artifacts.load_tensors(out / "data" / "source_labels.safetensors")[0]["labels"]
    source = load_dataset(out / "data" / "source_train.safetensors")
    norm = Normalizer(*source.mean_std())
    for name in ("kip", "frepo"):
        images, targets, meta = distilled_set.load_arrays(out / "distilled" / f"{name}.safetensors")
        index = meta["init_index"]
        assert images.shape == (6, 3, 16, 16) and torch.isfinite(images).all(), name
        assert meta["objective"] == "cross_entropy" and meta["steps"] == 3 and len(meta["losses"]) == 3, name
        assert torch.equal(targets, torch.nn.functional.one_hot(labels[index], 4).float()), name
        assert (images - norm(source.images[index])).abs().max() > 1e-4, name  # the images moved (lr 3e-4)
        assert "kernel" in meta
        assert artifacts.read_meta(out / "encoders" / f"{name}.safetensors")["model_spec"]["out_dim"] == 4  # one per class
    kip_meta = artifacts.read_meta(out / "distilled" / "kip.safetensors")
    assert sorted(kip_meta["class_counts"]) == [1, 1, 2, 2] and kip_meta["kernel_models"] == 2
    assert "random-feature" in kip_meta["kernel"]
    paired = artifacts.read_meta(out / "distilled" / "random_subset_labeled.safetensors")["init_index"]
    assert artifacts.read_meta(out / "distilled" / "frepo.safetensors")["init_index"] == paired


def test_one_hot_rows_made_on_the_device_equal_the_host_ones_and_feature_models_keep_the_global_rng(monkeypatch):
    labels = SourceLabels(torch.arange(40) % 4, 4)
    index = torch.tensor([3, 0, 17, 39, 3])
    assert torch.equal(labels.one_hot(index, "cpu"), labels.one_hot(index))
    assert labels.on("cpu") is labels.on(torch.device("cpu"))  # kept, not copied per call
    targets = centred_one_hot(labels, "cpu")(index)
    assert torch.equal(targets, labels.one_hot(index) - 0.25)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    feature_models(SPEC, 2, seed=2, step=7, device="cpu")
    assert reseeded == [] and torch.equal(torch.get_rng_state(), state)
