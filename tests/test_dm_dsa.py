"""DM and DSA, the labelled matching baselines: their objectives against direct loops, the siamese
augmentation's shared parameters, the class-balanced start, exact resume, and a run of each through
the pipeline leaving a checked artifact."""

import pytest
import torch

from ssdd import loss_log
from ssdd import artifacts, distilled_set
from ssdd.cli import main
from ssdd.data import ImageSet, Normalizer
from ssdd.data import siamese_augment as aug
from ssdd.distill import Hooks
from ssdd.distill.engines.per_class import balanced_start
from ssdd.distill.methods import dm as dm_mod
from ssdd.distill.methods.dm import class_means, distill_dm, mean_embedding_distance
from ssdd.distill.methods.dsa import DsaConfig, distill_dsa, gradient_distance, loops
from ssdd.distill.registry import DistillContext, SourceLabels, random_index
from ssdd.errors import Stopped, UserError
from ssdd.settings import DistillConfig, load_config
from test_methods import tiny_args, tiny_npz

SPEC = {"arch": "convnet", "in_channels": 3, "image_size": 16, "widths": [4, 8], "pool": "flatten",
        "norm": "instance", "out_dim": 8}


def test_dm_objective_is_the_summed_squared_distance_of_class_means():
    gen = torch.Generator().manual_seed(0)
    real, real_group = torch.randn(30, 5, generator=gen), torch.arange(30) % 4
    syn, syn_group = torch.randn(7, 5, generator=gen), torch.tensor([0, 0, 1, 2, 2, 2, 3])
    direct = 0.0
    for c in range(4):
        r = torch.stack([real[i] for i in range(30) if real_group[i] == c]).sum(0) / int((real_group == c).sum())
        s = torch.stack([syn[i] for i in range(7) if syn_group[i] == c]).sum(0) / int((syn_group == c).sum())
        direct += float(sum((r[d] - s[d]) ** 2 for d in range(5)))
    got = mean_embedding_distance(class_means(real, real_group, 4), syn, syn_group)
    assert got.item() == pytest.approx(direct, rel=1e-5)


def test_dm_real_means_in_chunks_equal_one_pass(monkeypatch):
    ctx = _context(DistillConfig(m=6))
    net = torch.nn.Module()
    net.features = lambda x: x.flatten(1)[:, :10] * 2  # noqa: E731
    index, group = torch.arange(20), torch.arange(20) % 3
    params = aug.draw(3, aug.parse_strategy(aug.PUBLISHED, "x"), 16, torch.Generator().manual_seed(1))
    monkeypatch.setattr(dm_mod, "REAL_CHUNK", 7)
    chunked = dm_mod.real_class_means(net, ctx, ctx.source.images, index, group, params, 3)
    whole = class_means(net.features(aug.apply(ctx.to_space(ctx.source.images[index]), params, group)), group, 3)
    torch.testing.assert_close(chunked, whole)


def test_dsa_distance_is_the_layerwise_sum_of_one_minus_row_cosines():
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (5, 8), (5,)]  # conv weight, its bias, linear weight, its bias
    real = [torch.randn(s, generator=gen) for s in shapes]
    syn = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    direct = 0.0
    for g_r, g_s in zip(real, syn):
        if g_r.ndim == 1:
            continue  # biases count zero, as the paper's code
        for o in range(g_r.shape[0]):
            a, b = g_r[o].flatten().tolist(), g_s[o].detach().flatten().tolist()
            dot = sum(x * y for x, y in zip(a, b))
            direct += 1 - dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5 + 1e-6)
    got = gradient_distance(real, syn)
    assert got.item() == pytest.approx(direct, rel=1e-5)
    got.backward()
    assert syn[0].grad.abs().sum() > 0 and syn[1].grad is None  # differentiable in the synthetic gradients
    assert gradient_distance(real, [g.clone() for g in real]).item() == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError):
        gradient_distance(real, syn[:2])


def test_dsa_loops_follow_the_published_table():
    assert loops(DsaConfig(), 1) == (1, 1) and loops(DsaConfig(), 10) == (10, 50)
    assert loops(DsaConfig(), 50) == (50, 10) and loops(DsaConfig(), 3) == (3, 1)
    assert loops(DsaConfig(outer_loop=2, inner_loop=5), 10) == (2, 5)


@pytest.mark.parametrize("single", [True, False])
def test_siamese_augmentation_applies_one_draw_per_group_to_every_batch(single):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    params = aug.draw(3, aug.parse_strategy(aug.PUBLISHED, "x"), 16, gen, single=single)
    real = aug.apply(x, params, torch.tensor([0, 0, 1, 1, 2, 2]))  # a "real" batch of three classes
    pick = torch.tensor([5, 2, 1])
    syn = aug.apply(x[pick], params, torch.tensor([2, 1, 0]))  # a smaller "synthetic" batch, other order
    assert torch.equal(syn, real[pick])  # the same image in the same group: bit for bit the same output
    assert torch.equal(aug.apply(x, params, torch.tensor([0, 0, 1, 1, 2, 2])), real)  # deterministic given the draw
    if not single:
        assert not torch.allclose(real, x)
    real.square().sum().backward()  # differentiable in the images
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.equal(aug.apply(x, aug.draw(3, (), 16, gen), torch.tensor([0, 0, 1, 1, 2, 2])), x)  # "none"


def test_single_operation_flip_and_unknown_strategy():
    gen = torch.Generator().manual_seed(0)
    params = aug.draw(8, ("flip",), 16, gen)
    x = torch.randn(8, 1, 16, 16)
    out = aug.apply(x, params)
    for i in range(8):
        assert torch.equal(out[i], x[i].flip(2) if params.flip[i] else x[i])
    with pytest.raises(UserError, match="distill.dm.augment"):
        aug.parse_strategy("color_zoom", "distill.dm.augment")


@pytest.mark.parametrize("method", ["dm", "dsa"])
def test_an_unknown_augmentation_is_refused_when_the_config_loads(method):
    """Before, a typo in distill.dm.augment / distill.dsa.augment surfaced after prepare and the teacher."""
    with pytest.raises(UserError, match=f"^config: distill.{method}.augment: unknown augmentation 'colour'") as err:
        load_config("demo", {f"distill.{method}.augment": "colour"})
    assert "\n" not in str(err.value)
    assert getattr(load_config("demo", {f"distill.{method}.augment": "none"}).distill, method).augment == "none"


def test_balanced_start_spreads_m_over_the_classes():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 1 + [3] * 4)
    start = balanced_start(labels, 7, seed=0)
    per_class = torch.bincount(labels[start.index], minlength=4)
    assert per_class.sum() == 7 and per_class[2] == 1 and per_class.max() - per_class[[0, 1, 3]].min() <= 1
    assert torch.equal(labels[start.index], start.classes[start.group])
    assert torch.equal(start.group, start.group.sort().values)  # laid out class by class
    assert len(set(start.index.tolist())) == 7
    assert torch.equal(balanced_start(labels, 7, seed=0).index, start.index)  # seeded
    few = balanced_start(labels, 2, seed=1)  # fewer images than classes: two classes, one image each
    assert len(few.classes) == 2 and torch.equal(torch.bincount(few.group), torch.ones(2, dtype=torch.long))
    with pytest.raises(UserError, match="distill.m"):
        balanced_start(labels, 14, seed=0)


def test_a_draw_moves_in_one_exact_pack_and_apply_decides_on_the_host():
    gen = torch.Generator().manual_seed(4)
    ops = aug.parse_strategy(aug.PUBLISHED, "x")
    params = aug.draw(5, ops, 16, gen, single=False)
    fields = {k: v for k, v in vars(params).items() if isinstance(v, torch.Tensor) and not k.startswith("host")}
    unpacked = aug._unpack(aug._pack(fields), torch.float32)
    assert set(unpacked) == set(fields)
    for name, value in fields.items():  # float32 draws, small integers and booleans survive float64 exactly
        assert unpacked[name].dtype == value.dtype and torch.equal(unpacked[name], value), name
    assert torch.equal(params.host_active, params.active) and torch.equal(params.host_flip, params.flip)
    x = torch.randn(10, 3, 16, 16)
    group = torch.tensor([4, 0, 1, 1, 2, 3, 3, 0, 4, 2])
    bare = aug.AugParams(**{k: v for k, v in vars(params).items() if not k.startswith("host")})  # no host copies
    assert torch.equal(aug.apply(x, params, group), aug.apply(x, bare, group))
    with pytest.raises(ValueError, match="group index 5 out of range"):
        aug.apply(x, params, group + 1)


@pytest.mark.parametrize("method", ["dm", "dsa"])
@pytest.mark.parametrize("every", [1, 25])  # losses read at each iteration / only at checkpoints and the end
def test_a_non_finite_loss_names_its_iteration_and_option(method, every, monkeypatch):
    monkeypatch.setattr(loss_log, "read_every", lambda device: every)
    cfg = DistillConfig(m=6)
    cfg.dm.iterations = cfg.dsa.iterations = 4
    cfg.dm.lr_images = cfg.dsa.lr_images = 1e38
    cfg.dsa.outer_loop, cfg.dsa.inner_loop = 2, 1
    run = distill_dm if method == "dm" else distill_dsa
    expected = rf"{method}: non-finite loss at iteration \d; lower distill.{method}.lr_images"
    with pytest.raises(UserError, match=expected):
        run(_context(cfg))


@pytest.mark.parametrize("method", ["dm", "dsa"])
@pytest.mark.parametrize("every", [1, 2, 25])
def test_resume_continues_exactly(method, every, monkeypatch):
    monkeypatch.setattr(loss_log, "read_every", lambda device: every)
    cfg = DistillConfig(m=6)
    cfg.dm.iterations = cfg.dsa.iterations = 2
    cfg.dsa.outer_loop, cfg.dsa.inner_loop = 2, 1
    run = distill_dm if method == "dm" else distill_dsa
    whole = run(_context(cfg))
    saved: list[dict] = []
    calls: list[int] = []

    def stop_after_one() -> bool:
        calls.append(1)
        return len(calls) == 1

    with pytest.raises(Stopped):
        run(_context(cfg, Hooks(checkpoint=saved.append, should_stop=stop_after_one)))
    assert saved[-1]["step"] == 1 and len(saved[-1]["losses"]) == 1
    assert all(type(v) is float for v in saved[-1]["losses"])  # plain floats in the checkpoint
    resumed = run(_context(cfg, Hooks(resume=saved[-1])))
    assert torch.equal(resumed.images, whole.images) and resumed.meta["losses"] == whole.meta["losses"]
    assert len(whole.meta["losses"]) == 2 and all(type(v) is float for v in whole.meta["losses"])


def _context(cfg: DistillConfig, hooks: Hooks | None = None) -> DistillContext:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.arange(40) % 4
    return DistillContext(ImageSet(images), None, torch.nn.Identity(), Normalizer([0.5] * 3, [0.25] * 3), SPEC, cfg,
                          0, random_index(40, cfg.m, 0), "cpu", False, hooks=hooks or Hooks(),
                          labels=SourceLabels(labels, 4))


@pytest.mark.parametrize("method", ["dm", "dsa"])
def test_a_run_through_the_pipeline_leaves_a_checked_labelled_set(tmp_path, method):
    src = tiny_npz(tmp_path / "src.npz")
    out = tmp_path / "run"
    extra = ["distill.dsa.outer_loop=2", "distill.dsa.inner_loop=1"]  # exercise the network training in between
    args = tiny_args(src, [src], [method], seeds=1) + [x for pair in extra for x in ("--set", pair)]
    assert main(["run", "--out", str(out), "--until", "distill", *args]) == 0
    images, targets, meta = distilled_set.load_arrays(out / "distilled" / f"{method}.safetensors")
    assert images.shape == (6, 3, 16, 16) and torch.isfinite(images).all()
    assert meta["objective"] == "cross_entropy" and meta["method"] == method and len(meta["losses"]) == 2
    labels = artifacts.load_tensors(out / "data" / "source_labels.safetensors")[0]["labels"]
    index = torch.tensor(meta["init_index"])
    assert targets.shape == (6, 4) and torch.equal(targets.sum(1), torch.ones(6))
    assert set(targets.unique().tolist()) == {0.0, 1.0}  # one-hot
    assert torch.equal(targets.argmax(1), labels[index])
    assert torch.equal(torch.bincount(labels[index], minlength=4).sort().values, torch.tensor([1, 1, 2, 2]))  # balanced
    source, source_meta = artifacts.load_tensors(out / "data" / "source_train.safetensors")
    start = Normalizer(source_meta["mean"], source_meta["std"])(source["images"][index])
    assert (images - start).abs().max() > 1e-4  # the images moved


def test_a_labelled_method_on_an_unlabelled_source_is_refused():
    cfg = DistillConfig(m=6)
    ctx = _context(cfg)
    ctx.labels = None
    for run, name in ((distill_dm, "dm"), (distill_dsa, "dsa")):
        with pytest.raises(UserError, match=f"method {name} needs a labelled source"):
            run(ctx)
